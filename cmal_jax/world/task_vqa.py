"""VQA examples from the synthetic world (see task_examples.py).

VQA has 10 annotator answers per question: the truth, except 0-4 who give
a synonym ('disc' for circle), a confusable colour or shape, or a
neighbouring count (0-2 on yes/no and small/large questions).
"""

import numpy as np

from cmal_jax.world import scenes
from cmal_jax.world.task_common import (
    COLOUR_NAMES, GENERIC, NOUNS, REL_TEXT, a_an, desc_of, example_image_id,
    example_rng, int_id, phrase, pick, random_desc, realise_plan,
    relation_holds, select, unique_desc)

VQA_TYPES = ('colour', 'shape', 'count', 'exists', 'relation', 'size')
VQA_ANSWER_TYPES = {'colour': 'other', 'shape': 'other', 'count': 'number',
                    'exists': 'yes/no', 'relation': 'other', 'size': 'other'}
_COUNT_WEIGHTS = np.array([0.25, 0.3, 0.25, 0.2])  # Answers 0..3.

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


def _vqa_plan(rng) -> dict:
  qtype = pick(rng, VQA_TYPES)
  plan = {'type': qtype}
  if qtype == 'colour':
    plan['answer'] = pick(rng, COLOUR_NAMES)
  elif qtype in ('shape', 'relation'):
    plan['answer'] = pick(rng, scenes.WORLD_TAGS)
  elif qtype == 'size':
    plan['answer'] = pick(rng, scenes.SIZES)
  elif qtype == 'exists':
    plan['answer'] = pick(rng, ('yes', 'no'))
    plan['attrs'] = pick(rng, (('shape',), ('colour', 'shape'),
                               ('colour', 'shape'), ('colour',)))
  else:  # count
    plan['of'] = pick(rng, ('shape', 'shape', 'colour', 'all'))
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
    for ob in select(obs, {qtype: answer}):
      desc = unique_desc(rng, obs, ob, options)
      if desc is None:
        continue
      # Not 'what shape is the red shape?'.
      p = phrase(rng, desc, generic=('object', 'thing'))
      if qtype == 'colour':
        return f'what colour is the {p}?', answer
      if qtype == 'shape':
        return f'what shape is the {p}?', answer
      return pick(rng, (f'is the {p} small or large?',
                        f'what size is the {p}?')), answer
    return None
  if qtype == 'count':
    n = int(answer)
    if plan['of'] == 'all':
      if len(obs) != n:
        return None
      return f'how many {scenes.plural(pick(rng, GENERIC))} are there?', answer
    attr = plan['of']
    domain = scenes.WORLD_TAGS if attr == 'shape' else COLOUR_NAMES
    values = [v for v in domain if len(select(obs, {attr: v})) == n]
    if not values:
      return None
    p = phrase(rng, {attr: pick(rng, values)}, number=2)
    return f'how many {p} are there?', answer
  if qtype == 'exists':
    # Half the descriptions come from an object, half are random: the
    # same procedure for both answers, so the text does not tell them apart.
    desc = (desc_of(pick(rng, obs), plan['attrs']) if rng.random() < 0.5
            else random_desc(rng, plan['attrs']))
    present = bool(select(obs, desc))
    if present != (answer == 'yes'):
      return None
    return f'is there {a_an(phrase(rng, desc))}?', answer
  # relation: 'what is to the left of the green cross?' -> the one object.
  for k in rng.permutation(len(obs) * len(REL_TEXT)):
    anchor, rel = obs[k // len(REL_TEXT)], tuple(REL_TEXT)[k % len(REL_TEXT)]
    desc = unique_desc(rng, obs, anchor, (('shape',), ('colour', 'shape')))
    if desc is None:
      continue
    holds = [relation_holds(o, anchor, rel, image_size)
             for o in obs if o is not anchor]
    if None in holds or sum(holds) != 1:
      continue
    target = [o for o in obs if o is not anchor][holds.index(True)]
    if target.shape != answer:
      continue
    return f'what is {REL_TEXT[rel]} the {phrase(rng, desc)}?', answer
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
    return pick(rng, _COLOUR_CONFUSIONS[answer])
  # A shape: a synonym ('disc' for circle) where there is one, else a
  # shape it is confused with.
  options = NOUNS[answer][1:] + _SHAPE_CONFUSIONS[answer]
  return pick(rng, options)


def annotate(rng, qtype: str, answer: str, num: int = 10) -> list[str]:
  """`num` annotators' answers: the truth, except a few who disagree.

  Up to 4 disagree (the truth keeps >= 6 votes), up to 2 on a binary
  question (yes/no, small/large): there a flipped vote is the other answer,
  and more of them would hand a blind model credit it did not earn.
  """
  if answer in ('yes', 'no') or answer in scenes.SIZES:
    rate, cap = pick(rng, (0.0, 0.0, 0.05, 0.15)), 2
  else:
    rate, cap = pick(rng, (0.0, 0.1, 0.2, 0.3)), 4
  k = min(int(rng.binomial(num, rate)), cap)
  answers = [answer] * num
  for j in rng.choice(num, size=k, replace=False):
    answers[j] = _disagreement(rng, qtype, answer)
  return answers


def make_vqa(seed, split, index, params):
  """(example, [region record]) for VQA question `index` of `split`."""
  rng = example_rng(seed, 'vqa', split, index)
  plan = _vqa_plan(rng)
  (scene,), (question, answer) = realise_plan(
      rng, params, lambda s: _vqa_question(s, rng, plan, params.image_size))
  image_id = example_image_id(seed, 'vqa', split, index)
  example = {
      'question_id': int_id(split, index), 'image_id': image_id,
      'question': question[0].upper() + question[1:],
      'answers': annotate(rng, plan['type'], answer),
      'question_type': plan['type'],
      'answer_type': VQA_ANSWER_TYPES[plan['type']],
  }
  return example, [(image_id, scene)]
