"""What the task generators (task_vqa.py, task_ve.py, task_nlvr2.py,
task_rec.py, task_retrieval.py) share: facts about a scene's objects (which
fit a description {attribute: value}, where one is relative to another),
their wording, sampling scenes until one realises an example's plan, and
each example's random stream and ids.

Relations use object centres with a dead zone of 6 % of the image size:
scenes where an object is too close to call are rejected, so every label
is decided by the pixels (occlusion is at most 20 %, so counts are too).
"""

import numpy as np

from cmal_jax.world import scenes

COLOUR_NAMES = tuple(scenes.COLOURS)
# Nouns for each tag, canonical first (scenes.WORLD_SYNONYMS keeps order).
NOUNS = {tag: tuple(w for w, t in scenes.WORLD_SYNONYMS.items() if t == tag)
         for tag in scenes.WORLD_TAGS}
SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
GENERIC = ('object', 'shape', 'thing')  # Nouns that name no tag.
DEAD_ZONE = 0.06   # Fraction of the image size: relations closer are unsure.
_MAX_TRIES = 3000   # Scenes sampled per example before giving up (a bug).


# ------------------------------------------------------------- scene facts

def pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _matches(ob, desc: dict) -> bool:
  return all(getattr(ob, k) == v for k, v in desc.items())


def select(objects, desc: dict) -> list:
  """Objects that fit a description {attribute: value}."""
  return [o for o in objects if _matches(o, desc)]


def desc_of(ob, attrs) -> dict:
  return {a: getattr(ob, a) for a in attrs}


def random_desc(rng, attrs) -> dict:
  domain = {'shape': scenes.WORLD_TAGS, 'colour': COLOUR_NAMES,
            'size': scenes.SIZES}
  return {a: pick(rng, domain[a]) for a in attrs}


def phrase(rng, desc: dict, number: int = 1, generic=GENERIC) -> str:
  """'small red disc', 'red objects': size, colour, then a noun or generic."""
  words = []
  if 'size' in desc:
    words.append(pick(rng, SIZE_WORDS[desc['size']]))
  if 'colour' in desc:
    words.append(desc['colour'])
  if 'shape' in desc:  # Canonical half the time, else any synonym.
    noun = (desc['shape'] if rng.random() < 0.5
            else pick(rng, NOUNS[desc['shape']]))
  else:
    noun = pick(rng, generic)
  words.append(noun if number == 1 else scenes.plural(noun))
  return ' '.join(words)


def a_an(words: str) -> str:
  return ('an ' if words[0] in 'aeiou' else 'a ') + words


def as_sentence(text: str) -> str:
  return text[0].upper() + text[1:] + '.'


REL_TEXT = {'left': 'to the left of', 'right': 'to the right of',
            'above': 'above', 'below': 'below'}


def relation_holds(a, b, rel: str, image_size: int):
  """Is a `rel` b (by centres)? None when too close to call."""
  dx = b.center[0] - a.center[0]  # > 0: a is left of b.
  dy = b.center[1] - a.center[1]  # > 0: a is above b (y points down).
  d = {'left': dx, 'right': -dx, 'above': dy, 'below': -dy}[rel]
  if abs(d) <= DEAD_ZONE * image_size:
    return None
  return bool(d > 0)


def unique_desc(rng, objects, ob, attr_options):
  """A description of `ob` (one of attr_options) that fits only `ob`."""
  for i in rng.permutation(len(attr_options)):
    desc = desc_of(ob, attr_options[i])
    if len(select(objects, desc)) == 1:
      return desc
  return None


def realise_plan(rng, params, build, images=1):
  """Samples `images` scenes until build(*scenes) is not None."""
  for _ in range(_MAX_TRIES):
    sampled = [scenes.sample_scene(rng, params) for _ in range(images)]
    out = build(*sampled)
    if out is not None:
      return sampled, out
  raise RuntimeError(f'no scene realised the plan in {_MAX_TRIES} tries')


def stream_name(task: str, split: str) -> str:
  """Random-stream / image-id prefix of a task split: 'task-vqa-train'."""
  return f'task-{task}-{split}'


def example_rng(seed, task, split, index):
  return np.random.default_rng(
      [seed, scenes.split_id(stream_name(task, split)), index])


def example_image_id(seed, task, split, index):
  return f'{stream_name(task, split)}-{seed}-{index:07d}'


def int_id(split: str, index: int) -> int:
  """Dataset-unique integer ids (question_id, ref_id): split offset + i."""
  offset = {'train': 0, 'val': 1, 'test': 2}.get(split)
  if offset is None:
    offset = 3 + scenes.split_id(split) % 997
  return offset * 10_000_000 + index

