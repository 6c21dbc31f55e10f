"""Visual entailment examples from the synthetic world (see
task_examples.py).

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
"""

from cmal_jax.data import tasks
from cmal_jax.world import scenes
from cmal_jax.world.task_common import (
    COLOUR_NAMES, REL_TEXT, SIZE_WORDS, a_an, as_sentence, desc_of,
    example_image_id, example_rng, phrase, pick, realise_plan, relation_holds,
    select)

VE_FAMILIES = ('colour', 'shape', 'size', 'relation')
_VE_DESC = {'colour': (('shape',), ('size', 'shape')),
            'shape': (('colour',), ('size', 'colour')),
            'size': (('shape',), ('colour', 'shape'))}
_VE_DOMAIN = {'colour': COLOUR_NAMES, 'shape': scenes.WORLD_TAGS,
              'size': scenes.SIZES}


def _ve_plan(rng) -> dict:
  plan = {'label': pick(rng, tasks.VE_LABELS),
          'family': pick(rng, VE_FAMILIES)}
  if plan['family'] == 'relation':
    plan['a'] = pick(rng, (('shape',), ('colour', 'shape')))
    plan['b'] = pick(rng, (('shape',), ('colour', 'shape')))
    plan['rel'] = pick(rng, tuple(REL_TEXT))
  else:
    plan['attrs'] = pick(rng, _VE_DESC[plan['family']])
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
    da, db = desc_of(obs[i], plan['a']), desc_of(obs[j], plan['b'])
    ca, cb = select(obs, da), select(obs, db)
    if any(o in cb for o in ca):  # 'The circle is left of the red circle'.
      return None
    truths = [relation_holds(a, b, plan['rel'], image_size)
              for a in ca for b in cb]
    if None in truths or ve_label(truths) != label:
      return None
    return as_sentence(f'the {phrase(rng, da)} is {REL_TEXT[plan["rel"]]} '
                       f'the {phrase(rng, db)}')
  for i in rng.permutation(len(obs)):
    desc = desc_of(obs[i], plan['attrs'])
    values = sorted({getattr(o, family) for o in select(obs, desc)})
    if label == 'entailment' and len(values) == 1:
      value = values[0]
    elif label == 'neutral' and len(values) >= 2:
      value = pick(rng, values)
    elif label == 'contradiction' and len(values) < len(_VE_DOMAIN[family]):
      value = pick(rng, [v for v in _VE_DOMAIN[family] if v not in values])
    else:
      continue
    break
  else:
    return None
  subject = phrase(rng, desc)
  if family == 'shape':
    return as_sentence(
        f'the {subject} is {a_an(phrase(rng, {"shape": value}))}')
  if family == 'size':
    value = pick(rng, SIZE_WORDS[value])
  return as_sentence(f'the {subject} is {value}')


def make_ve(seed, split, index, params):
  rng = example_rng(seed, 've', split, index)
  plan = _ve_plan(rng)
  (scene,), hypothesis = realise_plan(
      rng, params, lambda s: _ve_hypothesis(s, rng, plan, params.image_size))
  image_id = example_image_id(seed, 've', split, index)
  example = {'pair_id': f'{image_id}-h0', 'image_id': image_id,
             'hypothesis': hypothesis, 'label': plan['label']}
  return example, [(image_id, scene)]
