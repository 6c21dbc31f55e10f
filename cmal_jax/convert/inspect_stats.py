"""The statistics an inspection report gathers (python -m
cmal_jax.convert.inspect): generic summaries and error log, then one class
per report section (regions, pixels, texts, anchors). Every record kind's
checker (inspect_pairs, inspect_regions, inspect_tasks, inspect_images)
feeds these."""

import collections
import math
import re

import numpy as np

from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data.tokenizer import load_tokenizer

NEAR_FULL_AREA = 0.9   # A box covering more of the image is suspicious.
ANCHOR_BINS = ('0', '1', '2', '3+')
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


def image_error_field(error: image_store.ImageError) -> str:
  """What an ImageError is about: the images.json field it names ('boxes',
  'tags', 'conf', 'file'), else 'file' for a file that cannot be read
  (missing) and 'image' for one that does not decode."""
  named = _FIELD_RE.search(str(error))
  if named:
    return named.group(1)
  return 'file' if isinstance(error.__cause__, OSError) else 'image'


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


def unavailable(reason: str) -> dict:
  return dict(available=False, reason=reason)

