"""Blind baselines of the task examples: the score of a model that never
looks at the image (what a task's metric must beat to show the image was
used)."""

import collections

import numpy as np

from cmal_jax import task_metrics
from cmal_jax.data import pair_source
from cmal_jax.data import task_pipeline
from cmal_jax.data import tasks


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


def blind_baseline_of(directory, task, splits, on_error='raise',
                      pixels=False):
  """{split: blind_baseline} of a task folder's splits, priors from its
  train split read once for all (rec needs none: its boxes come from the
  folder's region store, or with pixels its image store). on_error='skip':
  bad records are left out, as the evaluation that counts them does."""
  read = lambda split: [ex for ex in task_pipeline.read_task_examples(
      directory, task, split, on_error) if ex is not None]
  if task != 'rec':
    train = read('train')
    return {split: blind_baseline(read(split), task, train)
            for split in splits}
  store = pair_source.open_store(directory, pixels=pixels, feature_dim=None)
  out = {}
  for split in splits:
    regions, examples = _readable_regions(store, read(split), on_error)
    out[split] = blind_baseline(examples, task, regions=regions)
  return out


def _readable_regions(store, examples, on_error):
  """({image_id: record}, the examples whose image the store gives), each
  image read once. With on_error='skip' an example whose image the store
  cannot give is left out, as evaluation leaves it; otherwise the store's
  error is raised."""
  regions, kept = {}, []
  for ex in examples:
    image_id = ex['image_id']
    if image_id not in regions:
      try:
        regions[image_id] = store[image_id]
      except (KeyError, OSError, ValueError):  # RecordError, ImageError too.
        if on_error != 'skip':
          raise
        continue
    kept.append(ex)
  return regions, kept
