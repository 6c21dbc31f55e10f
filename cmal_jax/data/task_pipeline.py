"""Grain input pipeline for fine-tuning on the downstream tasks.

  {task}_{split}.array_record (tasks.py schema) -> decode + check fields,
     fetch the image(s) from the region store (errors name file, record
     and field; data.on_error='skip': see TaskDecoder)
  -> seeded shuffle, reshuffled every epoch (train) -> this process's slice
  -> batch of raw examples -> random_map: tokenise, keep the R most
     confident regions, pad, task targets, stack.

CMAP is off in fine-tuning, so no anchors. Every batch holds, besides the
task's arrays, `example_index` [B] int32 (the record index in the split
file, to map predictions back to examples), `valid` [B] bool and `stats`
{key: [B] int32} (stat_keys(task, config)), per example like
pre-training's batch['stats'], skipped_<reason> counters included.

data.on_error='skip' (pipeline.first_good, as pre-training): in training a
bad example is replaced by the next good one of the file and counted per
reason (skip_reasons) in the train state's data_stats, which train.py
reports and checks against data.max_skip_fraction; in evaluation it is left
out of the metric (valid False) and counted once, under its own reason.

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

import collections
import json
import os

import dataclasses

import grain
import numpy as np

from cmal_jax import task_metrics
from cmal_jax.data import image_store
from cmal_jax.data import pair_source
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


def skip_reasons(task, pixels=False):
  """Why an example of `task` is skipped (data.on_error='skip'): 'record'
  (cannot be read or decoded, or a field of neither record below), a field
  of the task record (tasks.TASK_FIELDS; image_id / image_ids also for an
  id the store lacks), a field of its image's region record, and for a
  model that reads pixels 'image' (an image that cannot be read or
  decoded)."""
  reasons = dict.fromkeys(('record',) + tasks.TASK_FIELDS[task]
                          + region_store.REGION_RECORD_FIELDS)
  return tuple(reasons) + ((records.IMAGE_FIELD,) if pixels else ())


def stat_keys(task, config):
  """The batch['stats'] keys of `task`'s batches under `config`:
  TASK_STAT_KEYS[task], then a skipped_<reason> counter per skip_reasons
  (always there, 0 with data.on_error='raise', as pre-training's)."""
  return TASK_STAT_KEYS[task] + tuple(
      f'skipped_{r}' for r in skip_reasons(task, task_shapes(config).pixels))


def skip_reason(error, reasons):
  """The entry of `reasons` (skip_reasons) a skipped example counts under."""
  field = (records.IMAGE_FIELD if isinstance(error, image_store.ImageError)
           else getattr(error, 'field', '*'))
  return field if field in reasons[1:] else 'record'


# What 'skip' skips: a bad task or region record (records.RecordError) or
# an image that cannot be read (image_store.ImageError). Anything else (a
# missing file, a config mismatch) stops the run.
SKIPPABLE = (records.RecordError, image_store.ImageError)

# REC's hit criterion (task_metrics.rec_accuracy's default).
REC_IOU_THRESHOLD = 0.5

# nlvr2 arrays with the [B, 2, ...] image axis (flatten_image_pairs); a
# batch holds region_feats or (pixels) images.
PAIR_KEYS = ('input_ids', 'text_mask', 'region_feats', 'images',
             'region_boxes', 'region_mask')

_HOW_TO_CREATE = ('create task data with: python -m cmal_jax.world.task_examples '
                  '--out=DIR, or from an official release with python -m '
                  'cmal_jax.convert vqa_v2|snli_ve|nlvr2|refcoco|karpathy '
                  '--regions=DIR')


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
  return pair_source.open_store(directory, pixels=shapes.pixels,
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
    # Normalised like region_boxes (the readers clip to the image).
    records.check_normalised_boxes(box[None], 'target_box', err)
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


def image_id_field(task):
  """The task record's field that names its images."""
  return 'image_ids' if task == 'nlvr2' else 'image_id'


def load_example(source, store, task, *, path, index):
  """Record `index` of a task file, validated, with its images from the
  store: {'example', 'images': [region record], 'index'}.

  Raises records.RecordError naming the task file, record and field (an
  image id the store lacks: image_id, or nlvr2's image_ids); the store's
  own RecordError for a bad region record (its file, record and field);
  image_store.ImageError (pixels) for an image that cannot be read.
  """
  # source[index] itself raises a RecordError for an unreadable record.
  example = decode_task_record(source[index], task, path=path, index=index)
  images = []
  for image_id in image_ids_of(example, task):
    try:
      images.append(store[image_id])
    except KeyError as e:
      raise records.RecordError(path, index, image_id_field(task),
                                e.args[0]) from None
  return dict(example=example, images=images, index=index)


class TaskDecoder:
  """Map step: position -> {'example', 'images': [region record], 'index',
  'valid', 'skipped'}. Positions past the split's end (evaluation pads to
  whole batches) repeat the last record with valid=False.

  on_error='raise': a bad example raises (load_example). 'skip'
  (pipeline.first_good): in training (train=True) the next good example of
  the file takes its place, with `skipped` {reason: records skipped to
  reach it}, as in pre-training; in evaluation the position is left out
  (valid=False, the next good example standing in, masked) and `skipped`
  counts it once, under its own reason, so the metric is over the good
  examples and every bad one is counted exactly once.
  """

  def __init__(self, source, store, *, task, path, on_error='raise',
               train=False, pixels=False):
    if on_error not in ('raise', 'skip'):
      raise ValueError(f"on_error={on_error!r}: must be 'raise' or 'skip'")
    self.source, self.store, self.task, self.path = source, store, task, path
    self.on_error, self.train = on_error, train
    self.reasons = skip_reasons(task, pixels)

  def load(self, index):
    return load_example(self.source, self.store, self.task, path=self.path,
                        index=index)

  def reason(self, error):
    return skip_reason(error, self.reasons)

  def __call__(self, position):
    n = len(self.source)
    index = min(int(position), n - 1)
    real = int(position) < n
    if self.on_error == 'raise':
      return dict(self.load(index), valid=real, skipped={})
    item, _, skipped, first = pipeline.first_good(
        self.load, index, n, self.reason, errors=SKIPPABLE)
    if self.train:
      return dict(item, valid=True, skipped=skipped)
    bad = first is not None
    return dict(item, index=index, valid=real and not bad,
                skipped={self.reason(first): 1} if real and bad else {})


def load_split(config, directory, task, split):
  """Every example of a split with its images, in record order, read as
  TaskDecoder reads them in evaluation, without batching (retrieval's
  evaluation): ([load_example items], skipped {reason: count}). With
  data.on_error='skip' a bad example is left out and counted once under
  its reason; with 'raise' its error is raised."""
  path = task_file(directory, task, split)
  shapes = task_shapes(config)
  store = open_store(directory, shapes)
  source = records.open_source(path)
  reasons = skip_reasons(task, shapes.pixels)
  skip = _get(config.data, 'on_error', 'raise') == 'skip'
  items, skipped = [], {}
  for index in range(len(source)):
    try:
      items.append(load_example(source, store, task, path=path, index=index))
    except SKIPPABLE as e:
      if not skip:
        raise
      reason = skip_reason(e, reasons)
      skipped[reason] = skipped.get(reason, 0) + 1
  return items, skipped


# ------------------------------------------------------- answer vocabulary

def read_task_examples(directory, task, split, on_error='raise'):
  """Every validated example of a task split (small fields only: no
  regions are read), one per record. on_error='skip': None in place of a
  bad record (the pipeline that feeds or evaluates it counts it)."""
  path = task_file(directory, task, split)
  source = records.open_source(path)
  examples = []
  for i in range(len(source)):
    try:
      examples.append(decode_task_record(source[i], task, path=path,
                                         index=i))
    except records.RecordError:
      if on_error != 'skip':
        raise
      examples.append(None)
  return examples


def load_or_build_answer_vocab(directory, num_answers, on_error='raise'):
  """The VQA answer vocabulary of a dataset folder: [V <= num_answers] str.

  Built from vqa_train's answers (task_metrics.build_answer_vocab, top
  num_answers) and written to directory/answer_vocab.json; read from there
  when present, so val and test (and later runs) use the train vocabulary.
  A file built with another num_answers, or from a vqa_train with another
  number of questions (regenerated data), is rebuilt from vqa_train.
  on_error='skip': bad vqa_train records are left out of the count of
  answers (the training stream counts them).
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
  train = read_task_examples(directory, 'vqa', 'train', on_error)
  answers = task_metrics.build_answer_vocab(
      [ex['answers'] for ex in train if ex is not None], num_answers)
  # Per-process temp name: every process of a run may build it at once;
  # each writes the same content and the rename is atomic.
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(dict(num_answers=num_answers, source='vqa_train',
                   num_questions=len(train), answers=answers), f, indent=1)
  os.replace(tmp, path)
  return answers


def label_counts(examples, task, answer_vocab=None):
  """What a training split's labels can teach, from its examples (None:
  a bad record left out). vqa: {'questions', 'answerable'}, the questions
  with at least one answer in answer_vocab (the others train the head
  towards no answer); ve, nlvr2: {'examples', 'labels': {label: count}}.
  None for rec and retrieval (no label vocabulary)."""
  examples = [ex for ex in examples if ex is not None]
  if task == 'vqa':
    vocab = set(answer_vocab or ())
    answerable = sum(
        any(task_metrics.normalize_vqa_answer(a) in vocab
            for a in ex.get('answers') or ()) for ex in examples)
    return dict(questions=len(examples), answerable=answerable)
  if task in ('ve', 'nlvr2'):
    labels = collections.Counter(str(ex['label']) for ex in examples)
    return dict(examples=len(examples), labels=dict(labels))
  return None


def prior_only_report(counts, task, path):
  """The start-up report of a training split a model can learn only the
  prior from (None if it has more): VQA questions none of whose answers
  is in the answer vocabulary, or a VE / NLVR2 split with one label."""
  if counts is None:
    return None
  if task == 'vqa' and counts['answerable'] == 0:
    return (f'{path}: none of the {counts["questions"]} questions has an '
            'answer in the answer vocabulary (answer_vocab.json): the '
            'model can learn only the prior.')
  if task in ('ve', 'nlvr2') and len(counts['labels']) <= 1:
    label = ', '.join(f'{k!r} x {v}' for k, v in counts['labels'].items())
    return (f'{path}: the {counts["examples"]} examples have one label '
            f'only ({label or "none"}): the model can learn only the prior.')
  return None


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
    self.reasons = skip_reasons(task, self.shapes.pixels)
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
    # global totals on any mesh and number of processes; padding rows and
    # the stand-ins of skipped evaluation examples count nothing but their
    # skips.
    batch['stats'] = {k: np.asarray([s[k] for _, s in rows], np.int32) * valid
                      for k in TASK_STAT_KEYS[self.task]}
    for r in self.reasons:
      batch['stats'][f'skipped_{r}'] = np.asarray(
          [it.get('skipped', {}).get(r, 0) for it in items], np.int32)
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
  data.on_error='skip' skips bad examples (TaskDecoder: replaced in
  training, left out with valid False in evaluation; both counted in
  batch['stats']).

  Returns (dataset, info): info has task, split, path, num_examples (in the
  split file), num_local (this process's slice; train: one epoch's; eval:
  with padding), num_padded (eval: padding rows over all processes), and
  for vqa answer_vocab (list of str; its length is the head's num_outputs);
  train: label_counts (label_counts(): what the labels can teach) and
  prior_only (prior_only_report(): a message when only the prior can be
  learnt, else None; the caller reports it).
  """
  if task not in tasks.TASKS:
    raise ValueError(f'unknown task {task!r}; tasks are {list(tasks.TASKS)}')
  path = task_file(directory, task, split)
  shapes = task_shapes(config)
  _check_feature_dim(directory, shapes)
  store = open_store(directory, shapes)
  info = dict(task=task, split=split, path=path)
  answer_vocab = None
  on_error = _get(config.data, 'on_error', 'raise')
  if task == 'vqa':
    answer_vocab = load_or_build_answer_vocab(
        directory, num_answers_of(config), on_error)
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
      TaskDecoder(source, store, task=task, path=path, on_error=on_error,
                  train=train, pixels=shapes.pixels))
  if train:
    info['label_counts'] = label_counts(
        read_task_examples(directory, task, split, on_error), task,
        answer_vocab)
    info['prior_only'] = prior_only_report(info['label_counts'], task, path)
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
