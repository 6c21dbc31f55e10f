"""ArrayRecord storage of examples, read back with Grain.

A dataset folder holds `{split}.array_record` (one msgpack record per
example, variable-length content left unpadded) and `meta.json`:

  {"tags": [canonical tag names; index = tag id],
   "synonyms": {word_or_phrase: canonical_tag},
   "feature_dim": F,
   "splits": {split: num_records},
   "generator": {...world params and seed...}}

A pair record (one image-caption pair) is a dict:
  image_id: str, caption: str,
  region_feats: float32 [N, F], region_boxes: float32 [N, 4] (x1, y1, x2, y2
  in [0, 1]), region_tags: list[str] of length N ("" = no tag),
  region_conf: float32 [N].  N == 0 is valid.
region_feats may be stored as float16 (half the bytes; converters'
`--float16`): validate_pair returns every array as float32.

For a model that reads pixels (model.visual.input='pixels') a pair record
carries its image instead: image: bytes (the encoded file, PNG or JPEG, any
size), next to region_boxes, region_tags and region_conf; region_feats may
be there too (the synthetic world keeps both) and is then passed over.

A split file may instead hold caption records {image_id, caption}, joined
with the folder's region (or image) store when read: pair_source.py. The
converters and the synthetic world write those; this module's pair checks
apply to the joined record.
"""

import json
import os
from typing import Any, Iterable

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

META_FILE = 'meta.json'
PAIR_FIELDS = ('image_id', 'caption', 'region_feats', 'region_boxes',
               'region_tags', 'region_conf')
IMAGE_FIELD = 'image'  # Encoded image bytes, for models that read pixels.
# The text fields of a pair, and all of a caption record (pair_source.py).
TEXT_FIELDS = ('image_id', 'caption')
# A pair record for pixels: the image stands where region_feats would.
PIXEL_PAIR_FIELDS = ('image_id', 'caption', IMAGE_FIELD, 'region_boxes',
                     'region_tags', 'region_conf')
_HOW_TO_CREATE = (
    'create it with: python -m cmal_jax.world.scenes --out=DIR --split=SPLIT '
    '--num=N')


class RecordError(ValueError):
  """A bad record: `{path}: record {index}: field '{field}': {problem}`."""

  def __init__(self, path, index, field, problem):
    super().__init__(f"{path}: record {index}: field '{field}': {problem}")
    self.path, self.index, self.field, self.problem = (
        path, index, field, problem)

  @classmethod
  def at(cls, path, index, field, problem) -> 'RecordError':
    return cls(path, index, field, problem)


# ---------------------------------------------------------------- encoding

def encode_record(example: dict) -> bytes:
  """dict of str/int/float/list/np.ndarray -> msgpack bytes."""
  return serialization.msgpack_serialize(example)


def decode_record(data: bytes) -> dict:
  return serialization.msgpack_restore(data)


def decode_record_at(data: bytes | dict, path: str, index: int) -> dict:
  """decode_record, with bytes that do not decode reported as a RecordError
  naming the file and record (msgpack raises several exception types).
  A dict is returned as it is: sources that decode themselves
  (tfds_source.TfdsPairSource) feed the same pipeline."""
  if isinstance(data, dict):
    return data
  try:
    return decode_record(data)
  except Exception as e:
    raise RecordError(path, index, '*', f'cannot decode: {e}') from e


class AtomicRecordWriter:
  """Writes one ArrayRecord file as `path.tmp`, renamed to `path` by
  commit(), so a crash midway never leaves a file at `path` that looks
  complete; abort() removes the temp file. Several may be open at once (a
  converter routing records to several files)."""

  def __init__(self, path: str):
    self.path, self.tmp, self.count = path, path + '.tmp', 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._writer = ArrayRecordWriter(self.tmp, 'group_size:1')

  def write(self, example: dict | bytes):
    self._writer.write(example if isinstance(example, bytes)
                       else encode_record(example))
    self.count += 1

  def commit(self) -> int:
    """Closes the file and renames it into place; returns its records."""
    self._writer.close()
    os.replace(self.tmp, self.path)
    return self.count

  def abort(self):
    self._writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def write_records(path: str, examples: Iterable[dict | bytes]) -> int:
  """Writes examples (dicts, or bytes already encoded) to an ArrayRecord file.

  Returns how many were written. Writes `path.tmp` and renames it at the
  end (AtomicRecordWriter).
  """
  writer = AtomicRecordWriter(path)
  try:
    for ex in examples:
      writer.write(ex)
    return writer.commit()
  except BaseException:
    writer.abort()
    raise


# ---------------------------------------------------------------- reading

class _CheckedSource(grain.sources.ArrayRecordDataSource):
  """ArrayRecordDataSource whose read errors name the file and record."""

  def __getitem__(self, record_key):
    try:
      return self._read_one(record_key)
    except (RuntimeError, OSError) as e:
      raise RecordError(self._path_str(), int(record_key), '*',
                        f'cannot read record (file corrupt?): {e}') from e

  def _read_one(self, record_key) -> bytes:
    """One record, read as the range [i, i + 1): array_record's read([i])
    (what the base class calls) takes time linear in the file's number of
    records, 8 ms a record at 1M records on this CPU against 0.2 ms for the
    range (docs/benchmarks.md, "The input pipeline at corpus scale")."""
    if not hasattr(self, '_reader_idx_and_position'):  # Another version.
      return super().__getitem__(record_key)
    reader_idx, position = self._reader_idx_and_position(record_key)
    self._ensure_reader_exists(reader_idx)
    reader = self._readers[reader_idx]
    if not hasattr(reader, 'read'):  # Not an ArrayRecordReader: as before.
      return super().__getitem__(record_key)
    return reader.read(position, position + 1)[0]

  def _path_str(self):
    p = self.paths
    return p[0] if isinstance(p, (list, tuple)) and len(p) == 1 else str(p)


def open_source(path: str) -> grain.sources.ArrayRecordDataSource:
  """Random-access Grain source over one ArrayRecord file of raw bytes."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such record file; {_HOW_TO_CREATE}')
  try:
    source = _CheckedSource([path])
    n = len(source)
    if n:  # Touch the last record: a truncated file fails here, not later.
      source[n - 1]
  except RecordError as e:
    raise RecordError(path, e.index, '*',
                      'file is truncated or corrupt; regenerate it') from e
  except (RuntimeError, OSError) as e:
    raise RecordError(path, 0, '*',
                      f'not a readable ArrayRecord file (truncated or '
                      f'corrupt?): {e}; regenerate it') from e
  return source


# ---------------------------------------------------------------- validation

def check_text_fields(example: dict, err):
  """TEXT_FIELDS present and str, in that order; err(field, problem) makes
  the exception raised."""
  for field in TEXT_FIELDS:
    if field not in example:
      raise err(field, 'missing')
    if not isinstance(example[field], str):
      raise err(field, f'expected str, got {type(example[field]).__name__}')


def _float_array(example, field, ndim, err):
  try:
    a = np.asarray(example[field], dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise err(field, f'not a float array: {e}') from e
  if a.ndim != ndim:
    raise err(field, f'expected {ndim}-d array, got shape {a.shape}')
  if not np.all(np.isfinite(a)):
    raise err(field, 'contains NaN or Inf')
  return a


def visual_of(record: dict) -> str:
  """'pixels' for a record with an image and no region_feats, else
  'regions' (a record with both serves either model)."""
  if IMAGE_FIELD in record and 'region_feats' not in record:
    return 'pixels'
  return 'regions'


def validate_pair(example: dict, *, path: str, index: int,
                  feature_dim: int, visual: str = 'regions') -> dict:
  """Checks a decoded pair record; returns it with float32 numpy arrays.

  visual='pixels' checks the image field (bytes; decoded by the caller)
  instead of region_feats, which is then left out of the result.
  """
  err = lambda field, problem: RecordError(path, index, field, problem)
  if visual == 'pixels':
    return _validate_pixel_pair(example, err)
  for field in PAIR_FIELDS:
    if field not in example:
      raise err(field, 'missing')
  check_text_fields(example, err)
  feats = _float_array(example, 'region_feats', 2, err)
  boxes = _float_array(example, 'region_boxes', 2, err)
  conf = _float_array(example, 'region_conf', 1, err)
  n, f = feats.shape
  if f != feature_dim and not (n == 0 and f == 0):
    raise err('region_feats', f'feature width {f} does not match config '
              f'model.region_feat_dim={feature_dim}')
  feats = feats.reshape(n, feature_dim)
  _check_boxes_and_conf(boxes, conf, n, err)
  tags = _region_tags(example, n, err)
  return dict(example, region_feats=feats, region_boxes=boxes,
              region_conf=conf, region_tags=list(tags))


def _check_boxes_and_conf(boxes, conf, n, err):
  """boxes [n, 4] normalised with x1 <= x2, y1 <= y2; conf [n]."""
  if boxes.shape != (n, 4):
    raise err('region_boxes', f'expected shape ({n}, 4), got {boxes.shape}')
  check_normalised_boxes(boxes, 'region_boxes', err)
  if conf.shape != (n,):
    raise err('region_conf', f'expected shape ({n},), got {conf.shape}')


def check_normalised_boxes(boxes, field, err):
  """boxes [n, 4] (x1, y1, x2, y2) within [0, 1], x1 <= x2 and y1 <= y2;
  err(field, problem) makes the exception raised."""
  if np.any((boxes < 0) | (boxes > 1)):
    raise err(field, 'coordinates outside [0, 1]')
  if np.any(boxes[:, 0] > boxes[:, 2]) or np.any(boxes[:, 1] > boxes[:, 3]):
    raise err(field, 'needs x1 <= x2 and y1 <= y2')


def _region_tags(example, n, err):
  """region_tags as a list of n str."""
  tags = example['region_tags']
  if isinstance(tags, dict):  # msgpack_restore turns empty lists into {}.
    try:
      tags = [tags[k] for k in sorted(tags, key=int)]
    except (TypeError, ValueError):  # Keys that are not list indices.
      raise err('region_tags', 'expected a list of str') from None
  if (not isinstance(tags, (list, tuple))
      or not all(isinstance(t, str) for t in tags)):
    raise err('region_tags', 'expected a list of str')
  if len(tags) != n:
    raise err('region_tags', f'has {len(tags)} tags for {n} regions')
  return tags


def _validate_pixel_pair(example: dict, err) -> dict:
  """validate_pair for pixels: image bytes, boxes, tags and confidences;
  region_feats (if any) dropped."""
  for field in PIXEL_PAIR_FIELDS:
    if field not in example:
      raise err(field, 'missing' + (' (a model that reads pixels needs '
                                    'the encoded image)'
                                    if field == IMAGE_FIELD else ''))
  check_text_fields(example, err)
  if not isinstance(example[IMAGE_FIELD], bytes) or not example[IMAGE_FIELD]:
    raise err(IMAGE_FIELD, 'expected the encoded image (PNG or JPEG bytes), '
              f'got {type(example[IMAGE_FIELD]).__name__}')
  boxes = _float_array(example, 'region_boxes', 2, err)
  conf = _float_array(example, 'region_conf', 1, err)
  n = len(boxes)
  _check_boxes_and_conf(boxes, conf, n, err)
  tags = _region_tags(example, n, err)
  checked = dict(example, region_boxes=boxes, region_conf=conf,
                 region_tags=list(tags))
  checked.pop('region_feats', None)
  return checked


# ---------------------------------------------------------------- folder

def split_path(directory: str, split: str) -> str:
  return os.path.join(directory, f'{split}.array_record')


def read_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no dataset metadata; {_HOW_TO_CREATE}')
  with open(path) as f:
    return json.load(f)


def check_meta_compatible(directory: str, meta: dict[str, Any]):
  """Raises if directory's meta.json has other tags/feature_dim; returns it."""
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    return None
  old = read_meta(directory)
  for key in ('tags', 'feature_dim'):
    if old.get(key) != meta.get(key):
      raise ValueError(
          f'{path}: existing {key}={old.get(key)!r} differs from new '
          f'{meta.get(key)!r}; write to a fresh directory')
  return old


def write_meta(directory: str, meta: dict[str, Any]) -> dict[str, Any]:
  """Writes meta.json, merging `splits` into an existing one.

  Refuses to merge when tags or feature_dim differ: the splits would not
  share one vocabulary / feature space.
  """
  path = os.path.join(directory, META_FILE)
  meta = dict(meta)
  old = check_meta_compatible(directory, meta)
  if old is not None:
    meta['splits'] = {**old.get('splits', {}), **meta.get('splits', {})}
  os.makedirs(directory, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return meta
