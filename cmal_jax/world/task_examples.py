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

The generators live one task per module (task_vqa.py, task_ve.py,
task_nlvr2.py, task_rec.py, task_retrieval.py; what they share in
task_common.py); task_baselines.py scores a model that never sees the image.
"""

import argparse
import time

import numpy as np

from cmal_jax import cli_errors
from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks
from cmal_jax.world import scenes
from cmal_jax.world.task_common import stream_name
from cmal_jax.world.task_nlvr2 import make_nlvr2
from cmal_jax.world.task_rec import make_rec
from cmal_jax.world.task_retrieval import make_retrieval
from cmal_jax.world.task_ve import make_ve
from cmal_jax.world.task_vqa import make_vqa

SPLITS = ('train', 'val', 'test')
MAKERS = {'vqa': make_vqa, 've': make_ve, 'nlvr2': make_nlvr2,
          'rec': make_rec, 'retrieval': make_retrieval}


# ---------------------------------------------------------------- examples

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
  region_store.add_to_store(store, regions.values(), params.feature_dim,
                            replaced=regions)
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
  cli_errors.add_verbose_flag(ap)
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
  cli_errors.run_tool('task_examples', main)
