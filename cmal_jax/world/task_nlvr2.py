"""NLVR2 examples from the synthetic world (see task_examples.py).

NLVR2 statements ("Both images contain a red star.", "The left image
contains more circles than the right image.", "Exactly one image contains a
star.", "Neither image ...", "The two images contain exactly two circles in
total.") are judged on both scenes; True/False is drawn 50/50 first.
"""

from cmal_jax.world.task_common import (
    a_an, as_sentence, desc_of, example_rng, phrase, pick, random_desc,
    realise_plan, select)

NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six')
NLVR2_TEMPLATES = ('compare', 'both', 'exactly_one', 'neither', 'total')
_NLVR2_PAIRS_PER_SET = 4


def _nlvr2_plan(rng) -> dict:
  plan = {'label': bool(rng.random() < 0.5),
          'template': pick(rng, NLVR2_TEMPLATES)}
  if plan['template'] in ('compare', 'total'):
    plan['attrs'] = pick(rng, (('shape',), ('shape',), ('colour',)))
    plan['cmp'] = pick(rng, ('more', 'fewer', 'same'))
    plan['n'] = int(rng.integers(1, 5))
  else:
    plan['attrs'] = pick(rng, (('shape',), ('colour',), ('colour', 'shape')))
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
  desc = (desc_of(pick(rng, both), plan['attrs']) if rng.random() < 0.5
          else random_desc(rng, plan['attrs']))
  cl, cr = len(select(left.objects, desc)), len(select(right.objects, desc))
  t = plan['template']
  if nlvr2_truth(t, cl, cr, plan.get('cmp', ''), plan.get('n', 0)) != plan[
      'label']:
    return None
  if t == 'both':
    text = f'both images contain {a_an(phrase(rng, desc))}'
  elif t == 'exactly_one':
    text = f'exactly one image contains {a_an(phrase(rng, desc))}'
  elif t == 'neither':
    text = f'neither image contains {a_an(phrase(rng, desc))}'
  elif t == 'total':
    n = plan['n']
    text = (f'the two images contain exactly {NUMBER_WORDS[n]} '
            f'{phrase(rng, desc, number=n)} in total')
  else:
    things = phrase(rng, desc, number=2)
    text = {'more': f'the left image contains more {things} than the right '
                    f'image',
            'fewer': f'the left image contains fewer {things} than the '
                     f'right image',
            'same': f'the left image contains as many {things} as the '
                    f'right image'}[plan['cmp']]
  return as_sentence(text)


def nlvr2_pair_id(seed, split, index) -> str:
  """Official '{split}-{set}-{pair}', the split made unique by the seed."""
  return (f'{split}_s{seed}-{index // _NLVR2_PAIRS_PER_SET}-'
          f'{index % _NLVR2_PAIRS_PER_SET}')


def make_nlvr2(seed, split, index, params):
  rng = example_rng(seed, 'nlvr2', split, index)
  plan = _nlvr2_plan(rng)
  pair_scenes, sentence = realise_plan(
      rng, params, lambda l, r: _nlvr2_sentence(l, r, rng, plan), images=2)
  pair = nlvr2_pair_id(seed, split, index)
  image_ids = [f'{pair}-img0', f'{pair}-img1']
  example = {'identifier': f'{pair}-0', 'image_ids': image_ids,
             'sentence': sentence, 'label': plan['label']}
  return example, list(zip(image_ids, pair_scenes))
