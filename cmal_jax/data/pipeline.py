"""Grain input pipeline for pre-training pairs.

  ArrayRecord source -> decode + validate (knows file and record index;
     data.on_error='skip' replaces a bad record by the next good one)
  -> seeded shuffle, reshuffled every epoch -> this process's block of
     each global batch (process_rows)
  -> batch of raw examples -> random_map: ITM negatives within groups of
     data.itm_group rows, tokenise, detect anchors for the pair actually
     fed, pad, stack
  -> IterDataset with prefetch threads (its state is checkpointed).

Every random choice is a function of (seed, element index), so the stream
is identical on every run, after a restore, and for any number of
processes. (data.read='own_shards' trades the last for reading only this
process's shards of a sharded folder: shards.py.)
"""

import grain
import numpy as np

from cmal_jax.model.pixels import reads_pixels
from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data import shards
from cmal_jax.data import tfds_source
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.model.pixels import grid_boxes

# Why a record was skipped (data.on_error='skip'): the field a RecordError
# names, or 'record' for one that cannot be read or decoded (field '*').
SKIP_REASONS = ('record',) + records.PAIR_FIELDS
# A model that reads pixels also skips images that do not decode. Apart, so
# a region run's counters (checkpointed with its state) stay as they were.
PIXEL_SKIP_REASONS = SKIP_REASONS + (records.IMAGE_FIELD,)
# Consecutive bad records after which 'skip' gives up and raises.
MAX_CONSECUTIVE_BAD = 100

# Per-example counters each batch carries beside its arrays ([B] int32 each,
# batch['stats']); the train step sums them into the checkpointed state.
# skipped_<reason>: bad records skipped to reach this example (0 in 'raise').
STAT_KEYS = ('captions_truncated', 'regions_truncated', 'anchors_truncated',
             'examples', 'itm_negatives') + tuple(
                 f'skipped_{r}' for r in SKIP_REASONS)
PIXEL_STAT_KEYS = STAT_KEYS + (f'skipped_{records.IMAGE_FIELD}',)


def stat_keys(config):
  """The batch['stats'] keys of a pre-training config."""
  return PIXEL_STAT_KEYS if reads_pixels(config) else STAT_KEYS


def tag_ids_of(region_tags, vocab, *, path, index) -> np.ndarray:
  """Tag names -> int32 ids [N]; a tag outside meta.json's vocabulary is a
  RecordError naming the record."""
  try:
    return np.asarray([vocab.tag_id(t) for t in region_tags], np.int32)
  except KeyError as e:
    raise records.RecordError(path, index, 'region_tags',
                              f'tag not in the vocabulary (meta.json): {e}')


def decode_pair(raw, *, path, index, shapes, vocab):
  """Record bytes -> validated example with integer tag ids; for pixels
  with the image decoded and resized, uint8 [S, S, 3], in place of
  region_feats."""
  example = records.decode_record_at(raw, path, index)
  if not isinstance(example, dict):
    raise records.RecordError(path, index, '*', 'record is not a dict')
  example = records.validate_pair(
      example, path=path, index=index, feature_dim=shapes.feature_dim,
      visual='pixels' if shapes.pixels else 'regions')
  tag_ids = tag_ids_of(example['region_tags'], vocab, path=path, index=index)
  visual = (dict(image=decode_image_at(example, shapes.image_size, path=path,
                                       index=index)) if shapes.pixels
            else dict(region_feats=example['region_feats']))
  return dict(caption=example['caption'], image_id=example['image_id'],
              **visual, region_boxes=example['region_boxes'],
              region_conf=example['region_conf'], region_tag_ids=tag_ids)


def decode_image_at(example, size, *, path, index):
  """A pixel pair's image, decoded and resized: uint8 [size, size, 3]
  (size None: as stored, [H, W, 3]); one that does not decode is a
  RecordError naming the record and image id."""
  try:
    image = image_store.decode_image(example[records.IMAGE_FIELD])
  except ValueError as e:
    raise records.RecordError(path, index, records.IMAGE_FIELD,
                              f'image {example["image_id"]!r}: {e}') from e
  return image if size is None else image_store.resize_image(image, size)


def skip_reason(error):
  """The PIXEL_SKIP_REASONS entry of a RecordError."""
  return error.field if error.field in PIXEL_SKIP_REASONS[1:] else 'record'


def first_good(decode, index, num_records, reason_of,
               errors=(records.RecordError,)):
  """decode(index), or (when that raises one of `errors`) decode of the
  first of index + 1, index + 2, ... (wrapping around) that succeeds: a
  pure function of index, so a data order that is a function of (seed,
  index) stays one. data.on_error='skip' of both input pipelines.

  Returns (example, its index, skipped {reason_of(error): records skipped},
  the first error or None). After MAX_CONSECUTIVE_BAD bad records in a row,
  the first one's error is raised.
  """
  skipped, first = {}, None
  for k in range(min(num_records, MAX_CONSECUTIVE_BAD)):
    i = (index + k) % num_records
    try:
      example = decode(i)
    except errors as e:
      if first is None:
        first = e
      reason = reason_of(e)
      skipped[reason] = skipped.get(reason, 0) + 1
      continue
    return example, i, skipped, first
  gave_up = (f"data.on_error='skip' gave up: the {k + 1} records from here "
             'on (wrapping around) are all bad')
  if isinstance(first, records.RecordError):
    raise records.RecordError(first.path, first.index, first.field,
                              f'{first.problem}; {gave_up}') from first
  raise type(first)(f'{first}; {gave_up}') from first


class RecordDecoder:
  """Map step: record index -> decoded example (see decode_pair).

  on_error='raise': a bad record raises its RecordError. 'skip': record i is
  replaced by the first good one of i+1, i+2, ... (first_good), and the
  example then carries `skipped`, {reason: records skipped}.
  """

  def __init__(self, source, *, path, shapes, vocab, on_error='raise'):
    if on_error not in ('raise', 'skip'):
      raise ValueError(f"on_error={on_error!r}: must be 'raise' or 'skip'")
    self.source, self.path, self.shapes, self.vocab = (
        source, path, shapes, vocab)
    self.on_error = on_error

  def decode(self, index):
    # source[index] itself raises a RecordError for an unreadable record.
    return decode_pair(self.source[index], path=self.path, index=index,
                       shapes=self.shapes, vocab=self.vocab)

  def __call__(self, index):
    index = int(index)
    if self.on_error == 'raise':
      return self.decode(index)
    example, _, skipped, _ = first_good(self.decode, index, len(self.source),
                                        skip_reason)
    if skipped:
      example['skipped'] = skipped
    return example


def keep_regions(num_regions, conf, max_regions):
  """Indices of the regions that fit: the most confident, in stored order."""
  if num_regions <= max_regions:
    return np.arange(num_regions)
  order = np.argsort(-conf, kind='stable')[:max_regions]
  return np.sort(order)


def pad_text(encoding, max_text_len):
  """A tokenizer encoding -> {input_ids [T] int32, text_mask [T] int32}."""
  arrays = dict(input_ids=np.zeros(max_text_len, np.int32),
                text_mask=np.zeros(max_text_len, np.int32))
  arrays['input_ids'][:len(encoding.ids)] = encoding.ids
  arrays['text_mask'][:len(encoding.ids)] = 1
  return arrays


def pad_regions(image, max_regions, feature_dim):
  """The most confident R regions of an image record, in stored order.

  Returns ({region_feats [R, F] f32, region_boxes [R, 4] f32, region_mask
  [R] int32}, keep): keep indexes the image's regions that were kept.
  """
  keep = keep_regions(len(image['region_conf']), image['region_conf'],
                      max_regions)
  n = len(keep)
  arrays = dict(region_feats=np.zeros((max_regions, feature_dim), np.float32),
                region_boxes=np.zeros((max_regions, 4), np.float32),
                region_mask=np.zeros(max_regions, np.int32))
  arrays['region_feats'][:n] = image['region_feats'][keep]
  arrays['region_boxes'][:n] = image['region_boxes'][keep]
  arrays['region_mask'][:n] = 1
  return arrays, keep


def pad_pixel_regions(image, shapes):
  """Pixels: the image resized to S x S and its R most confident boxes in
  stored order, or (grid_only, or an image without boxes) the G x G grid
  cells in row-major order.

  Returns ({images [S, S, 3] uint8, region_boxes [R, 4] f32, region_mask
  [R] int32}, keep): keep indexes the image's regions that were kept (none
  for the grid, whose cells have no tags and so make no anchors).
  """
  R = shapes.max_regions
  arrays = dict(
      images=image_store.resize_image(image['image'], shapes.image_size),
      region_boxes=np.zeros((R, 4), np.float32),
      region_mask=np.zeros(R, np.int32))
  if shapes.grid_only or not len(image['region_conf']):
    cells = grid_boxes(shapes.grid_size)
    arrays['region_boxes'][:len(cells)] = cells
    arrays['region_mask'][:len(cells)] = 1
    return arrays, np.arange(0)
  keep = keep_regions(len(image['region_conf']), image['region_conf'], R)
  arrays['region_boxes'][:len(keep)] = image['region_boxes'][keep]
  arrays['region_mask'][:len(keep)] = 1
  return arrays, keep


def pad_visual(image, shapes):
  """pad_regions, or for pixels pad_pixel_regions: (arrays, keep)."""
  if shapes.pixels:
    return pad_pixel_regions(image, shapes)
  return pad_regions(image, shapes.max_regions, shapes.feature_dim)


def regions_truncated(image, shapes):
  """Whether some of the image's regions did not fit (never for the grid,
  which does not read them)."""
  return (not shapes.grid_only
          and len(image['region_conf']) > shapes.max_regions)


def encode_pair(caption, image, tokenizer, vocab, shapes):
  """Tokenises a caption, detects its anchors with the image, pads.

  Args:
    caption: str. image: a decoded example (its regions are used).
  Returns:
    (arrays, stats): arrays of static shapes (see Shapes), stats counts.
  """
  T, R, K = shapes.max_text_len, shapes.max_regions, shapes.max_anchors
  text = tokenizer.encode(caption, T)
  regions, keep = pad_visual(image, shapes)
  tag_ids = image['region_tag_ids'][keep]
  found = anchors_lib.detect_anchors(caption, text.offsets, tag_ids,
                                     image['region_conf'][keep], vocab, K)
  region_tags = np.full(R, -1, np.int32)
  region_tags[:len(keep)] = tag_ids
  arrays = dict(
      pad_text(text, T), **regions, region_tags=region_tags,
      anchor_text_pos=found.text_pos, anchor_text_end=found.text_end,
      anchor_region=found.region, anchor_valid=found.valid)
  stats = dict(captions_truncated=int(text.truncated),
               regions_truncated=int(regions_truncated(image, shapes)),
               anchors_truncated=found.num_truncated)
  return arrays, stats


def row_groups(n, rng, group, process_index=0):
  """[(rows, generator)] for this process's n rows, in groups of `group`.

  Group g of the global batch (process p's rows start at group p * n /
  group) draws from its own generator, seeded by `rng` (the same on every
  process) and g: random choices made per group are then the same however
  many processes build the global batch.
  """
  if n % group:
    raise ValueError(
        f'config.data.itm_group={group} must divide the per-process batch '
        f'{n} (ITM negatives are drawn within groups of that many rows).')
  base = int(rng.integers(2**62))
  first_group = process_index * n // group
  return [(slice(start, start + group),
           np.random.default_rng((base, first_group + start // group)))
          for start in range(0, n, group)]


def pick_itm_captions_in_groups(image_ids, groups, neg_prob):
  """pick_itm_captions within each group of `groups` ([(rows, generator)],
  e.g. row_groups'). Returns (caption_index [B], itm_label [B])."""
  n = len(image_ids)
  caption_index, itm_label = np.arange(n), np.ones(n, np.int32)
  for rows, group_rng in groups:
    index, label = pick_itm_captions(image_ids[rows], group_rng, neg_prob)
    caption_index[rows] = index + rows.start
    itm_label[rows] = label
  return caption_index, itm_label


def pick_itm_captions(image_ids, rng, neg_prob):
  """For each example, the index of the caption it is fed with.

  With probability neg_prob an example gets the caption of another example
  of the batch showing a different image; the rest keep their own.
  Returns (caption_index [B], itm_label [B]).
  """
  n = len(image_ids)
  caption_index = np.arange(n)
  for i in np.flatnonzero(rng.random(n) < neg_prob):
    others = [j for j in rng.permutation(n) if image_ids[j] != image_ids[i]]
    if others:
      caption_index[i] = others[0]
  return caption_index, (caption_index == np.arange(n)).astype(np.int32)


class BatchEncoder:
  """random_map step: a list of decoded examples -> one padded batch."""

  def __init__(self, config, vocab, process_index=0):
    self.shapes = Shapes.from_config(config)
    self.stat_keys = stat_keys(config)
    self.vocab_path = config.data.vocab_path or None
    self.neg_prob = config.data.itm_neg_prob
    self.group = config.data.itm_group
    self.process_index = process_index
    self.vocab = vocab

  def __call__(self, examples, rng):
    tokenizer = load_tokenizer(self.vocab_path)  # Cached per process.
    caption_index, itm_label = pick_itm_captions_in_groups(
        [e['image_id'] for e in examples],
        row_groups(len(examples), rng, self.group, self.process_index),
        self.neg_prob)
    rows, counts = [], []
    for image, c in zip(examples, caption_index):
      arrays, stats = encode_pair(examples[c]['caption'], image, tokenizer,
                                  self.vocab, self.shapes)
      # Skips belong to the slot (the image), whichever caption it is fed.
      skipped = image.get('skipped', {})
      stats.update({f'skipped_{r}': skipped.get(r, 0)
                    for r in PIXEL_SKIP_REASONS})
      rows.append(arrays)
      counts.append(stats)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch['itm_label'] = itm_label
    for c, label in zip(counts, itm_label):
      c.update(examples=1, itm_negatives=1 - int(label))
    # Per example (not per batch), so they shard with the batch and sum to
    # global totals on any mesh and number of processes.
    batch['stats'] = {k: np.asarray([c[k] for c in counts], np.int32)
                      for k in self.stat_keys}
    return batch


def make_dataset(config, directory, split, *, batch_size, train, seed,
                 process_index=0, process_count=1):
  """The batched MapDataset of one split for this process.

  train=True: shuffled, repeated forever (reshuffled each epoch),
  remainder-free batches. train=False: one pass in stored order; a last
  partial batch is dropped and the number is returned.

  data.read='global': rows of one global shuffle, this process's block of
  each global batch (process_rows). 'own_shards' (train=True only; a
  one-pass read is global): batch_size rows a batch of this process's own
  shards of a sharded folder (read_pairs).

  Returns (dataset, vocab, num_dropped).
  """
  ds, vocab, own = read_pairs(config, directory, split, train=train,
                              seed=seed, process_index=process_index,
                              process_count=process_count)
  num_dropped = 0 if train else len(ds) % (batch_size * process_count)
  if not own:
    ds = process_rows(ds, batch_size, process_index, process_count)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  ds = ds.random_map(BatchEncoder(config, vocab, process_index), seed=seed)
  return ds, vocab, num_dropped


def read_pairs(config, directory, split, *, train, seed, process_index=0,
               process_count=1):
  """The decoded examples of one split, before batching: (MapDataset,
  vocab, own).

  own=False: the split's records (train: shuffled with `seed`, repeated),
  the same on every process. own=True (train under data.read='own_shards'):
  this process's shards only (shards.open_own_shards), shuffled with
  shards.local_seed(seed, process_index) and repeated.
  """
  own = train and shards.reads_own_shards(config)
  if own:
    parts, meta = shards.open_own_shards(config, directory, split,
                                         process_index, process_count)
  else:
    if tfds_source.source_spec(config) is None:
      shards.check_not_only_sharded(directory, split)
    # data.source: `directory`'s records, or a TFDS dataset (tfds_source.py).
    source, path, meta = tfds_source.open_pairs(config, directory, split)
    # (end data.source)
    parts = [(source, path)]
  vocab = anchors_lib.TagVocab.from_meta(meta)
  shapes = Shapes.from_config(config)
  # A range, not MapDataset.source: 'skip' must also survive a record that
  # cannot be read, and reads other records to replace a bad one. One range
  # per file, so errors name the file and its own record index.
  decoded = [grain.MapDataset.range(len(source)).map(RecordDecoder(
      source, path=path, shapes=shapes, vocab=vocab,
      on_error=config.data.on_error)) for source, path in parts]
  ds = decoded[0] if len(decoded) == 1 else grain.MapDataset.concatenate(
      decoded)
  if train:
    ds = ds.shuffle(seed=shards.local_seed(seed, process_index) if own
                    else seed).repeat(None)
  return ds, vocab, own


def process_rows(ds, batch_size, process_index, process_count):
  """The rows of `ds` this process feeds, batch_size per global batch.

  Global batch k is rows [k * G, (k + 1) * G) of `ds` (G = batch_size *
  process_count, whole global batches only); process p takes its block
  [p * batch_size, (p + 1) * batch_size), which lands on p's devices. The
  global batches, and with them the losses, are the same for any number of
  processes, and local batch k is global batch k on every process, so an
  iterator position restores under another process count.
  """
  if process_count == 1:
    return ds
  total = batch_size * process_count
  def row(q):
    return ds[(q // batch_size) * total + process_index * batch_size
              + q % batch_size]
  return grain.MapDataset.range(len(ds) // total * batch_size).map(row)


def _skip_counts(stats):
  """{reason: count} of every skipped_<reason> counter in `stats` (a job's
  own reasons too: fine-tuning's task fields), pre-training's reasons first
  in PIXEL_SKIP_REASONS' order, then the others alphabetically."""
  reasons = [k[len('skipped_'):] for k in stats if k.startswith('skipped_')]
  rank = {r: i for i, r in enumerate(PIXEL_SKIP_REASONS)}
  reasons.sort(key=lambda r: (rank.get(r, len(rank)), r))
  return {r: int(stats[f'skipped_{r}']) for r in reasons}


def skip_report(stats):
  """One line on the bad records skipped, from cumulative counters."""
  counts = _skip_counts(stats)
  total, examples = sum(counts.values()), int(stats.get('examples', 0))
  if not total:
    return f'Data: no bad records skipped ({examples} examples).'
  per_reason = ', '.join(f'{r} {c}' for r, c in counts.items() if c)
  return (f'Data: skipped {total} bad records for {examples} examples '
          f'({total / max(examples, 1):.2%}); by field: {per_reason}.')


def check_skip_limit(stats, config, where=''):
  """Raises ValueError if too many bad records were skipped.

  Args:
    stats: cumulative counters {key: int}: `examples` and skipped_<reason>
      (a job's batch['stats'] keys, e.g. STAT_KEYS).
    config: the run config (data.max_skip_fraction).
    where: what the counts are of, to start the message (fine-tuning's
      evaluation: the split file); '' for the training stream.
  Returns:
    The number of records skipped so far.
  """
  counts = _skip_counts(stats)
  total, examples = sum(counts.values()), int(stats.get('examples', 0))
  share, limit = total / max(examples, 1), config.data.max_skip_fraction
  if share > limit:
    per_reason = ', '.join(f'{r} {c}' for r, c in counts.items() if c)
    raise ValueError(
        (f'{where}: ' if where else '')
        + f'Skipped {total} bad records for {examples} examples ({share:.2%}), '
        f'more than config.data.max_skip_fraction={limit} allows; by field: '
        f'{per_reason}. Fix the records (data.on_error=raise names the first '
        'one) or raise data.max_skip_fraction.')
  return total


def to_iter_dataset(ds, config):
  """The IterDataset of `ds` with config.data's prefetch threads."""
  return ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.data.num_threads,
      prefetch_buffer_size=config.data.prefetch))


def to_iterator(ds, config):
  """to_iter_dataset's iterator; checkpointable."""
  return iter(to_iter_dataset(ds, config))
