"""Grain input pipeline for fine-tuning on the downstream tasks.

  {task}_{split}.array_record (tasks.py schema) -> decode + check fields,
     fetch the image(s) from the region store (errors name file and record)
  -> seeded shuffle, reshuffled every epoch (train) -> this process's slice
  -> batch of raw examples -> random_map: tokenise, keep the R most
     confident regions, pad, task targets, stack.

CMAP is off in fine-tuning, so no anchors. Every batch holds, besides the
task's arrays, `example_index` [B] int32 (the record index in the split
file, to map predictions back to examples) and `stats` {key: [B] int32}
(TASK_STAT_KEYS[task]), per example like pre-training's batch['stats'].

Per example (T text, R regions, F region features, V answers):
  all but nlvr2: input_ids, text_mask [T] int32; region_feats [R, F] f32,
      region_boxes [R, 4] f32, region_mask [R] int32. A model that reads
      pixels gets images [S, S, 3] uint8 in place of region_feats, from the
      folder's image store (image_store.open_image_store), and for an
      image without boxes (or model.visual.boxes='grid') its G x G grid.
  vqa:       targets [V] f32 (min(n/3, 1) per answer), question_id int32.
  ve:        label int32 (index in tasks.VE_LABELS).
  nlvr2:     the above with a leading image axis: input_ids, text_mask
             [2, T] (the sentence twice), region_* [2, R, ...]; label int32
             (1 = True). flatten_image_pairs makes the model's [2B] rows.
  rec:       region_iou [R] f32 (0 on padding), gold_region int32 (argmax
             IoU), target_box [4] f32.
  retrieval: itm_label int32 (1 = the image's own caption).

Every random choice is a function of (seed, batch index), as in pipeline.py.
"""

import json
import os

import dataclasses

import grain
import numpy as np

from cmal_jax import task_metrics
from cmal_jax.data import image_store
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks
from cmal_jax.data.shapes import Shapes, check_feature_dim
from cmal_jax.data.tokenizer import load_tokenizer

ANSWER_VOCAB_FILE = 'answer_vocab.json'
DEFAULT_NUM_ANSWERS = 100
DEFAULT_ITM_NEG_PROB = 0.5
DEFAULT_ITM_GROUP = 8

# The example field holding the text fed with the image (retrieval: one of
# its `captions`, chosen per batch).
TEXT_FIELDS = {'vqa': 'question', 've': 'hypothesis', 'nlvr2': 'sentence',
               'rec': 'expression'}

# Per-example counters, batch['stats'][key] [B] int32 (summed by the train
# and eval loops, like pipeline.STAT_KEYS). nlvr2: regions_truncated counts
# the example's images (0-2) with more than R regions; captions_truncated
# counts the sentence once.
COMMON_STAT_KEYS = ('examples', 'captions_truncated', 'regions_truncated')
TASK_STAT_KEYS = {
    # Questions none of whose answers is in the vocabulary: all-zero targets.
    'vqa': COMMON_STAT_KEYS + ('vqa_no_target',),
    've': COMMON_STAT_KEYS,
    'nlvr2': COMMON_STAT_KEYS,
    # No kept region has IoU >= 0.5 with the target: the example is
    # evaluated anyway (a sure miss), so REC accuracy stays comparable.
    'rec': COMMON_STAT_KEYS + ('rec_target_missed',),
    'retrieval': COMMON_STAT_KEYS + ('itm_negatives',),
}
# REC's hit criterion (task_metrics.rec_accuracy's default).
REC_IOU_THRESHOLD = 0.5

# nlvr2 arrays with the [B, 2, ...] image axis (flatten_image_pairs); a
# batch holds region_feats or (pixels) images.
PAIR_KEYS = ('input_ids', 'text_mask', 'region_feats', 'images',
             'region_boxes', 'region_mask')

_HOW_TO_CREATE = ('create task data with: python -m cmal_jax.world.task_examples '
                  '--out=DIR, or the readers in cmal_jax/convert/formats/')


# ------------------------------------------------------------------ config

def _get(section, name, default):
  """config.<section>.<name>, or default when either is missing: the task
  fields are not in every config yet."""
  return section.get(name, default) if hasattr(section, 'get') else default


def task_shapes(config):
  """Shapes with no anchors (CMAP is off in fine-tuning)."""
  return dataclasses.replace(Shapes.from_config(config),
                             max_anchors=0)


def open_store(directory, shapes):
  """The folder's visual side: its region store, or for pixels its image
  store (image_store.open_image_store)."""
  if shapes.pixels:
    return image_store.open_image_store(directory)
  return region_store.RegionStore(region_store.store_path(directory),
                                  feature_dim=shapes.feature_dim)


def num_answers_of(config):
  """config.finetune.num_answers (default 100; pre-training configs have no
  finetune section)."""
  return int(_get(config.get('finetune'), 'num_answers', DEFAULT_NUM_ANSWERS))


# --------------------------------------------------------------- decoding

def _as_list(value):
  """msgpack_restore turns an empty list into {}; give it back as [].
  Anything else but a list or tuple is left for the type checks to refuse
  (list('a str') would pass them as a list of characters)."""
  if isinstance(value, dict) and not value:
    return []
  return list(value) if isinstance(value, tuple) else value


def _is_str_list(value):
  return isinstance(value, (list, tuple)) and all(
      isinstance(v, str) for v in value)


def validate_task_example(example, task, *, path, index):
  """Checks a decoded task example (fields of tasks.TASK_FIELDS[task] and
  the types fine-tuning relies on). Returns it, lists restored.

  Raises records.RecordError naming path, record index and field.
  """
  err = lambda field, problem: records.RecordError(path, index, field,
                                                   problem)
  if not isinstance(example, dict):
    raise err('*', f'expected a dict, got {type(example).__name__}')
  for field in tasks.TASK_FIELDS[task]:
    if field not in example:
      raise err(field, f'missing (a {task} example has '
                f'{", ".join(tasks.TASK_FIELDS[task])})')
  ex = dict(example)
  for field in ('answers', 'captions', 'image_ids'):
    if field in ex:
      ex[field] = _as_list(ex[field])
  for field in (TEXT_FIELDS.get(task), 'image_id'):
    if field in ex and not isinstance(ex[field], str):
      raise err(field, f'expected str, got {type(ex[field]).__name__}')
  if task == 'vqa':
    q = ex['question_id']
    # int32 in the batch; VQA v2's ids fit.
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not (
        0 <= q < 2**31):
      raise err('question_id', f'expected an int in [0, 2^31), got {q!r}')
    if not _is_str_list(ex['answers']):
      raise err('answers', 'expected a list of str')
  elif task == 've' and ex['label'] not in tasks.VE_LABELS:
    raise err('label', f'{ex["label"]!r} is not one of {tasks.VE_LABELS}')
  elif task == 'nlvr2':
    if not _is_str_list(ex['image_ids']) or len(ex['image_ids']) != 2:
      raise err('image_ids', 'expected [left, right] image ids (str)')
    if not isinstance(ex['label'], (bool, np.bool_)):
      raise err('label', f'expected a bool, got {ex["label"]!r}')
  elif task == 'rec':
    try:
      box = np.asarray(ex['target_box'], np.float32)
    except (TypeError, ValueError) as e:
      raise err('target_box', f'not 4 numbers: {e}') from None
    if box.shape != (4,) or not np.all(np.isfinite(box)):
      raise err('target_box', f'expected 4 finite numbers, got '
                f'{ex["target_box"]!r}')
    ex['target_box'] = box
  elif task == 'retrieval':
    if not _is_str_list(ex['captions']) or not ex['captions']:
      raise err('captions', 'expected a non-empty list of str')
  return ex


def decode_task_record(raw, task, *, path, index):
  """Record bytes -> validated task example."""
  example = records.decode_record_at(raw, path, index)
  return validate_task_example(example, task, path=path, index=index)


def image_ids_of(example, task):
  """The ids of the images an example shows, in input order."""
  return list(example['image_ids']) if task == 'nlvr2' else [
      example['image_id']]


class TaskDecoder:
  """Map step: position -> {'example', 'images': [region record], 'index',
  'valid'}. Positions past the split's end (evaluation pads to whole
  batches) repeat the last record with valid=False. A missing image id
  raises the store's KeyError with the task file and record index
  prepended."""

  def __init__(self, source, store, *, task, path):
    self.source, self.store, self.task, self.path = source, store, task, path

  def __call__(self, position):
    index = min(int(position), len(self.source) - 1)
    # source[index] itself raises a RecordError for an unreadable record.
    example = decode_task_record(self.source[index], self.task,
                                 path=self.path, index=index)
    try:
      images = [self.store[i] for i in image_ids_of(example, self.task)]
    except KeyError as e:
      raise KeyError(f'{self.path}: record {index}: {e.args[0]}') from None
    return dict(example=example, images=images, index=index,
                valid=int(position) < len(self.source))


# ------------------------------------------------------- answer vocabulary

def read_task_examples(directory, task, split):
  """Every validated example of a task split (small fields only: no
  regions are read)."""
  path = task_file(directory, task, split)
  source = records.open_source(path)
  return [decode_task_record(source[i], task, path=path, index=i)
          for i in range(len(source))]


def load_or_build_answer_vocab(directory, num_answers):
  """The VQA answer vocabulary of a dataset folder: [V <= num_answers] str.

  Built from vqa_train's answers (task_metrics.build_answer_vocab, top
  num_answers) and written to directory/answer_vocab.json; read from there
  when present, so val and test (and later runs) use the train vocabulary.
  A file built with another num_answers, or from a vqa_train with another
  number of questions (regenerated data), is rebuilt from vqa_train.
  """
  path = os.path.join(directory, ANSWER_VOCAB_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    train_path = tasks.task_path(directory, 'vqa', 'train')
    stale = os.path.exists(train_path) and (
        len(records.open_source(train_path)) != saved.get('num_questions'))
    if saved.get('num_answers') == num_answers and not stale:
      return list(saved['answers'])
  train = read_task_examples(directory, 'vqa', 'train')
  answers = task_metrics.build_answer_vocab(
      [ex['answers'] for ex in train], num_answers)
  # Per-process temp name: every process of a run may build it at once;
  # each writes the same content and the rename is atomic.
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(dict(num_answers=num_answers, source='vqa_train',
                   num_questions=len(train), answers=answers), f, indent=1)
  os.replace(tmp, path)
  return answers


# --------------------------------------------------------------- encoding

def encode_text(text, tokenizer, max_text_len):
  """Tokenise and pad: (input_ids [T] int32, text_mask [T] int32,
  truncated bool)."""
  enc = tokenizer.encode(text, max_text_len)
  arrays = pipeline.pad_text(enc, max_text_len)
  return arrays['input_ids'], arrays['text_mask'], bool(enc.truncated)


def encode_regions(image, shapes):
  """pipeline.pad_visual: ({region_feats [R, F] (pixels: images [S, S, 3]),
  region_boxes [R, 4], region_mask [R]}, truncated bool)."""
  arrays, _ = pipeline.pad_visual(image, shapes)
  return arrays, pipeline.regions_truncated(image, shapes)


def encode_example(text, image, tokenizer, shapes):
  """One text + one image -> (arrays, stats) (see the module docstring)."""
  ids, mask, text_cut = encode_text(text, tokenizer, shapes.max_text_len)
  arrays, regions_cut = encode_regions(image, shapes)
  arrays.update(input_ids=ids, text_mask=mask)
  stats = dict(examples=1, captions_truncated=int(text_cut),
               regions_truncated=int(regions_cut))
  return arrays, stats


def rec_region_iou(region_boxes, region_mask, target_box):
  """IoU of each region slot with the target: [R, 4], [R], [4] -> [R] f32,
  0 on padding."""
  target = np.broadcast_to(np.asarray(target_box, np.float32),
                           region_boxes.shape)
  iou = task_metrics.box_iou(region_boxes, target).astype(np.float32)
  return np.where(region_mask > 0, iou, 0.0).astype(np.float32)


def pick_retrieval_captions(examples, rng, train):
  """The caption each image is paired with as a positive: train, one of its
  captions at random (a new draw every epoch); eval, captions[0]."""
  if not train:
    return [ex['captions'][0] for ex in examples]
  return [ex['captions'][int(rng.integers(len(ex['captions'])))]
          for ex in examples]


class TaskBatchEncoder:
  """random_map step: a list of decoded examples (TaskDecoder) -> a batch.

  answer_vocab: the VQA answers (vqa only).
  """

  def __init__(self, config, task, *, train, answer_vocab=None,
               process_index=0):
    self.task, self.train = task, train
    # Training draws per group of rows of the global batch (pipeline.
    # row_groups), so a batch does not depend on the number of processes.
    self.group = _get(config.data, 'itm_group', DEFAULT_ITM_GROUP)
    self.process_index = process_index
    self.shapes = task_shapes(config)
    self.vocab_path = _get(config.data, 'vocab_path', '') or None
    self.neg_prob = _get(config.data, 'itm_neg_prob', DEFAULT_ITM_NEG_PROB)
    self.answer_vocab = answer_vocab
    self.answer_index = (task_metrics.vocab_index(answer_vocab)
                         if answer_vocab is not None else None)
    if task == 'vqa' and answer_vocab is None:
      raise ValueError('the vqa batches need answer_vocab')

  def __call__(self, items, rng):
    tokenizer = load_tokenizer(self.vocab_path)  # Cached per process.
    if self.task == 'retrieval':
      rows = self._retrieval_rows(items, tokenizer, rng)
    else:
      rows = [self._row(it, tokenizer) for it in items]
    arrays = [a for a, _ in rows]
    batch = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
    batch['example_index'] = np.asarray([it['index'] for it in items],
                                        np.int32)
    valid = np.asarray([it.get('valid', True) for it in items], bool)
    batch['valid'] = valid
    # Per example (not per batch), so they shard with the batch and sum to
    # global totals on any mesh and number of processes; padding rows count
    # nothing.
    batch['stats'] = {k: np.asarray([s[k] for _, s in rows], np.int32) * valid
                      for k in TASK_STAT_KEYS[self.task]}
    return batch

  def _row(self, item, tokenizer):
    """(arrays, stats) of one example of a non-retrieval task."""
    ex, images = item['example'], item['images']
    if self.task == 'nlvr2':
      return self._nlvr2_row(ex, images, tokenizer)
    arrays, stats = encode_example(ex[TEXT_FIELDS[self.task]], images[0],
                                   tokenizer, self.shapes)
    if self.task == 'vqa':
      indices, scores = task_metrics.soft_targets(ex['answers'],
                                                  self.answer_index)
      arrays['targets'] = np.zeros(len(self.answer_vocab), np.float32)
      arrays['targets'][indices] = scores
      arrays['question_id'] = np.int32(ex['question_id'])
      stats['vqa_no_target'] = int(indices.size == 0)
    elif self.task == 've':
      arrays['label'] = np.int32(tasks.VE_LABELS.index(ex['label']))
    elif self.task == 'rec':
      iou = rec_region_iou(arrays['region_boxes'], arrays['region_mask'],
                           ex['target_box'])
      arrays.update(region_iou=iou, gold_region=np.int32(np.argmax(iou)),
                    target_box=np.asarray(ex['target_box'], np.float32))
      stats['rec_target_missed'] = int(not iou.max() >= REC_IOU_THRESHOLD)
    return arrays, stats

  def _nlvr2_row(self, ex, images, tokenizer):
    """Both images with the sentence: arrays with a leading axis of 2."""
    pair = [encode_example(ex['sentence'], image, tokenizer, self.shapes)
            for image in images]
    arrays = {k: np.stack([a[k] for a, _ in pair]) for k in pair[0][0]}
    arrays['label'] = np.int32(bool(ex['label']))
    stats = dict(examples=1,
                 captions_truncated=pair[0][1]['captions_truncated'],
                 regions_truncated=sum(s['regions_truncated']
                                       for _, s in pair))
    return arrays, stats

  def _retrieval_rows(self, items, tokenizer, rng):
    """ITM rows: each image with its own caption, or (with probability
    itm_neg_prob) the caption of another image of its group of rows
    (training: data.itm_group rows; evaluation: the batch)."""
    examples = [it['example'] for it in items]
    n = len(examples)
    groups = (pipeline.row_groups(n, rng, self.group, self.process_index)
              if self.train else [(slice(0, n), rng)])
    # Each group's generator draws its captions, then its negatives.
    captions = [c for rows, group_rng in groups for c in
                pick_retrieval_captions(examples[rows], group_rng, self.train)]
    caption_index, itm_label = pipeline.pick_itm_captions_in_groups(
        [ex['image_id'] for ex in examples], groups, self.neg_prob)
    rows = []
    for item, c, label in zip(items, caption_index, itm_label):
      arrays, stats = encode_example(captions[c], item['images'][0],
                                     tokenizer, self.shapes)
      arrays['itm_label'] = np.int32(label)
      stats['itm_negatives'] = 1 - int(label)
      rows.append((arrays, stats))
    return rows


def flatten_image_pairs(batch):
  """nlvr2: [B, 2, ...] image-pair arrays -> the model's [2B, ...] rows,
  example-major (left of example b at row 2b, right at 2b + 1); the other
  entries (label [B], stats, ...) are kept as they are. Works on numpy and
  jax arrays (a plain reshape)."""
  out = dict(batch)
  for k in (k for k in PAIR_KEYS if k in batch):
    x = batch[k]
    out[k] = x.reshape((x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))
  return out


# ---------------------------------------------------------------- dataset

def task_file(directory, task, split):
  """tasks.task_path, checked to exist (FileNotFoundError naming it)."""
  path = tasks.task_path(directory, task, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no {task} {split} split; '
                            f'{_HOW_TO_CREATE}')
  return path


def _check_feature_dim(directory, shapes):
  """meta.json (when the folder has one) must match the config's F; a
  model that reads pixels reads no features."""
  feature_dim = shapes.feature_dim
  if shapes.pixels or not os.path.exists(
      os.path.join(directory, records.META_FILE)):
    return
  meta_dim = records.read_meta(directory).get('feature_dim')
  if meta_dim is not None:
    check_feature_dim(directory, meta_dim, feature_dim)


def make_task_dataset(config, directory, task, split, *, batch_size, train,
                      seed, process_index=0, process_count=1):
  """The batched MapDataset of one task split for this process.

  train=True: shuffled, repeated forever (reshuffled each epoch),
  remainder-free batches. train=False: one pass in stored order over every
  example, padded to whole global batches (batch_size * process_count) by
  repeating the last record with batch['valid'] False, so every process
  runs the same number of batches and no example goes unevaluated.

  Returns (dataset, info): info has task, split, path, num_examples (in the
  split file), num_local (this process's slice; train: one epoch's; eval:
  with padding), num_padded (eval: padding rows over all processes), and
  for vqa answer_vocab (list of str; its length is the head's num_outputs).
  """
  if task not in tasks.TASKS:
    raise ValueError(f'unknown task {task!r}; tasks are {list(tasks.TASKS)}')
  path = task_file(directory, task, split)
  shapes = task_shapes(config)
  _check_feature_dim(directory, shapes)
  store = open_store(directory, shapes)
  info = dict(task=task, split=split, path=path)
  answer_vocab = None
  if task == 'vqa':
    answer_vocab = load_or_build_answer_vocab(directory,
                                              num_answers_of(config))
    info['answer_vocab'] = answer_vocab
  source = records.open_source(path)
  n = len(source)
  if n == 0:
    raise ValueError(f'{path}: the {task} {split} split is empty.')
  info['num_examples'] = n
  global_batch = batch_size * process_count
  positions = n if train else -(-n // global_batch) * global_batch
  info['num_padded'] = positions - n
  ds = grain.MapDataset.range(positions).map(
      TaskDecoder(source, store, task=task, path=path))
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
    info['num_local'] = len(range(process_index, n, process_count))
    # This process's block of each global batch: training batches are the
    # same for any number of processes (resumes under another count too).
    ds = pipeline.process_rows(ds, batch_size, process_index, process_count)
  else:
    # Round-robin, which predictions' reassembly expects.
    ds = ds[process_index::process_count]
    info['num_local'] = len(ds)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  # A random_map in eval too: only retrieval draws (its negatives), and a
  # one-pass dataset's draws are a fixed function of (seed, batch index).
  ds = ds.random_map(TaskBatchEncoder(config, task, train=train,
                                      answer_vocab=answer_vocab,
                                      process_index=process_index), seed=seed)
  return ds, info
