"""Image-text retrieval examples from the synthetic world (see
task_examples.py): each image with num_captions descriptions of its scene
(scenes.describe), distinct where the scene allows."""

from cmal_jax.world import scenes
from cmal_jax.world.task_common import example_image_id, example_rng


def make_retrieval(seed, split, index, params, num_captions=5):
  rng = example_rng(seed, 'retrieval', split, index)
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
  image_id = example_image_id(seed, 'retrieval', split, index)
  return ({'image_id': image_id, 'captions': captions},
          [(image_id, scene)])
