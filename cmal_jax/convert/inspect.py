r"""What a region store, pair file or task file holds, and what is wrong in it.

  python -m cmal_jax.convert.inspect /tmp/world/train.array_record --top=3

  /tmp/world/train.array_record: pair file, 200 records, 200 images
    features  width 256 (meta.json 256), float32; values mean 0.3593 std
              0.8992; 0 all-zero regions
    regions   858 in 200 images; per image min 0 / mean 4.29 / median 4 /
              max 8; images without regions: 1
    boxes     area min 0.01758 / mean 0.09225 / max 0.2271; 0 zero-area, 0
              over 90% of the image
    conf      min 0.05326 / mean 0.6562 / max 0.9998
    tags      10 distinct; 22.4% of regions untagged; top: diamond 80, star
              80, circle 74
    captions  200; words min 3 / mean 12.98 / median 12 / max 29; tokens
              min 4 / mean 15.92 / median 14 / max 38
    anchors   98.0% of 200 captions have one; 2.15 per caption; 0: 4 |
              1: 70 | 2: 74 | 3+: 52
              top word -> tag: star -> star 54, heart -> heart 45, ...
              top unmatched tags (in the image, named by no word):
              diamond 21, triangle 20, ring 19
              named but no free region: ring 7, triangle 7, circle 6
    errors    none

(lines wrapped here; a bad record shows as `errors    3 (by field: caption
1, ...)` followed by one `file: record N: field 'X': problem` line each).

PATH is a region store (`regions.array_record`), a pair file
(`{split}.array_record`, meta.json beside it), a task file
(`{task}_{split}.array_record`), an image store (`images.json`: image files
+ boxes, image_store.ImageStore) or a folder (every `*.array_record` in it,
and its images.json).
What a file holds is told from its records' fields (the file name only
breaks ties). Options: --limit=N (first N records only), --json (the report
as one JSON object), --top=K, --max_errors=N (errors printed; all counted).
Exits 1 if any error was found, 2 if PATH does not exist.

Every record is validated with the pipeline's own checks
(records.validate_pair and, with meta.json, the tag vocabulary check of
pipeline.decode_pair; region_store.validate_region_record;
task_pipeline.validate_task_example plus "its images are in the store");
a bad record is listed as `file: record N: field 'X': problem` and left
out of the statistics, and the scan goes on.

Records for a model that reads pixels (model.visual.input='pixels') carry
their encoded image (`image`: PNG or JPEG bytes). One without region_feats
is checked as the pixel pipeline checks it (validate_pair /
validate_region_record with visual='pixels'); one with both is checked both
ways. Every image is decoded by image_store.decode_image, the pipeline's
decoder: one that does not decode is `file: record N: field 'image': ...`.
The `pixels` line gives their count, formats, decoded sizes and encoded
bytes. An image store's listed images are read and decoded as fine-tuning
reads them (image_store.ImageStore[id]): a missing or corrupt file is an
error naming the file and the image id; there are no captions, so no
anchors.

Anchors are found by anchors.detect_anchors, as pipeline.encode_pair does,
but over the whole record: no max_regions / max_text_len / max_anchors cut
(those belong to a run config, not to the data). Task files pair each text
with each image the fine-tuning pipeline feeds it with (NLVR2: the sentence
with both images; retrieval: every caption with its image).

Memory stays flat in the number of records except for one hash per distinct
image id (to count images and describe each image once).
"""

import argparse
import collections
import functools
import json
import math
import os
import re
import sys
from typing import Iterator

import numpy as np

from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data import image_store
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import task_pipeline
from cmal_jax.data import tasks

RECORD_SUFFIX = '.array_record'
# Kinds besides the task names.
PAIR, REGIONS, IMAGES = 'pair', 'regions', 'images'
KIND_SAMPLE = 16       # Records read to tell what a file holds.
NEAR_FULL_AREA = 0.9   # A box covering more of the image is suspicious.
ANCHOR_BINS = ('0', '1', '2', '3+')
_TASK_FILE_RE = re.compile(r'^(%s)_.+\.array_record$' % '|'.join(tasks.TASKS))
_FIELD_RE = re.compile(r"field '(\w+)'")  # In an ImageError's message.


# ----------------------------------------------------------------- summaries

def int_summary(counts: collections.Counter) -> dict | None:
  """min / mean / median / max of integers given as {value: how many};
  None when there are none. The median is np.median's (the mean of the two
  middle values for an even count)."""
  total = sum(counts.values())
  if not total:
    return None
  values = sorted(counts)
  # 0-based ranks of the middle value(s) in the sorted expansion.
  lower_rank, upper_rank = (total - 1) // 2, total // 2
  seen, lower = 0, None
  for v in values:
    seen += counts[v]
    if lower is None and seen > lower_rank:
      lower = v
    if seen > upper_rank:
      median = (lower + v) / 2
      break
  mean = sum(v * c for v, c in counts.items()) / total
  return dict(min=int(values[0]), mean=float(mean), median=float(median),
              max=int(values[-1]))


class RunningStats:
  """count / min / mean / max (and std) of floats seen in batches."""

  def __init__(self):
    self.count, self.total, self.total_sq = 0, 0.0, 0.0
    self.min, self.max = math.inf, -math.inf

  def add(self, values):
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size:
      self.count += values.size
      self.total += float(values.sum())
      self.total_sq += float(np.square(values).sum())
      self.min = min(self.min, float(values.min()))
      self.max = max(self.max, float(values.max()))

  def summary(self, std=False) -> dict | None:
    if not self.count:
      return None
    mean = self.total / self.count
    out = dict(min=self.min, mean=mean, max=self.max)
    if std:
      out['std'] = math.sqrt(max(self.total_sq / self.count - mean * mean, 0))
    return out


def _top(counter: collections.Counter, k: int) -> list:
  """[[key, count], ...] of the k most common, ties by key (stable output)."""
  ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
  return [[key, count] for key, count in ranked[:k]]


class ErrorLog:
  """Every error counted; the first `keep` kept as `file: record N: ...`."""

  def __init__(self, keep: int):
    self.keep, self.count = keep, 0
    self.messages: list[str] = []
    self.by_field: collections.Counter = collections.Counter()

  def _add(self, message: str, field: str):
    self.count += 1
    self.by_field[field] += 1
    if len(self.messages) < self.keep:
      self.messages.append(message)

  def add(self, error: records.RecordError):
    self._add(str(error), error.field)

  def add_file(self, path: str, problem: str):
    """A problem of the whole file (unreadable, bad index): no record."""
    self._add(f'{path}: {problem}', 'file')

  def add_image(self, error: image_store.ImageError):
    """A bad image of an image store; its message names the file (or
    images.json) and the image id."""
    self._add(str(error), image_error_field(error))

  def to_dict(self) -> dict:
    return dict(num_errors=self.count, errors=list(self.messages),
                errors_by_field=dict(self.by_field))


class ImageIds:
  """Distinct image ids, kept as hashes: counts images and tells whether an
  id was seen before (memory ~ one int per image, not the ids' text)."""

  def __init__(self):
    self._seen: set[int] = set()

  def add(self, image_id: str) -> bool:
    """True if image_id is new."""
    h = hash(image_id)
    if h in self._seen:
      return False
    self._seen.add(h)
    return True

  def __len__(self):
    return len(self._seen)


# --------------------------------------------------------------- per section

class RegionStats:
  """Features, regions per image, boxes, confidences and tags of images."""

  def __init__(self, vocab: anchors_lib.TagVocab | None):
    self.vocab = vocab
    self.widths: collections.Counter = collections.Counter()
    self.dtypes: collections.Counter = collections.Counter()
    self.values, self.areas, self.conf = (RunningStats(), RunningStats(),
                                          RunningStats())
    self.per_image: collections.Counter = collections.Counter()
    self.with_features = 0  # Images whose record has region_feats.
    self.zero_feature_regions = self.zero_area = self.near_full = 0
    self.tags: collections.Counter = collections.Counter()
    self.unknown_tags = 0

  def add(self, record: dict, stored_dtype: str | None = None):
    """record: validated (float32 arrays; region_feats may be absent: an
    image instead); stored_dtype: its features' dtype on disk (validation
    casts to float32)."""
    feats, boxes = record.get('region_feats'), record['region_boxes']
    n = len(boxes)
    self.per_image[n] += 1
    self.with_features += feats is not None
    if not n:
      return
    if feats is not None:
      self._add_features(feats, stored_dtype)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    self.areas.add(area)
    self.zero_area += int(np.sum(area <= 0))
    self.near_full += int(np.sum(area > NEAR_FULL_AREA))
    self.conf.add(record['region_conf'])
    self.tags.update(record['region_tags'])
    if self.vocab is not None:
      self.unknown_tags += sum(_tag_id(self.vocab, t) is None
                               for t in record['region_tags'] if t)

  def _add_features(self, feats, stored_dtype):
    self.widths[feats.shape[1]] += 1
    self.dtypes[stored_dtype] += 1
    self.values.add(feats)
    self.zero_feature_regions += int(np.sum(~feats.any(axis=1)))

  def _features_dict(self, expected_width):
    """None when no record had region_feats (images only)."""
    if not self.with_features:
      return None
    values = self.values.summary(std=True)
    return dict(
        width=_most_common_key(self.widths), expected_width=expected_width,
        widths=_str_keys(self.widths), dtypes=dict(self.dtypes),
        mean=values and values['mean'], std=values and values['std'],
        zero_regions=self.zero_feature_regions,
        images_with_features=self.with_features)

  def to_dict(self, top: int, expected_width: int | None) -> dict:
    regions = sum(self.tags.values())
    tagged = collections.Counter({t: c for t, c in self.tags.items() if t})
    return dict(
        features=self._features_dict(expected_width),
        regions=dict(total=regions, per_image=int_summary(self.per_image),
                     images_without_regions=self.per_image.get(0, 0)),
        boxes=dict(area=self.areas.summary(), zero_area=self.zero_area,
                   near_full=self.near_full),
        confidence=self.conf.summary(),
        tags=dict(distinct=len(tagged),
                  untagged_share=(self.tags.get('', 0) / regions
                                  if regions else None),
                  top=_top(tagged, top),
                  not_in_vocab=(self.unknown_tags if self.vocab is not None
                                else None)))


def _most_common_key(counter):
  return counter.most_common(1)[0][0] if counter else None


def _str_keys(counter):
  """JSON object keys must be strings."""
  return {str(k): v for k, v in sorted(counter.items())}


def image_format(data: bytes) -> str:
  """'PNG', 'JPEG' or 'other', from the encoded bytes' signature."""
  if data.startswith(b'\x89PNG'):
    return 'PNG'
  if data.startswith(b'\xff\xd8'):
    return 'JPEG'
  return 'other'


class ImageStats:
  """Images: how many, their formats, decoded sizes and encoded bytes."""

  def __init__(self):
    self.count = 0
    self.formats: collections.Counter = collections.Counter()
    self.widths: collections.Counter = collections.Counter()
    self.heights: collections.Counter = collections.Counter()
    self.bytes: collections.Counter = collections.Counter()

  def add(self, image: np.ndarray, data: bytes):
    """image: decoded uint8 [H, W, 3]; data: its encoded bytes."""
    self.add_decoded(image, image_format(data), len(data))

  def add_decoded(self, image: np.ndarray, fmt: str, num_bytes: int):
    """image: decoded uint8 [H, W, 3]; fmt: image_format of its bytes."""
    self.count += 1
    self.formats[fmt] += 1
    self.heights[image.shape[0]] += 1
    self.widths[image.shape[1]] += 1
    self.bytes[num_bytes] += 1

  def to_dict(self) -> dict | None:
    """None when there were no images."""
    if not self.count:
      return None
    return dict(count=self.count, formats=dict(self.formats),
                width=int_summary(self.widths),
                height=int_summary(self.heights),
                bytes=int_summary(self.bytes))


class TextEncoder:
  """Words (anchors.split_words, as anchor detection splits them) and, when
  the tokenizer loads, WordPiece tokens with their char offsets."""

  def __init__(self):
    try:
      from cmal_jax.data.tokenizer import load_tokenizer
      self.tokenizer, self.problem = load_tokenizer(), None
    except (FileNotFoundError, ImportError, OSError) as e:
      self.tokenizer, self.problem = None, str(e)

  def encode(self, text: str):
    """(words [(word, start, end)], num_tokens or None, offsets).

    Without a tokenizer every word stands for one token: anchors are the
    same (they are matched on words), only the token positions differ.
    """
    words = anchors_lib.split_words(text)
    if self.tokenizer is None:
      return words, None, [(s, e) for _, s, e in words]
    # Every token covers >= 1 char, so len(text) + 2 never truncates.
    enc = self.tokenizer.encode(text, len(text) + 2)
    return words, len(enc.ids) - 2, enc.offsets


class TextStats:
  """Lengths of texts, in words and in WordPiece tokens."""

  def __init__(self, encoder: TextEncoder):
    self.encoder = encoder
    self.words: collections.Counter = collections.Counter()
    self.tokens: collections.Counter = collections.Counter()
    self.count = 0

  def add(self, text: str):
    """Counts a text; returns (number of words, token offsets), what anchor
    detection needs."""
    words, num_tokens, offsets = self.encoder.encode(text)
    self.count += 1
    self.words[len(words)] += 1
    if num_tokens is not None:
      self.tokens[num_tokens] += 1
    return len(words), offsets

  def to_dict(self) -> dict:
    return dict(count=self.count, words=int_summary(self.words),
                tokens=int_summary(self.tokens),
                tokenizer_problem=self.encoder.problem)


class AnchorStats:
  """Anchor points of (text, image) pairs, found by anchors.detect_anchors."""

  def __init__(self, vocab: anchors_lib.TagVocab):
    self.vocab = vocab
    self.pairs = 0
    self.per_pair: collections.Counter = collections.Counter()
    self.anchors: collections.Counter = collections.Counter()
    self.unmatched_tags: collections.Counter = collections.Counter()
    self.named_undetected: collections.Counter = collections.Counter()
    self.images_unreadable = 0

  def add(self, text: str, encoded, region_tags: list[str], region_conf):
    """encoded: TextStats.add's (number of words, token offsets) of text.
    A tag the vocabulary lacks counts as no tag."""
    num_words, offsets = encoded
    tag_ids = [_tag_id(self.vocab, t) for t in region_tags]
    tag_ids = np.asarray([-1 if t is None else t for t in tag_ids], np.int32)
    # Each anchor takes >= 1 word: max_anchors = words never cuts the list.
    found = anchors_lib.detect_anchors(text, offsets, tag_ids, region_conf,
                                       self.vocab, max(num_words, 1))
    regions = found.region[found.valid].tolist()
    self.pairs += 1
    self.per_pair[len(regions)] += 1
    anchored_tags = set()
    for word, r in zip(found.words, regions):
      self.anchors[f'{word.lower()} -> {region_tags[r]}'] += 1
      anchored_tags.add(region_tags[r])
    self.unmatched_tags.update({t for t in region_tags if t} - anchored_tags)
    # Words naming a tag no free region carries (a missed detection).
    self.named_undetected.update(found.unmatched_tags)

  def to_dict(self, top: int) -> dict:
    histogram = {b: 0 for b in ANCHOR_BINS}
    for n, c in self.per_pair.items():
      histogram[ANCHOR_BINS[min(n, 3)]] += c
    total = sum(n * c for n, c in self.per_pair.items())
    return dict(
        available=True, pairs=self.pairs,
        with_anchor_share=(1 - histogram['0'] / self.pairs
                           if self.pairs else None),
        per_caption_mean=total / self.pairs if self.pairs else None,
        histogram=histogram, top_anchors=_top(self.anchors, top),
        top_unmatched_tags=_top(self.unmatched_tags, top),
        top_named_undetected=_top(self.named_undetected, top),
        images_unreadable=self.images_unreadable)


def _tag_id(vocab: anchors_lib.TagVocab, tag: str) -> int | None:
  """vocab.tag_id, None for a tag the vocabulary lacks."""
  try:
    return vocab.tag_id(tag)
  except KeyError:
    return None


def _unavailable(reason: str) -> dict:
  return dict(available=False, reason=reason)


# ------------------------------------------------------------------ reading

class FileScan:
  """One record file being inspected: its source, folder metadata, errors."""

  def __init__(self, path: str, source, limit: int | None, max_errors: int):
    self.path, self.source = path, source
    self.num_records = len(source)
    self.num_inspected = (self.num_records if limit is None
                          else min(limit, self.num_records))
    self.errors = ErrorLog(max_errors)
    self.folder = os.path.dirname(os.path.abspath(path))
    self.meta, self.vocab = read_folder_meta(self.folder, self.errors)
    self.meta_width = (self.meta or {}).get('feature_dim')

  def decoded(self, stop: int | None = None, errors: ErrorLog | None = None
              ) -> Iterator[tuple[int, object]]:
    """(index, decoded record) of records [0, stop) (default: those to
    inspect); unreadable ones go to `errors` (default: the file's log)."""
    stop = self.num_inspected if stop is None else stop
    errors = self.errors if errors is None else errors
    for i in range(stop):
      try:
        # _CheckedSource and decode_record_at name the record that fails.
        yield i, records.decode_record_at(self.source[i], self.path, i)
      except records.RecordError as e:
        errors.add(e)


def read_folder_meta(folder: str, errors: ErrorLog):
  """(meta.json, its TagVocab) of a folder; None for what is missing or
  bad (a bad one is an error of the file meta.json)."""
  meta_path = os.path.join(folder, records.META_FILE)
  if not os.path.exists(meta_path):
    return None, None
  try:
    meta = records.read_meta(folder)
  except (OSError, ValueError) as e:
    errors.add_file(meta_path, f'unreadable meta.json: {e}')
    return None, None
  try:
    return meta, anchors_lib.TagVocab.from_meta(meta)
  except (KeyError, TypeError, ValueError) as e:
    errors.add_file(meta_path, f'bad tags / synonyms: {e}')
    return meta, None


def open_scan(path: str, limit, max_errors) -> 'FileScan | dict':
  """A FileScan, or the report of a file that is not a readable ArrayRecord
  file (a whole-file error)."""
  try:
    source = records.open_source(path)
  except records.RecordError as e:
    log = ErrorLog(max_errors)
    log.add_file(path, e.problem)
    return dict(path=path, kind='unreadable', **log.to_dict())
  return FileScan(path, source, limit, max_errors)


# ------------------------------------------------------------------ kinds

def kind_of_record(record) -> str | None:
  """'pair', 'regions', a task name, or None, from a record's fields."""
  if not isinstance(record, dict):
    return None
  keys = set(record)
  if 'caption' in keys:
    return PAIR
  if keys & set(tasks.REGION_FIELDS):
    return REGIONS
  # The task sharing the largest part of its fields with the record.
  share = {t: len(keys & set(f)) / len(f) for t, f in tasks.TASK_FIELDS.items()}
  best = max(share, key=share.get)
  return best if share[best] > 0 else None


def kind_from_name(path: str, has_meta: bool) -> str | None:
  name = os.path.basename(path)
  if name == region_store.REGION_STORE_FILE:
    return REGIONS
  m = _TASK_FILE_RE.match(name)
  if m:
    return m.group(1)
  return PAIR if has_meta else None


def detect_kind(scan: FileScan) -> str | None:
  """The kind most of the first KIND_SAMPLE records have; the file name
  breaks ties (and decides for an empty or unreadable file)."""
  votes: collections.Counter = collections.Counter()
  stop = min(KIND_SAMPLE, scan.num_records)
  # Unreadable records are not counted here: the scan proper reports them.
  for _, record in scan.decoded(stop, errors=ErrorLog(0)):
    kind = kind_of_record(record)
    if kind is not None:
      votes[kind] += 1
  hint = kind_from_name(scan.path, scan.meta is not None)
  if not votes:
    return hint
  best = max(votes.values())
  tied = [k for k, v in votes.items() if v == best]
  return hint if hint in tied else sorted(tied)[0]


# ------------------------------------------------------------------ scans

def _expected_width(known: int | None, record: dict) -> int:
  """The width to validate against: meta.json's, else the first record
  with regions'; until one is seen, the record's own (so that a [0, F]
  region-less record passes, as in region_store)."""
  if known is not None:
    return known
  try:
    shape = np.shape(record.get('region_feats'))
  except (AttributeError, ValueError):  # Not a dict; ragged lists.
    return 0  # The validator then says what is wrong.
  return int(shape[1]) if len(shape) == 2 else 0


def _as_record_error(error: Exception, path: str, index: int):
  """A validator's RecordError as it is; anything else a check raised on a
  malformed record becomes one naming the record, so the scan goes on."""
  if isinstance(error, records.RecordError):
    return error
  return records.RecordError(path, index, '*', f'malformed record '
                             f'({type(error).__name__}: {error})')


def _stored_dtype(record: dict) -> str:
  feats = record.get('region_feats')
  return str(feats.dtype) if hasattr(feats, 'dtype') else type(feats).__name__


def validate_visual(validate, record: dict, feature_dim: int) -> dict:
  """validate(record, feature_dim=, visual=) (records.validate_pair or
  region_store.validate_region_record, with path and index bound) the way
  the pipelines read the record: one for pixels as such; one with both
  region_feats and an image both ways (it serves either model)."""
  visual = records.visual_of(record)
  checked = validate(record, feature_dim=feature_dim, visual=visual)
  if visual == 'regions' and records.IMAGE_FIELD in record:
    validate(record, feature_dim=feature_dim, visual='pixels')
  return checked


def decode_record_image(record: dict, path: str, index: int):
  """A validated record's image as the pipeline decodes it
  (pipeline.decode_image_at, not resized), uint8 [H, W, 3]; None when it
  has none."""
  if records.IMAGE_FIELD not in record:
    return None
  return pipeline.decode_image_at(record, None, path=path, index=index)


def _check_pair(scan: FileScan, example, index: int, width):
  """(validated pair, decoded image or None): pipeline.decode_pair's
  checks, for regions and / or pixels."""
  if not isinstance(example, dict):
    raise records.RecordError(scan.path, index, '*', 'record is not a dict')
  validate = functools.partial(records.validate_pair, path=scan.path,
                               index=index)
  pair = validate_visual(validate, example, _expected_width(width, example))
  if scan.vocab is not None:
    pipeline.tag_ids_of(pair['region_tags'], scan.vocab, path=scan.path,
                        index=index)
  return pair, decode_record_image(pair, scan.path, index)


def _feature_width(record: dict) -> int | None:
  """The width of a validated record's region_feats; None without any."""
  feats = record.get('region_feats')
  return feats.shape[1] if feats is not None and len(feats) else None


def scan_pairs(scan: FileScan, top: int) -> dict:
  """Pair records: images, regions, captions, anchors."""
  width = scan.meta_width
  images, regions = ImageIds(), RegionStats(scan.vocab)
  pixels, texts = ImageStats(), TextStats(TextEncoder())
  anchors = AnchorStats(scan.vocab) if scan.vocab is not None else None
  valid = 0
  for index, example in scan.decoded():
    try:
      pair, image = _check_pair(scan, example, index, width)
    except Exception as e:  # pylint: disable=broad-except
      scan.errors.add(_as_record_error(e, scan.path, index))
      continue
    valid += 1
    width = width or _feature_width(pair)
    if images.add(pair['image_id']):  # Describe each image once.
      regions.add(pair, _stored_dtype(example))
      if image is not None:
        pixels.add(image, pair[records.IMAGE_FIELD])
    encoded = texts.add(pair['caption'])
    if anchors is not None:
      anchors.add(pair['caption'], encoded, pair['region_tags'],
                  pair['region_conf'])
  return dict(
      valid_records=valid, images=len(images),
      **regions.to_dict(top, scan.meta_width), pixels=pixels.to_dict(),
      captions=texts.to_dict(),
      anchors=(anchors.to_dict(top) if anchors is not None else _unavailable(
          f'no usable {records.META_FILE} beside the file: tag vocabulary '
          'unknown')))


def _check_region_record(scan: FileScan, record, index: int, width):
  """(validated region record, decoded image or None)."""
  validate = functools.partial(region_store.validate_region_record,
                               path=scan.path, index=index)
  rec = validate_visual(validate, record, _expected_width(width, record))
  return rec, decode_record_image(rec, scan.path, index)


def scan_regions(scan: FileScan, top: int) -> dict:
  """Region store records: one image each; also checks the index file."""
  width = scan.meta_width
  images, regions, pixels = ImageIds(), RegionStats(scan.vocab), ImageStats()
  valid = 0
  for index, record in scan.decoded():
    try:
      if not isinstance(record, dict):
        raise records.RecordError(scan.path, index, '*',
                                  f'expected a dict, got '
                                  f'{type(record).__name__}')
      rec, image = _check_region_record(scan, record, index, width)
      if not images.add(rec['image_id']):
        raise records.RecordError(scan.path, index, 'image_id',
                                  f'duplicate id {rec["image_id"]!r}')
    except Exception as e:  # pylint: disable=broad-except
      scan.errors.add(_as_record_error(e, scan.path, index))
      continue
    valid += 1
    width = width or _feature_width(rec)
    regions.add(rec, _stored_dtype(record))
    if image is not None:
      pixels.add(image, rec[records.IMAGE_FIELD])
  _check_store_index(scan)
  return dict(valid_records=valid, images=len(images),
              **regions.to_dict(top, scan.meta_width), pixels=pixels.to_dict())


def _check_store_index(scan: FileScan):
  """RegionStore's own checks of the sidecar index (exists, matches)."""
  try:
    region_store.RegionStore(scan.path, scan.meta_width)
  except (FileNotFoundError, ValueError) as e:
    problem = str(e)
    if problem.startswith(f'{scan.path}: '):  # Do not name the file twice.
      problem = problem[len(scan.path) + 2:]
    scan.errors.add_file(scan.path, problem)


def task_texts(example: dict, task: str) -> list[str]:
  """The texts the fine-tuning pipeline feeds with an example's images."""
  if task == 'retrieval':
    return list(example['captions'])
  return [example[task_pipeline.TEXT_FIELDS[task]]]


def _open_store(scan: FileScan):
  """(RegionStore, None) beside the task file, else (ImageStore, None) of
  an image folder (images.json), or (None, why not)."""
  path = region_store.store_path(scan.folder)
  if os.path.exists(path):
    try:
      return region_store.RegionStore(path, scan.meta_width), None
    except (FileNotFoundError, ValueError) as e:  # RecordError: ValueError.
      return None, f'region store unusable: {e}'
  path = image_store.store_file(scan.folder)
  if os.path.exists(path):
    try:
      return image_store.ImageStore(path), None
    except (OSError, ValueError) as e:  # ImageError is a ValueError.
      return None, f'image store unusable: {e}'
  return None, (f'no region store ({region_store.REGION_STORE_FILE}) nor '
                f'image store ({image_store.IMAGE_STORE_FILE}) beside the '
                'file')


def _store_name(store) -> str:
  return ('image store' if isinstance(store, image_store.ImageStore)
          else 'region store')


def scan_task(scan: FileScan, task: str, top: int) -> dict:
  """Task examples: fields, images in the store, texts, anchors."""
  store, no_store = _open_store(scan)
  images, texts = ImageIds(), TextStats(TextEncoder())
  anchors = None
  if store is not None and scan.vocab is not None:
    anchors = AnchorStats(scan.vocab)
  valid = 0
  for index, record in scan.decoded():
    try:
      example = task_pipeline.validate_task_example(record, task,
                                                    path=scan.path,
                                                    index=index)
      ids = task_pipeline.image_ids_of(example, task)
      if store is not None:
        _check_images_in_store(scan, store, task, ids, index)
    except Exception as e:  # pylint: disable=broad-except
      scan.errors.add(_as_record_error(e, scan.path, index))
      continue
    valid += 1
    for image_id in ids:
      images.add(image_id)
    encoded = [texts.add(t) for t in task_texts(example, task)]
    if anchors is not None:
      _add_task_anchors(anchors, store, example, task, ids, encoded)
  if anchors is not None:
    anchor_report = anchors.to_dict(top)
  else:
    anchor_report = _unavailable(no_store or f'no usable {records.META_FILE} '
                                 'beside the file: tag vocabulary unknown')
  return dict(valid_records=valid, images=len(images),
              captions=texts.to_dict(), anchors=anchor_report,
              region_store=store.path if store is not None else None)


def _check_images_in_store(scan, store, task, image_ids, index):
  field = 'image_ids' if task == 'nlvr2' else 'image_id'
  for image_id in image_ids:
    if image_id not in store:
      raise records.RecordError(scan.path, index, field,
                                f'image {image_id!r} is not in the '
                                f'{_store_name(store)} {store.path}')


def _add_task_anchors(anchors, store, example, task, image_ids, encoded):
  """Anchors of every (text, image) pair the example feeds; encoded: each
  text's TextStats.add result."""
  for image_id in image_ids:
    try:
      image = store[image_id]
    # Listed by the store's own inspection.
    except (records.RecordError, image_store.ImageError):
      anchors.images_unreadable += 1
      continue
    for text, text_encoded in zip(task_texts(example, task), encoded):
      anchors.add(text, text_encoded, image['region_tags'],
                  image['region_conf'])


# ------------------------------------------------------------ image store

def image_error_field(error: image_store.ImageError) -> str:
  """What an ImageError is about: the images.json field it names ('boxes',
  'tags', 'conf', 'file'), else 'file' for a file that cannot be read
  (missing) and 'image' for one that does not decode."""
  named = _FIELD_RE.search(str(error))
  if named:
    return named.group(1)
  return 'file' if isinstance(error.__cause__, OSError) else 'image'


def _check_store_image(store: image_store.ImageStore, image_id: str):
  """(item, its first bytes, its size in bytes) of one listed image, read
  and decoded as fine-tuning reads it (ImageStore[id]); raises ImageError
  naming the file and id."""
  item = store[image_id]
  file = store.file_of(image_id)
  try:
    with open(file, 'rb') as f:
      data = f.read(16)  # The signature; the size from the file system.
    num_bytes = os.path.getsize(file)
  except OSError as e:  # Gone since it was read.
    raise image_store.ImageError(f'{file}: image {image_id!r}: {e}') from e
  return item, data, num_bytes


def inspect_image_store(path: str, limit: int | None = None, top: int = 10,
                        max_errors: int = 20) -> dict:
  """The report of an image store (images.json; see the module docstring):
  images listed, readable, missing / corrupt (each an error naming its
  file and id), their sizes and bytes, their boxes and tags."""
  errors = ErrorLog(max_errors)
  try:
    store = image_store.ImageStore(path)
  except (OSError, ValueError) as e:
    problem = str(e)
    if problem.startswith(f'{path}: '):  # Do not name the file twice.
      problem = problem[len(path) + 2:]
    errors.add_file(path, problem)
    return dict(path=path, kind='unreadable', **errors.to_dict())
  _, vocab = read_folder_meta(store.root, errors)
  ids = store.image_ids()
  inspected = ids if limit is None else ids[:limit]
  regions, pixels = RegionStats(vocab), ImageStats()
  for image_id in inspected:
    try:
      item, head, num_bytes = _check_store_image(store, image_id)
    except image_store.ImageError as e:
      errors.add_image(e)
      continue
    regions.add(item)
    pixels.add_decoded(item['image'], image_format(head), num_bytes)
  report = dict(path=path, kind=IMAGES, task=None, records=len(ids),
                inspected=len(inspected), limit=limit,
                valid_records=pixels.count, images=pixels.count,
                missing_files=errors.by_field['file'],
                corrupt_images=errors.by_field['image'],
                **regions.to_dict(top, None), pixels=pixels.to_dict())
  report.update(errors.to_dict())
  return report


# ----------------------------------------------------------------- reports

def inspect_file(path: str, limit: int | None = None, top: int = 10,
                 max_errors: int = 20) -> dict:
  """The report of one record file (see the module docstring)."""
  scan = open_scan(path, limit, max_errors)
  if isinstance(scan, dict):
    return scan
  kind = detect_kind(scan)
  report = dict(path=path, kind=kind, task=None, records=scan.num_records,
                inspected=scan.num_inspected, limit=limit)
  if kind == PAIR:
    report.update(scan_pairs(scan, top))
  elif kind == REGIONS:
    report.update(scan_regions(scan, top))
  elif kind in tasks.TASKS:
    report.update(kind='task', task=kind, **scan_task(scan, kind, top))
  elif scan.num_records:
    scan.errors.add_file(path, 'cannot tell what this file holds: its '
                         'records have neither pair, region nor task fields')
  report.update(scan.errors.to_dict())
  return report


def inspect_path(path: str, limit: int | None = None, top: int = 10,
                 max_errors: int = 20) -> dict:
  """The report of a record file or image store, or of every record file
  (and the image store) in a folder.

  A folder's report is {path, kind: 'folder', files: [file reports, the
  images.json one last], num_errors: their total}. Raises
  FileNotFoundError for a missing path.
  max_errors bounds the error messages kept per file (all are counted).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or folder')
  if not os.path.isdir(path):
    if os.path.basename(path) == image_store.IMAGE_STORE_FILE:
      return inspect_image_store(path, limit, top, max_errors)
    return inspect_file(path, limit, top, max_errors)
  names = sorted(n for n in os.listdir(path) if n.endswith(RECORD_SUFFIX))
  files = [inspect_file(os.path.join(path, n), limit, top, max_errors)
           for n in names]
  images_json = image_store.store_file(path)
  if os.path.isfile(images_json):  # An image folder.
    files.append(inspect_image_store(images_json, limit, top, max_errors))
  report = dict(path=path, kind='folder', files=files,
                num_errors=sum(f['num_errors'] for f in files))
  if not files:
    report.update(num_errors=1, errors=[
        f'{path}: no {RECORD_SUFFIX} files nor '
        f'{image_store.IMAGE_STORE_FILE} in this folder'])
  return report


# -------------------------------------------------------------- formatting

def _num(x) -> str:
  """A compact number: ints as they are, floats to 4 significant digits."""
  if x is None:
    return '-'
  if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
    return str(int(x))
  return f'{x:.4g}'


def _range(s: dict | None, median=True) -> str:
  if not s:
    return '-'
  parts = [f'min {_num(s["min"])}', f'mean {_num(s["mean"])}']
  if median:
    parts.append(f'median {_num(s["median"])}')
  return ' / '.join(parts + [f'max {_num(s["max"])}'])


def _pairs(items) -> str:
  return ', '.join(f'{k} {v}' for k, v in items) or '-'


def _header(r: dict) -> str:
  what = {PAIR: 'pair file', REGIONS: 'region store', IMAGES: 'image store',
          'task': f'{r.get("task")} task file'}.get(r['kind'], r['kind'])
  line = f'{r["path"]}: {what}'
  if 'records' in r:
    line += f', {r["records"]} {"listed" if r["kind"] == IMAGES else "records"}'
    if r['limit'] is not None and r['inspected'] < r['records']:
      line += f' (only the first {r["inspected"]} inspected: --limit)'
  if 'images' in r:
    line += f', {r["images"]} images'
    if r['kind'] == IMAGES:
      line += (f' readable ({r["missing_files"]} missing, '
               f'{r["corrupt_images"]} corrupt)')
  return line


def _feature_line(f: dict | None) -> str:
  if f is None:
    return 'features  none (images only)'
  expected = (f' ({records.META_FILE} {f["expected_width"]})'
              if f['expected_width'] is not None else '')
  widths = '' if len(f['widths']) <= 1 else f' (seen: {f["widths"]})'
  return (f'features  width {_num(f["width"])}{expected}{widths}, '
          f'{"/".join(f["dtypes"]) or "-"}; values mean {_num(f["mean"])} '
          f'std {_num(f["std"])}; {f["zero_regions"]} all-zero regions')


def _pixel_lines(p: dict | None) -> list[str]:
  """The images' line; none when the records carry no image."""
  if p is None:
    return []
  size = lambda s: f'min {s["min"]} / max {s["max"]}'
  return [f'pixels    {p["count"]} images ({_pairs(p["formats"].items())}); '
          f'width {size(p["width"])}, height {size(p["height"])}; bytes '
          f'{_range(p["bytes"], median=False)}']


def _region_lines(r: dict) -> list[str]:
  g, b, t = r['regions'], r['boxes'], r['tags']
  lines = [
      _feature_line(r['features']),
      *_pixel_lines(r.get('pixels')),
      f'regions   {g["total"]} in {r["images"]} images; per image '
      f'{_range(g["per_image"])}; images without regions: '
      f'{g["images_without_regions"]}',
      f'boxes     area {_range(b["area"], median=False)}; {b["zero_area"]} '
      f'zero-area, {b["near_full"]} over {NEAR_FULL_AREA:.0%} of the image',
      f'conf      {_range(r["confidence"], median=False)}',
  ]
  untagged = ('-' if t['untagged_share'] is None
              else f'{t["untagged_share"]:.1%}')
  unknown = (f'; {t["not_in_vocab"]} regions with a tag not in '
             f'{records.META_FILE}' if t['not_in_vocab'] else '')
  lines.append(f'tags      {t["distinct"]} distinct; {untagged} of regions '
               f'untagged; top: {_pairs(t["top"])}{unknown}')
  return lines


def _text_lines(c: dict, label: str) -> list[str]:
  tokens = (f'; tokens {_range(c["tokens"])}' if c['tokens'] else
            f'; tokens unavailable ({c["tokenizer_problem"]})'
            if c['tokenizer_problem'] else '')
  return [f'{label:<9} {c["count"]}; words {_range(c["words"])}{tokens}']


def _anchor_lines(a: dict, what: str, one: str) -> list[str]:
  """what / one: what the pairs are called ('captions' / 'caption')."""
  if not a['available']:
    return [f'anchors   not computed: {a["reason"]}']
  if not a['pairs']:
    return [f'anchors   no {what}']
  hist = ' | '.join(f'{k}: {v}' for k, v in a['histogram'].items())
  lines = [f'anchors   {a["with_anchor_share"]:.1%} of {a["pairs"]} '
           f'{what} have one; {a["per_caption_mean"]:.2f} per {one}; '
           f'{hist}',
           f'          top word -> tag: {_pairs(a["top_anchors"])}',
           '          top unmatched tags (in the image, named by no word): '
           f'{_pairs(a["top_unmatched_tags"])}']
  if a['top_named_undetected']:
    lines.append('          named but no free region: '
                 f'{_pairs(a["top_named_undetected"])}')
  if a['images_unreadable']:
    lines.append(f'          {a["images_unreadable"]} images unreadable in '
                 'the store')
  return lines


def _error_lines(r: dict, max_errors: int) -> list[str]:
  if not r['num_errors']:
    return ['errors    none']
  by_field = ', '.join(f'{k} {v}' for k, v in
                       sorted(r.get('errors_by_field', {}).items()))
  lines = [f'errors    {r["num_errors"]}' +
           (f' (by field: {by_field})' if by_field else '')]
  shown = r['errors'][:max_errors]
  lines += [f'  {e}' for e in shown]
  if r['num_errors'] > len(shown):
    lines.append(f'  ... and {r["num_errors"] - len(shown)} more '
                 f'(--max_errors={max_errors})')
  return lines


def _body_lines(report: dict) -> list[str]:
  """What a file's valid records hold, section by section."""
  lines = []
  if report['kind'] in (PAIR, REGIONS, IMAGES):
    lines += _region_lines(report)
  is_task = report['kind'] == 'task'
  if 'captions' in report:
    lines += _text_lines(report['captions'],
                         'texts' if is_task else 'captions')
  if 'anchors' in report:
    lines += _anchor_lines(report['anchors'],
                           *(('text-image pairs', 'pair') if is_task
                             else ('captions', 'caption')))
  return lines


def format_report(report: dict, max_errors: int = 20) -> str:
  """The report as indented text (what main prints without --json)."""
  if report['kind'] == 'folder':
    parts = [format_report(f, max_errors) for f in report['files']]
    if report.get('errors'):
      parts.append('\n'.join(report['errors']))
    parts.append(f'{report["path"]}: files: {len(report["files"])}, '
                 f'errors: {report["num_errors"]}')
    return '\n\n'.join(parts)
  lines = []
  if report.get('valid_records') == 0:
    lines.append('no valid records to describe')
  elif 'valid_records' in report:  # Not for an unreadable file.
    lines += _body_lines(report)
  lines += _error_lines(report, max_errors)
  return '\n'.join([_header(report)] + ['  ' + l for l in lines])


# -------------------------------------------------------------------- main

def main(argv=None) -> int:
  """Prints the report; returns the exit code (1: errors found, 2: no
  such path)."""
  ap = argparse.ArgumentParser(
      prog='python -m cmal_jax.convert.inspect',
      description=__doc__.split('\n')[0])
  ap.add_argument('path', help='a record file or a folder of them')
  ap.add_argument('--limit', type=int, default=None,
                  help='inspect only the first N records of each file')
  ap.add_argument('--json', action='store_true',
                  help='print the report as one JSON object')
  ap.add_argument('--top', type=int, default=10,
                  help='how many tags / anchors to list')
  ap.add_argument('--max_errors', type=int, default=20,
                  help='errors to print per file (all are counted)')
  args = ap.parse_args(argv)
  if args.limit is not None and args.limit < 0:
    ap.error('--limit must be >= 0')
  try:
    report = inspect_path(args.path, args.limit, args.top, args.max_errors)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(report, args.max_errors))
  return 1 if report['num_errors'] else 0


if __name__ == '__main__':
  sys.exit(main())
