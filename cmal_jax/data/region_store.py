"""Region store: image id -> region record, the visual side of fine-tuning.

Task examples (tasks.py) name their images by id; fine-tuning gets the
regions of an id from a store, so detector features, image files and the
synthetic world all plug in through this one interface.

On disk a store is two files:

  regions.array_record          one msgpack record per image: image_id +
                                tasks.REGION_FIELDS (region_feats f32 [N, F]
                                (or f16, see write_region_store),
                                region_boxes f32 [N, 4], region_tags
                                list[str] of length N, region_conf f32 [N])
  regions.array_record.index.json
                                {image_id: record_index}

The index makes opening O(number of images), not O(data): records are read
(and validated) only when asked for.

A record may also carry its encoded image (`image`: PNG or JPEG bytes), for
a model that reads pixels; such a record may leave out region_feats.
RegionStore(..., visual='pixels') returns the image and no region_feats
(image_store.StoredImages decodes it).

  store = RegionStore('/data/vqa/regions.array_record')
  regions = store['task-vqa-train-0-0000003']   # dict, float32 arrays
"""

import itertools
import json
import os
from typing import Iterable

import numpy as np

from cmal_jax.data import records
from cmal_jax.data import tasks

REGION_STORE_FILE = 'regions.array_record'
INDEX_SUFFIX = '.index.json'
REGION_RECORD_FIELDS = ('image_id',) + tasks.REGION_FIELDS
# What visual='pixels' returns: the image where region_feats would be.
PIXEL_RECORD_FIELDS = ('image_id', records.IMAGE_FIELD, 'region_boxes',
                       'region_tags', 'region_conf')


def store_path(directory: str) -> str:
  """Where a dataset folder's region store lives."""
  return os.path.join(directory, REGION_STORE_FILE)


def index_path(path: str) -> str:
  """The sidecar index of the store at `path`."""
  return os.fspath(path) + INDEX_SUFFIX


def validate_region_record(record: dict, *, path: str, index: int,
                           feature_dim: int, visual: str = 'regions') -> dict:
  """Checks a decoded region record; returns it with float32 numpy arrays.

  visual='regions': image_id + tasks.REGION_FIELDS (and the image bytes when
  the record has them); 'pixels': PIXEL_RECORD_FIELDS, the image required.
  Raises records.RecordError naming path, record index and field.
  """
  if not isinstance(record, dict):
    raise records.RecordError(path, index, '*',
                              f'expected a dict, got {type(record).__name__}')
  # A region record is a pair record without the caption: reuse the pair
  # checks (shapes, finiteness, box range, tag list) with a dummy caption.
  checked = records.validate_pair(dict(record, caption=''), path=path,
                                  index=index, feature_dim=feature_dim,
                                  visual=visual)
  extra = sorted(set(record) - set(REGION_RECORD_FIELDS)
                 - {records.IMAGE_FIELD})
  if extra:
    raise records.RecordError(path, index, extra[0],
                              'unexpected field in a region record')
  if visual == 'pixels':
    return {k: checked[k] for k in PIXEL_RECORD_FIELDS}
  out = {k: checked[k] for k in REGION_RECORD_FIELDS}
  if records.IMAGE_FIELD in record:  # Kept: the store serves both kinds.
    out[records.IMAGE_FIELD] = record[records.IMAGE_FIELD]
  return out


def _feature_dim_of(record: dict, allow_empty: bool = False):
  """Width F of region_feats [N, F]; None if unknown (or N == 0, unless
  allow_empty: a region-less record's width fixes nothing for the others)."""
  shape = getattr(record.get('region_feats'), 'shape', None)
  if shape is None or len(shape) != 2 or (shape[0] == 0 and not allow_empty):
    return None
  return int(shape[1])


def _expected_dim(dim, record) -> int:
  """The width to validate `record` against while the store's is unknown."""
  if dim is not None:
    return dim
  own = _feature_dim_of(record, allow_empty=True)
  return 0 if own is None else own


def _as_stored(checked: dict, given: dict) -> dict:
  """The validated (float32) record, with region_feats back in float16 when
  the caller gave float16: the float16 -> float32 -> float16 trip is exact."""
  if getattr(given.get('region_feats'), 'dtype', None) == np.float16:
    return dict(checked, region_feats=checked['region_feats'].astype(
        np.float16))
  return checked


def stored_record(given: dict, *, path: str, index: int,
                  feature_dim: int | None) -> dict:
  """A region record as write_region_store stores it: validated (a
  RecordError names path, index and field; feature_dim None: the record's
  own width) and float32, float16 region_feats kept float16. A record with
  an `image` and no region_feats is checked as one for pixels."""
  rec = validate_region_record(given, path=path, index=index,
                               feature_dim=_expected_dim(feature_dim, given),
                               visual=records.visual_of(given))
  return _as_stored(rec, given)


def write_region_store(path: str, region_records: Iterable[dict],
                       feature_dim: int | None = None) -> int:
  """Writes region records to `path` + its index; returns how many.

  All records must share one feature width (feature_dim, or the width of the
  first record with regions) and have distinct image ids. Both files are
  written atomically (temp file + rename), the index after the data.
  region_feats given as float16 are stored as float16 (half the bytes);
  everything else is stored as float32. Reading converts back to float32.
  A record with an `image` and no region_feats is checked as one for
  pixels (records.validate_pair's visual='pixels').
  """
  path = os.fspath(path)
  index: dict[str, int] = {}

  def checked():
    dim = feature_dim
    for i, given in enumerate(region_records):
      if dim is None:
        dim = _feature_dim_of(given)
      rec = stored_record(given, path=path, index=i, feature_dim=dim)
      image_id = rec['image_id']
      if image_id in index:
        raise records.RecordError(
            path, i, 'image_id', f'duplicate id {image_id!r} (first at '
            f'record {index[image_id]})')
      index[image_id] = i
      yield rec

  n = records.write_records(path, checked())
  tmp = index_path(path) + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(index, f)
  os.replace(tmp, index_path(path))
  return n


def add_to_store(path: str, region_records: Iterable[dict],
                 feature_dim: int | None = None, *,
                 replaced: Iterable[str] = ()) -> int:
  """write_region_store with the records of the store already at `path`
  kept: those whose id is not in `replaced` come first, streamed from the
  old file while the new one is written (both files are replaced at the
  end, as write_region_store does), then `region_records`. Returns how many
  records the store holds."""
  path = os.fspath(path)
  if not os.path.exists(index_path(path)):
    return write_region_store(path, region_records, feature_dim)
  old = RegionStore(path, feature_dim)
  replaced = set(replaced)
  kept = (old[i] for i in old.image_ids() if i not in replaced)
  return write_region_store(path, itertools.chain(kept, region_records),
                            feature_dim)


def _meta_feature_dim(path: str):
  meta = os.path.join(os.path.dirname(os.path.abspath(path)),
                      records.META_FILE)
  if not os.path.exists(meta):
    return None
  with open(meta) as f:
    return json.load(f).get('feature_dim')


def check_indexed_id(record: dict, image_id: str, *, path: str,
                     index: int) -> dict:
  """`record`, read at the index's entry for image_id, if it is that
  image's; a stale or hand-edited index raises a RecordError."""
  if record['image_id'] != image_id:
    raise records.RecordError(
        path, index, 'image_id', f'is {record["image_id"]!r} but the index '
        f'maps {image_id!r} here; rewrite the store')
  return record


class RegionStore:
  """Read-only mapping image_id -> region record, backed by ArrayRecord.

  feature_dim: the expected width F; by default meta.json's feature_dim in
  the store's folder, else the width of the first record read.
  visual='pixels': records are returned with their image bytes and without
  region_feats (PIXEL_RECORD_FIELDS); feature_dim is not used.
  """

  def __init__(self, path: str, feature_dim: int | None = None,
               visual: str = 'regions'):
    self.path = os.fspath(path)
    self.visual = visual
    idx = index_path(self.path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(
          f'{self.path}: no such region store; write it with '
          f'region_store.write_region_store (synthetic tasks: python -m '
          f'cmal_jax.world.task_examples --out=DIR)')
    if not os.path.exists(idx):
      raise FileNotFoundError(
          f'{idx}: no region store index next to {self.path}; write the '
          f'store with region_store.write_region_store (or python -m '
          f'cmal_jax.world.task_examples)')
    self._source = records.open_source(self.path)
    with open(idx) as f:
      self._index = json.load(f)
    n = len(self._source)
    bad = [k for k, v in self._index.items()
           if not isinstance(v, int) or not 0 <= v < n]
    if not isinstance(self._index, dict) or bad or len(self._index) != n:
      raise ValueError(
          f'{idx}: index does not match {self.path} ({len(self._index)} ids '
          f'for {n} records{", bad entry " + repr(bad[0]) if bad else ""}); '
          f'rewrite the store')
    self.feature_dim = feature_dim or _meta_feature_dim(self.path)

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, image_id) -> bool:
    return image_id in self._index

  def image_ids(self) -> list[str]:
    """All ids, in record order."""
    return list(self._index)

  def record_index(self, image_id: str) -> int:
    """Where the index says the image's record is (KeyError if absent)."""
    return self._index[image_id]

  def __getitem__(self, image_id: str) -> dict:
    """Region record of an image: image_id + tasks.REGION_FIELDS."""
    try:
      i = self._index[image_id]
    except (KeyError, TypeError):
      raise KeyError(f'{self.path}: no regions for image id {image_id!r} '
                     f'({len(self)} images in the store)') from None
    rec = records.decode_record_at(self._source[i], self.path, i)
    if self.feature_dim is None and self.visual == 'regions':
      self.feature_dim = _feature_dim_of(rec)
    rec = validate_region_record(rec, path=self.path, index=i,
                                 feature_dim=_expected_dim(self.feature_dim,
                                                           rec),
                                 visual=self.visual)
    return check_indexed_id(rec, image_id, path=self.path, index=i)
