"""Reading a record file for inspection: its records one by one, its
folder's meta.json, what kind of file it is (from its records' fields),
and the checks every kind of record shares (feature width, pixels or
regions, a check's failure as a RecordError naming the record)."""

import collections
import os
import re
from typing import Iterator

import numpy as np

from cmal_jax.convert.inspect_stats import ErrorLog
from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks

# Kinds besides the task names.
PAIR, REGIONS, IMAGES = 'pair', 'regions', 'images'
KIND_SAMPLE = 16       # Records read to tell what a file holds.
_TASK_FILE_RE = re.compile(r'^(%s)_.+\.array_record$' % '|'.join(tasks.TASKS))


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


# ---------------------------------------------------- shared record checks

def expected_width(known: int | None, record: dict) -> int:
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


def as_record_error(error: Exception, path: str, index: int):
  """A validator's RecordError as it is; anything else a check raised on a
  malformed record becomes one naming the record, so the scan goes on."""
  if isinstance(error, records.RecordError):
    return error
  return records.RecordError(path, index, '*', f'malformed record '
                             f'({type(error).__name__}: {error})')


def stored_dtype(record: dict) -> str:
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


def feature_width(record: dict) -> int | None:
  """The width of a validated record's region_feats; None without any."""
  feats = record.get('region_feats')
  return feats.shape[1] if feats is not None and len(feats) else None
