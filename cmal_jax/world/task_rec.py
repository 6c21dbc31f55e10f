"""Referring expression (REC) examples from the synthetic world (see
task_examples.py).

REC: one expression (ref_id == sent_id) per image, naming an object among
distractors by colour + shape, colour, size, a relation to a landmark or an
extreme position ("the leftmost star"); target_box is the object's true box
/ image size, not a detected one.
"""

from cmal_jax.world.task_common import (
    DEAD_ZONE, REL_TEXT, desc_of, example_image_id, example_rng, int_id,
    phrase, pick, realise_plan, relation_holds, select, unique_desc)

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
    desc = desc_of(target, ('colour', 'shape'))
    shares = any(o.colour == target.colour or o.shape == target.shape
                 for o in others)
    if len(select(obs, desc)) != 1 or not shares:
      return None
    return f'the {phrase(rng, desc)}', target
  if rtype == 'colour':  # 'the red object': a distractor has its shape.
    if (len(select(obs, {'colour': target.colour})) != 1
        or not any(o.shape == target.shape for o in others)):
      return None
    return f'the {phrase(rng, {"colour": target.colour})}', target
  if rtype == 'size':  # Size is needed: without it two objects fit.
    for attrs in (('shape',), ('colour', 'shape')):
      desc = desc_of(target, attrs)
      if (len(select(obs, desc)) >= 2
          and len(select(obs, dict(desc, size=target.size))) == 1):
        return f'the {phrase(rng, dict(desc, size=target.size))}', target
    return None
  if rtype == 'relation':  # 'the circle to the left of the blue square'.
    desc = desc_of(target, pick(rng, (('shape',), ('colour', 'shape'))))
    cands = select(obs, desc)
    if len(cands) < 2:
      return None
    for lm, rel in ((lm, rel) for lm in others for rel in REL_TEXT):
      if lm in cands:
        continue
      lm_desc = unique_desc(rng, obs, lm, (('shape',), ('colour', 'shape')))
      if lm_desc is None:
        continue
      holds = [relation_holds(c, lm, rel, image_size) for c in cands]
      if None in holds or sum(holds) != 1 or not holds[cands.index(target)]:
        continue
      return (f'the {phrase(rng, desc)} {REL_TEXT[rel]} '
              f'the {phrase(rng, lm_desc)}'), target
    return None
  # extreme: 'the leftmost star', clearly beyond every other candidate.
  desc = desc_of(target, pick(rng, (('shape',), ('colour',))))
  cands = select(obs, desc)
  if len(cands) < 2:
    return None
  word, axis, sign = _EXTREMES[pick(rng, tuple(_EXTREMES))]
  coords = sorted(sign * c.center[axis] for c in cands)
  if (sign * target.center[axis] != coords[0]
      or coords[1] - coords[0] <= DEAD_ZONE * image_size):
    return None
  return f'the {word} {phrase(rng, desc)}', target


def make_rec(seed, split, index, params):
  rng = example_rng(seed, 'rec', split, index)
  rtype = pick(rng, REC_TYPES)
  (scene,), (expression, target) = realise_plan(
      rng, params,
      lambda s: _rec_expression(s, rng, rtype, params.image_size))
  image_id = example_image_id(seed, 'rec', split, index)
  s = params.image_size
  example = {'ref_id': int_id(split, index), 'sent_id': int_id(split, index),
             'image_id': image_id, 'expression': expression,
             'target_box': [float(v) / s for v in target.box]}
  return example, [(image_id, scene)]
