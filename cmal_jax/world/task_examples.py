r"""Downstream tasks from the synthetic world: VQA, VE, NLVR2, REC, retrieval.

  python -m cmal_jax.world.task_examples --out=DIR \
      --tasks=vqa,ve,nlvr2,rec,retrieval --num_train=2000 --num_val=500 \
      --num_test=500 --feature_dim=256 --seed=0

writes, for every task and split, `DIR/{task}_{split}.array_record` (examples
in the schema of tasks.py), one region store `DIR/regions.array_record` (+
index, see region_store.py) with every image the examples name, and
`DIR/meta.json` (tags, synonyms, feature_dim, as the world's). With --images
each region record also carries its scene as PNG bytes, for a model that
reads pixels (image_store.StoredImages).

Scenes, the detector and the region features are the world's own
(scenes.sample_scene, scenes.detect_regions, the same WorldParams). Example i
of a task split depends only on (seed, task, split, i): its generator is
`np.random.default_rng([seed, scenes.split_id(f'task-{task}-{split}'), i])`,
a stream disjoint from pre-training ('pretrain', 'val') and from the other
tasks, and its image ids are `task-{task}-{split}-{seed}-{i:07d}` (NLVR2:
the official `{split}_s{seed}-{set}-{pair}-img0/img1`).

How labels are kept from leaking into the text. Each example first draws
its *plan* (question type / template, the attributes its descriptions use,
and the label or answer it should have), then samples scenes until one
realises the plan. So the template and the description forms are
independent of the label, and answers are close to uniform within a type
(counts 0-3 for a shape or colour, both yes/no, all colours ...).

Visual entailment. Hypotheses are statements about definite descriptions:
attributes ("The small circle is red.", "The red object is a star.", "The
blue square is large.") and relations ("The star is to the left of the red
circle."). The same templates yield all three labels:
  entailment     every object that fits the description has the property,
  contradiction  at least one object fits, and none has the property,
  neutral        several objects fit and they disagree: the image cannot
                 tell which one the hypothesis means, so it neither follows
                 nor is ruled out.
The text alone shows neither how many objects fit nor how they differ, so
a text-only model is near chance: the majority label scores ~0.29-0.33 and a
bag-of-n-grams logistic regression on the hypothesis 0.36 (1000 train / 500
test; the same model scores 0.49 on NLVR2 and a VQA accuracy of 0.34).

VQA has 10 annotator answers per question: the truth, except 0-4 who give
a synonym ('disc' for circle), a confusable colour or shape, or a
neighbouring count (0-2 on yes/no and small/large questions).

REC: one expression (ref_id == sent_id) per image, naming an object among
distractors by colour + shape, colour, size, a relation to a landmark or an
extreme position ("the leftmost star"); target_box is the object's true box
/ image size, not a detected one.

NLVR2 statements ("Both images contain a red star.", "The left image
contains more circles than the right image.", "Exactly one image contains a
star.", "Neither image ...", "The two images contain exactly two circles in
total.") are judged on both scenes; True/False is drawn 50/50 first.

Relations use object centres with a dead zone of 6 % of the image size:
scenes where an object is too close to call are rejected, so every label
is decided by the pixels (occlusion is at most 20 %, so counts are too).
"""

import argparse
import collections
import os
import time

import numpy as np

from cmal_jax import task_metrics
from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks
from cmal_jax.world import scenes

SPLITS = ('train', 'val', 'test')
COLOUR_NAMES = tuple(scenes.COLOURS)
NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six')
# Nouns for each tag, canonical first (scenes.WORLD_SYNONYMS keeps order).
NOUNS = {tag: tuple(w for w, t in scenes.WORLD_SYNONYMS.items() if t == tag)
         for tag in scenes.WORLD_TAGS}
_SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
_GENERIC = ('object', 'shape', 'thing')  # Nouns that name no tag.
_DEAD_ZONE = 0.06   # Fraction of the image size: relations closer are unsure.
_MAX_TRIES = 3000   # Scenes sampled per example before giving up (a bug).

# What an annotator may answer instead of the truth (VQA disagreement).
_COLOUR_CONFUSIONS = {
    'red': ('orange', 'purple'), 'orange': ('red', 'yellow'),
    'yellow': ('orange', 'white'), 'green': ('cyan',),
    'cyan': ('blue', 'green'), 'blue': ('purple', 'cyan'),
    'purple': ('blue', 'red'), 'white': ('yellow', 'cyan')}
_SHAPE_CONFUSIONS = {
    'circle': ('ring', 'hexagon'), 'square': ('diamond',),
    'triangle': ('half circle',), 'star': ('cross',), 'cross': ('star',),
    'diamond': ('square',), 'hexagon': ('circle',), 'ring': ('circle',),
    'heart': ('triangle',), 'half circle': ('circle',)}


# ------------------------------------------------------------- scene facts

def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _matches(ob, desc: dict) -> bool:
  return all(getattr(ob, k) == v for k, v in desc.items())


def _select(objects, desc: dict) -> list:
  """Objects that fit a description {attribute: value}."""
  return [o for o in objects if _matches(o, desc)]


def _desc_of(ob, attrs) -> dict:
  return {a: getattr(ob, a) for a in attrs}


def _random_desc(rng, attrs) -> dict:
  domain = {'shape': scenes.WORLD_TAGS, 'colour': COLOUR_NAMES,
            'size': scenes.SIZES}
  return {a: _pick(rng, domain[a]) for a in attrs}


def _phrase(rng, desc: dict, number: int = 1, generic=_GENERIC) -> str:
  """'small red disc', 'red objects': size, colour, then a noun or generic."""
  words = []
  if 'size' in desc:
    words.append(_pick(rng, _SIZE_WORDS[desc['size']]))
  if 'colour' in desc:
    words.append(desc['colour'])
  if 'shape' in desc:  # Canonical half the time, else any synonym.
    noun = (desc['shape'] if rng.random() < 0.5
            else _pick(rng, NOUNS[desc['shape']]))
  else:
    noun = _pick(rng, generic)
  words.append(noun if number == 1 else scenes.plural(noun))
  return ' '.join(words)


def _a(phrase: str) -> str:
  return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:] + '.'


_REL_TEXT = {'left': 'to the left of', 'right': 'to the right of',
             'above': 'above', 'below': 'below'}


def _relation_holds(a, b, rel: str, image_size: int):
  """Is a `rel` b (by centres)? None when too close to call."""
  dx = b.center[0] - a.center[0]  # > 0: a is left of b.
  dy = b.center[1] - a.center[1]  # > 0: a is above b (y points down).
  d = {'left': dx, 'right': -dx, 'above': dy, 'below': -dy}[rel]
  if abs(d) <= _DEAD_ZONE * image_size:
    return None
  return bool(d > 0)


def _unique_desc(rng, objects, ob, attr_options):
  """A description of `ob` (one of attr_options) that fits only `ob`."""
  for i in rng.permutation(len(attr_options)):
    desc = _desc_of(ob, attr_options[i])
    if len(_select(objects, desc)) == 1:
      return desc
  return None


def _sample(rng, params, build, images=1):
  """Samples `images` scenes until build(*scenes) is not None."""
  for _ in range(_MAX_TRIES):
    sampled = [scenes.sample_scene(rng, params) for _ in range(images)]
    out = build(*sampled)
    if out is not None:
      return sampled, out
  raise RuntimeError(f'no scene realised the plan in {_MAX_TRIES} tries')


def region_record(image_id: str, scene, rng, params) -> dict:
  """The simulated detector's view of a scene: image_id + REGION_FIELDS.

  region_feats f32 [N, F], region_boxes f32 [N, 4], region_tags [N],
  region_conf f32 [N] (scenes.detect_regions); with params.images, the
  scene's PNG bytes too (`image`).
  """
  boxes, tags, conf, feats = scenes.detect_regions(scene, rng, params)
  record = {'image_id': image_id, 'region_feats': feats,
            'region_boxes': boxes, 'region_tags': tags, 'region_conf': conf}
  if params.images:  # For a model that reads pixels (image_store.py).
    record[records.IMAGE_FIELD] = image_store.encode_png(scene.image)
  return record


def stream_name(task: str, split: str) -> str:
  """Random-stream / image-id prefix of a task split: 'task-vqa-train'."""
  return f'task-{task}-{split}'


def _example_rng(seed, task, split, index):
  return np.random.default_rng(
      [seed, scenes.split_id(stream_name(task, split)), index])


def _image_id(seed, task, split, index):
  return f'{stream_name(task, split)}-{seed}-{index:07d}'


def _int_id(split: str, index: int) -> int:
  """Dataset-unique integer ids (question_id, ref_id): split offset + i."""
  offset = {'train': 0, 'val': 1, 'test': 2}.get(split)
  if offset is None:
    offset = 3 + scenes.split_id(split) % 997
  return offset * 10_000_000 + index


# --------------------------------------------------------------------- VQA

VQA_TYPES = ('colour', 'shape', 'count', 'exists', 'relation', 'size')
VQA_ANSWER_TYPES = {'colour': 'other', 'shape': 'other', 'count': 'number',
                    'exists': 'yes/no', 'relation': 'other', 'size': 'other'}
_COUNT_WEIGHTS = np.array([0.25, 0.3, 0.25, 0.2])  # Answers 0..3.


def _vqa_plan(rng) -> dict:
  qtype = _pick(rng, VQA_TYPES)
  plan = {'type': qtype}
  if qtype == 'colour':
    plan['answer'] = _pick(rng, COLOUR_NAMES)
  elif qtype in ('shape', 'relation'):
    plan['answer'] = _pick(rng, scenes.WORLD_TAGS)
  elif qtype == 'size':
    plan['answer'] = _pick(rng, scenes.SIZES)
  elif qtype == 'exists':
    plan['answer'] = _pick(rng, ('yes', 'no'))
    plan['attrs'] = _pick(rng, (('shape',), ('colour', 'shape'),
                                ('colour', 'shape'), ('colour',)))
  else:  # count
    plan['of'] = _pick(rng, ('shape', 'shape', 'colour', 'all'))
    n = (int(rng.integers(1, 7)) if plan['of'] == 'all'
         else int(rng.choice(4, p=_COUNT_WEIGHTS)))
    plan['answer'] = str(n)
  return plan


def _vqa_question(scene, rng, plan, image_size):
  """(question, answer) realising the plan on the scene, or None."""
  obs, qtype, answer = scene.objects, plan['type'], plan['answer']
  if qtype in ('colour', 'shape', 'size'):
    options = {'colour': (('shape',), ('size', 'shape')),
               'shape': (('colour',), ('size', 'colour')),
               'size': (('shape',), ('colour', 'shape'))}[qtype]
    for ob in _select(obs, {qtype: answer}):
      desc = _unique_desc(rng, obs, ob, options)
      if desc is None:
        continue
      # Not 'what shape is the red shape?'.
      p = _phrase(rng, desc, generic=('object', 'thing'))
      if qtype == 'colour':
        return f'what colour is the {p}?', answer
      if qtype == 'shape':
        return f'what shape is the {p}?', answer
      return _pick(rng, (f'is the {p} small or large?',
                         f'what size is the {p}?')), answer
    return None
  if qtype == 'count':
    n = int(answer)
    if plan['of'] == 'all':
      if len(obs) != n:
        return None
      return f'how many {scenes.plural(_pick(rng, _GENERIC))} are there?', answer
    attr = plan['of']
    domain = scenes.WORLD_TAGS if attr == 'shape' else COLOUR_NAMES
    values = [v for v in domain if len(_select(obs, {attr: v})) == n]
    if not values:
      return None
    p = _phrase(rng, {attr: _pick(rng, values)}, number=2)
    return f'how many {p} are there?', answer
  if qtype == 'exists':
    # Half the descriptions come from an object, half are random: the
    # same procedure for both answers, so the text does not tell them apart.
    desc = (_desc_of(_pick(rng, obs), plan['attrs']) if rng.random() < 0.5
            else _random_desc(rng, plan['attrs']))
    present = bool(_select(obs, desc))
    if present != (answer == 'yes'):
      return None
    return f'is there {_a(_phrase(rng, desc))}?', answer
  # relation: 'what is to the left of the green cross?' -> the one object.
  for k in rng.permutation(len(obs) * len(_REL_TEXT)):
    anchor, rel = obs[k // len(_REL_TEXT)], tuple(_REL_TEXT)[k % len(_REL_TEXT)]
    desc = _unique_desc(rng, obs, anchor, (('shape',), ('colour', 'shape')))
    if desc is None:
      continue
    holds = [_relation_holds(o, anchor, rel, image_size)
             for o in obs if o is not anchor]
    if None in holds or sum(holds) != 1:
      continue
    target = [o for o in obs if o is not anchor][holds.index(True)]
    if target.shape != answer:
      continue
    return f'what is {_REL_TEXT[rel]} the {_phrase(rng, desc)}?', answer
  return None


def _disagreement(rng, qtype: str, answer: str) -> str:
  """A plausible wrong or differently worded answer from one annotator."""
  if answer in ('yes', 'no'):
    return 'no' if answer == 'yes' else 'yes'
  if qtype == 'count':
    n = int(answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
  if answer in scenes.SIZES:
    return 'large' if answer == 'small' else 'small'
  if answer in _COLOUR_CONFUSIONS:
    return _pick(rng, _COLOUR_CONFUSIONS[answer])
  # A shape: a synonym ('disc' for circle) where there is one, else a
  # shape it is confused with.
  options = NOUNS[answer][1:] + _SHAPE_CONFUSIONS[answer]
  return _pick(rng, options)


def annotate(rng, qtype: str, answer: str, num: int = 10) -> list[str]:
  """`num` annotators' answers: the truth, except a few who disagree.

  Up to 4 disagree (the truth keeps >= 6 votes), up to 2 on a binary
  question (yes/no, small/large): there a flipped vote is the other answer,
  and more of them would hand a blind model credit it did not earn.
  """
  if answer in ('yes', 'no') or answer in scenes.SIZES:
    rate, cap = _pick(rng, (0.0, 0.0, 0.05, 0.15)), 2
  else:
    rate, cap = _pick(rng, (0.0, 0.1, 0.2, 0.3)), 4
  k = min(int(rng.binomial(num, rate)), cap)
  answers = [answer] * num
  for j in rng.choice(num, size=k, replace=False):
    answers[j] = _disagreement(rng, qtype, answer)
  return answers


def make_vqa(seed, split, index, params):
  """(example, [region record]) for VQA question `index` of `split`."""
  rng = _example_rng(seed, 'vqa', split, index)
  plan = _vqa_plan(rng)
  (scene,), (question, answer) = _sample(
      rng, params, lambda s: _vqa_question(s, rng, plan, params.image_size))
  image_id = _image_id(seed, 'vqa', split, index)
  example = {
      'question_id': _int_id(split, index), 'image_id': image_id,
      'question': question[0].upper() + question[1:],
      'answers': annotate(rng, plan['type'], answer),
      'question_type': plan['type'],
      'answer_type': VQA_ANSWER_TYPES[plan['type']],
  }
  return example, [(image_id, scene)]


# ---------------------------------------------------------------------- VE

VE_FAMILIES = ('colour', 'shape', 'size', 'relation')
_VE_DESC = {'colour': (('shape',), ('size', 'shape')),
            'shape': (('colour',), ('size', 'colour')),
            'size': (('shape',), ('colour', 'shape'))}
_VE_DOMAIN = {'colour': COLOUR_NAMES, 'shape': scenes.WORLD_TAGS,
              'size': scenes.SIZES}


def _ve_plan(rng) -> dict:
  plan = {'label': _pick(rng, tasks.VE_LABELS),
          'family': _pick(rng, VE_FAMILIES)}
  if plan['family'] == 'relation':
    plan['a'] = _pick(rng, (('shape',), ('colour', 'shape')))
    plan['b'] = _pick(rng, (('shape',), ('colour', 'shape')))
    plan['rel'] = _pick(rng, tuple(_REL_TEXT))
  else:
    plan['attrs'] = _pick(rng, _VE_DESC[plan['family']])
  return plan


def ve_label(values_per_candidate: list) -> str:
  """VE label from a per-candidate truth list (True/False per object)."""
  if all(values_per_candidate):
    return 'entailment'
  if not any(values_per_candidate):
    return 'contradiction'
  return 'neutral'


def _ve_hypothesis(scene, rng, plan, image_size):
  """A hypothesis text with the plan's label on the scene, or None."""
  obs, label, family = scene.objects, plan['label'], plan['family']
  if family == 'relation':
    if len(obs) < 2:
      return None
    i, j = rng.choice(len(obs), size=2, replace=False)
    da, db = _desc_of(obs[i], plan['a']), _desc_of(obs[j], plan['b'])
    ca, cb = _select(obs, da), _select(obs, db)
    if any(o in cb for o in ca):  # 'The circle is left of the red circle'.
      return None
    truths = [_relation_holds(a, b, plan['rel'], image_size)
              for a in ca for b in cb]
    if None in truths or ve_label(truths) != label:
      return None
    return _sentence(f'the {_phrase(rng, da)} is {_REL_TEXT[plan["rel"]]} '
                     f'the {_phrase(rng, db)}')
  for i in rng.permutation(len(obs)):
    desc = _desc_of(obs[i], plan['attrs'])
    values = sorted({getattr(o, family) for o in _select(obs, desc)})
    if label == 'entailment' and len(values) == 1:
      value = values[0]
    elif label == 'neutral' and len(values) >= 2:
      value = _pick(rng, values)
    elif label == 'contradiction' and len(values) < len(_VE_DOMAIN[family]):
      value = _pick(rng, [v for v in _VE_DOMAIN[family] if v not in values])
    else:
      continue
    break
  else:
    return None
  subject = _phrase(rng, desc)
  if family == 'shape':
    return _sentence(f'the {subject} is {_a(_phrase(rng, {"shape": value}))}')
  if family == 'size':
    value = _pick(rng, _SIZE_WORDS[value])
  return _sentence(f'the {subject} is {value}')


def make_ve(seed, split, index, params):
  rng = _example_rng(seed, 've', split, index)
  plan = _ve_plan(rng)
  (scene,), hypothesis = _sample(
      rng, params, lambda s: _ve_hypothesis(s, rng, plan, params.image_size))
  image_id = _image_id(seed, 've', split, index)
  example = {'pair_id': f'{image_id}-h0', 'image_id': image_id,
             'hypothesis': hypothesis, 'label': plan['label']}
  return example, [(image_id, scene)]


# ------------------------------------------------------------------- NLVR2

NLVR2_TEMPLATES = ('compare', 'both', 'exactly_one', 'neither', 'total')
_NLVR2_PAIRS_PER_SET = 4


def _nlvr2_plan(rng) -> dict:
  plan = {'label': bool(rng.random() < 0.5),
          'template': _pick(rng, NLVR2_TEMPLATES)}
  if plan['template'] in ('compare', 'total'):
    plan['attrs'] = _pick(rng, (('shape',), ('shape',), ('colour',)))
    plan['cmp'] = _pick(rng, ('more', 'fewer', 'same'))
    plan['n'] = int(rng.integers(1, 5))
  else:
    plan['attrs'] = _pick(rng, (('shape',), ('colour',), ('colour', 'shape')))
  return plan


def nlvr2_truth(template: str, left_count: int, right_count: int,
                cmp: str = '', n: int = 0) -> bool:
  """Truth of a template from the counts of its description per image."""
  if template == 'both':
    return left_count > 0 and right_count > 0
  if template == 'exactly_one':
    return (left_count > 0) != (right_count > 0)
  if template == 'neither':
    return left_count == 0 and right_count == 0
  if template == 'total':
    return left_count + right_count == n
  return {'more': left_count > right_count, 'fewer': left_count < right_count,
          'same': left_count == right_count}[cmp]


def _nlvr2_sentence(left, right, rng, plan):
  """A statement with the plan's truth value about (left, right), or None."""
  both = left.objects + right.objects
  # As in VQA 'exists': half the descriptions come from an object, half are
  # random, whatever the label.
  desc = (_desc_of(_pick(rng, both), plan['attrs']) if rng.random() < 0.5
          else _random_desc(rng, plan['attrs']))
  cl, cr = len(_select(left.objects, desc)), len(_select(right.objects, desc))
  t = plan['template']
  if nlvr2_truth(t, cl, cr, plan.get('cmp', ''), plan.get('n', 0)) != plan[
      'label']:
    return None
  if t == 'both':
    text = f'both images contain {_a(_phrase(rng, desc))}'
  elif t == 'exactly_one':
    text = f'exactly one image contains {_a(_phrase(rng, desc))}'
  elif t == 'neither':
    text = f'neither image contains {_a(_phrase(rng, desc))}'
  elif t == 'total':
    n = plan['n']
    text = (f'the two images contain exactly {NUMBER_WORDS[n]} '
            f'{_phrase(rng, desc, number=n)} in total')
  else:
    things = _phrase(rng, desc, number=2)
    text = {'more': f'the left image contains more {things} than the right '
                    f'image',
            'fewer': f'the left image contains fewer {things} than the '
                     f'right image',
            'same': f'the left image contains as many {things} as the '
                    f'right image'}[plan['cmp']]
  return _sentence(text)


def nlvr2_pair_id(seed, split, index) -> str:
  """Official '{split}-{set}-{pair}', the split made unique by the seed."""
  return (f'{split}_s{seed}-{index // _NLVR2_PAIRS_PER_SET}-'
          f'{index % _NLVR2_PAIRS_PER_SET}')


def make_nlvr2(seed, split, index, params):
  rng = _example_rng(seed, 'nlvr2', split, index)
  plan = _nlvr2_plan(rng)
  pair_scenes, sentence = _sample(
      rng, params, lambda l, r: _nlvr2_sentence(l, r, rng, plan), images=2)
  pair = nlvr2_pair_id(seed, split, index)
  image_ids = [f'{pair}-img0', f'{pair}-img1']
  example = {'identifier': f'{pair}-0', 'image_ids': image_ids,
             'sentence': sentence, 'label': plan['label']}
  return example, list(zip(image_ids, pair_scenes))


# --------------------------------------------------------------------- REC

REC_TYPES = ('colour_shape', 'colour', 'size', 'relation', 'extreme')
_EXTREMES = {'left': ('leftmost', 0, 1), 'right': ('rightmost', 0, -1),
             'top': ('topmost', 1, 1), 'bottom': ('lowest', 1, -1)}


def _rec_expression(scene, rng, rtype, image_size):
  """(expression, target object) for a scene with distractors, or None."""
  if len(scene.objects) < 2:
    return None
  for i in rng.permutation(len(scene.objects)):  # Any object may be meant.
    out = _rec_for_target(scene.objects, scene.objects[i], rng, rtype,
                          image_size)
    if out is not None:
      return out
  return None


def _rec_for_target(obs, target, rng, rtype, image_size):
  others = [o for o in obs if o is not target]
  if rtype == 'colour_shape':
    # Unique as a (colour, shape), but colour or shape alone is not.
    desc = _desc_of(target, ('colour', 'shape'))
    shares = any(o.colour == target.colour or o.shape == target.shape
                 for o in others)
    if len(_select(obs, desc)) != 1 or not shares:
      return None
    return f'the {_phrase(rng, desc)}', target
  if rtype == 'colour':  # 'the red object': a distractor has its shape.
    if (len(_select(obs, {'colour': target.colour})) != 1
        or not any(o.shape == target.shape for o in others)):
      return None
    return f'the {_phrase(rng, {"colour": target.colour})}', target
  if rtype == 'size':  # Size is needed: without it two objects fit.
    for attrs in (('shape',), ('colour', 'shape')):
      desc = _desc_of(target, attrs)
      if (len(_select(obs, desc)) >= 2
          and len(_select(obs, dict(desc, size=target.size))) == 1):
        return f'the {_phrase(rng, dict(desc, size=target.size))}', target
    return None
  if rtype == 'relation':  # 'the circle to the left of the blue square'.
    desc = _desc_of(target, _pick(rng, (('shape',), ('colour', 'shape'))))
    cands = _select(obs, desc)
    if len(cands) < 2:
      return None
    for lm, rel in ((lm, rel) for lm in others for rel in _REL_TEXT):
      if lm in cands:
        continue
      lm_desc = _unique_desc(rng, obs, lm, (('shape',), ('colour', 'shape')))
      if lm_desc is None:
        continue
      holds = [_relation_holds(c, lm, rel, image_size) for c in cands]
      if None in holds or sum(holds) != 1 or not holds[cands.index(target)]:
        continue
      return (f'the {_phrase(rng, desc)} {_REL_TEXT[rel]} '
              f'the {_phrase(rng, lm_desc)}'), target
    return None
  # extreme: 'the leftmost star', clearly beyond every other candidate.
  desc = _desc_of(target, _pick(rng, (('shape',), ('colour',))))
  cands = _select(obs, desc)
  if len(cands) < 2:
    return None
  word, axis, sign = _EXTREMES[_pick(rng, tuple(_EXTREMES))]
  coords = sorted(sign * c.center[axis] for c in cands)
  if (sign * target.center[axis] != coords[0]
      or coords[1] - coords[0] <= _DEAD_ZONE * image_size):
    return None
  return f'the {word} {_phrase(rng, desc)}', target


def make_rec(seed, split, index, params):
  rng = _example_rng(seed, 'rec', split, index)
  rtype = _pick(rng, REC_TYPES)
  (scene,), (expression, target) = _sample(
      rng, params,
      lambda s: _rec_expression(s, rng, rtype, params.image_size))
  image_id = _image_id(seed, 'rec', split, index)
  s = params.image_size
  example = {'ref_id': _int_id(split, index), 'sent_id': _int_id(split, index),
             'image_id': image_id, 'expression': expression,
             'target_box': [float(v) / s for v in target.box]}
  return example, [(image_id, scene)]


# --------------------------------------------------------------- retrieval

def make_retrieval(seed, split, index, params, num_captions=5):
  rng = _example_rng(seed, 'retrieval', split, index)
  scene = scenes.sample_scene(rng, params)
  captions = []
  for _ in range(4 * num_captions):  # Prefer distinct captions.
    c = scenes.describe(scene, rng)
    if c not in captions:
      captions.append(c)
    if len(captions) == num_captions:
      break
  while len(captions) < num_captions:  # A one-object scene has few.
    captions.append(scenes.describe(scene, rng))
  image_id = _image_id(seed, 'retrieval', split, index)
  return ({'image_id': image_id, 'captions': captions},
          [(image_id, scene)])


MAKERS = {'vqa': make_vqa, 've': make_ve, 'nlvr2': make_nlvr2,
          'rec': make_rec, 'retrieval': make_retrieval}


def make_example_scenes(task, seed, split, index,
                        params=scenes.WorldParams()):
  """(example, [(image_id, scenes.Scene)]): the example and its true scenes."""
  if task not in MAKERS:
    raise ValueError(f'unknown task {task!r}; tasks are {list(tasks.TASKS)}')
  return MAKERS[task](seed, split, index, params)


def make_example(task, seed, split, index, params=scenes.WorldParams()):
  """(example, region records of its images) for example `index`.

  The detector of image k runs on its own stream [seed, split id, index,
  k + 1], apart from the scene's, so what it misses does not depend on how
  many scenes the plan needed.
  """
  example, images = make_example_scenes(task, seed, split, index, params)
  sid = scenes.split_id(stream_name(task, split))
  recs = [region_record(image_id, scene,
                        np.random.default_rng([seed, sid, index, k + 1]),
                        params)
          for k, (image_id, scene) in enumerate(images)]
  return example, recs


def generate_task_split(task, split, num, params=scenes.WorldParams(), seed=0):
  """([example], [region record]) of a whole task split."""
  examples, regions = [], []
  for i in range(num):
    ex, recs = make_example(task, seed, split, i, params)
    examples.append(ex)
    regions.extend(recs)
  return examples, regions


# --------------------------------------------------------------- baselines

def blind_baseline(examples: list[dict], task: str, train=None,
                   regions=None) -> float:
  """Score of a model that never looks at the image, on `examples`.

  vqa: the most common answer of each question type in `train` (VQA
  accuracy); ve / nlvr2: the majority label of `train` (accuracy); rec:
  the chance that a uniformly random detected region has IoU >= 0.5 with
  the gold box (needs `regions`, a RegionStore or {image_id: record});
  retrieval: recall@1 of a random ranking, 1 / len(examples).
  `train` defaults to `examples` (an optimistic baseline).
  """
  train = examples if train is None else train
  if task == 'vqa':
    per_type = collections.defaultdict(collections.Counter)
    for ex in train:
      per_type[ex['question_type']].update(ex['answers'])
    overall = collections.Counter(a for ex in train for a in ex['answers'])
    best = {t: c.most_common(1)[0][0] for t, c in per_type.items()}
    default = overall.most_common(1)[0][0]
    return float(np.mean([
        task_metrics.vqa_accuracy(best.get(ex['question_type'], default),
                                  ex['answers'])
        for ex in examples]))
  if task in ('ve', 'nlvr2'):
    majority = collections.Counter(
        ex['label'] for ex in train).most_common(1)[0][0]
    return float(np.mean([ex['label'] == majority for ex in examples]))
  if task == 'rec':
    if regions is None:
      raise ValueError('rec baseline needs the region store (regions=...)')
    chances = []
    for ex in examples:
      boxes = np.asarray(regions[ex['image_id']]['region_boxes']).reshape(
          -1, 4)
      gold = np.broadcast_to(np.asarray(ex['target_box'], np.float64),
                             boxes.shape)
      hits = task_metrics.box_iou(boxes, gold) >= 0.5
      chances.append(float(np.mean(hits)) if len(hits) else 0.0)
    return float(np.mean(chances))
  if task == 'retrieval':
    return 1.0 / max(len(examples), 1)
  raise ValueError(f'unknown task {task!r}; tasks are {list(tasks.TASKS)}')


# ------------------------------------------------------------------ writing

def generate(out_dir: str, task_names=tasks.TASKS, splits=None,
             params: scenes.WorldParams = scenes.WorldParams(),
             seed: int = 0) -> dict:
  """Writes every task split, the region store and meta.json to out_dir.

  splits: {split: num_examples}, default train 1000 / val 200 / test 200.
  Returns {'{task}_{split}': path, 'regions': store path}. An existing
  store in out_dir keeps the images no new example replaces, so tasks can
  be generated into one folder one at a time.
  """
  splits = dict(splits or zip(SPLITS, (1000, 200, 200)))
  meta = scenes.make_meta(params, seed, {})
  meta['generator']['name'] = 'cmal_jax.world.task_examples'
  records.check_meta_compatible(out_dir, meta)  # Fail before the long part.
  paths, regions = {}, {}
  for task in task_names:
    for split, num in splits.items():
      examples, recs = generate_task_split(task, split, num, params, seed)
      path = tasks.task_path(out_dir, task, split)
      records.write_records(path, examples)
      paths[f'{task}_{split}'] = path
      meta['splits'][f'{task}_{split}'] = num
      regions.update((r['image_id'], r) for r in recs)
  store = region_store.store_path(out_dir)
  if os.path.exists(region_store.index_path(store)):
    old = region_store.RegionStore(store, params.feature_dim)
    kept = {i: old[i] for i in old.image_ids() if i not in regions}
    regions = {**kept, **regions}
  region_store.write_region_store(store, regions.values(), params.feature_dim)
  paths['regions'] = store
  records.write_meta(out_dir, meta)
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='Dataset directory.')
  ap.add_argument('--tasks', default=','.join(tasks.TASKS))
  ap.add_argument('--num_train', type=int, default=1000)
  ap.add_argument('--num_val', type=int, default=200)
  ap.add_argument('--num_test', type=int, default=200)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--feature_dim', type=int, default=256)
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--images', action='store_true',
                  help='Also store each scene as PNG bytes in the region '
                  'store (a model that reads pixels needs them).')
  a = ap.parse_args(argv)
  task_names = [t.strip() for t in a.tasks.split(',') if t.strip()]
  for t in task_names:
    if t not in tasks.TASKS:
      ap.error(f'unknown task {t!r}; tasks are {",".join(tasks.TASKS)}')
  params = scenes.WorldParams(image_size=a.image_size,
                             feature_dim=a.feature_dim, images=a.images)
  splits = {'train': a.num_train, 'val': a.num_val, 'test': a.num_test}
  t0 = time.time()
  paths = generate(a.out, task_names, splits, params, a.seed)
  print(f'wrote {len(paths) - 1} task splits and {paths["regions"]} to '
        f'{a.out} in {time.time() - t0:.1f}s')
  return paths


if __name__ == '__main__':
  main()
