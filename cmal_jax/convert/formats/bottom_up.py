"""Bottom-up-attention TSV region features -> a region store.

  python -m cmal_jax.convert bottom_up --tsv=FILE[,FILE...] \\
      --vocab=objects_vocab.txt --out=DIR [--float16] [--skip_bad]

The input is what the bottom-up-attention `generate_tsv.py` writes (and
its forks): one image per line, tab-separated, no header, columns

  image_id, image_w, image_h, num_boxes, boxes, features
      [, objects_id, objects_conf, attrs_id [, attrs_conf]]

boxes are float32 [num_boxes, 4] pixel (x1, y1, x2, y2), features float32
[num_boxes, F], objects_conf float32 [num_boxes], each base64 of the
array's raw bytes. objects_id is the class index into the detector's
vocabulary; writers store it as int64 (numpy's argmax) or float32, and
some as int32, so its dtype is told by its decoded length: 8 bytes a box is
int64; 4 bytes a box is float32 when every value is a whole number, else
int32 (small int32 ids read as float32 are tiny non-integers). attrs_id and
attrs_conf are passed over: our records have no attributes.

The layout is told by the first line's column count (6, 9 or 10), or given
(`fields`: a name of LAYOUTS or the column names in order). LXMERT's
obj36 TSVs (`img_id, img_h, img_w, objects_id, ..., features`) also have 10
columns; a first line whose 4th column is not a count and whose 8th is is
read with that layout.

The vocabulary file (Visual Genome's 1600-class `objects_vocab.txt`) has
one class per line, index = class id, synonyms comma-separated; the first
is the canonical name.

Output, in `out_dir` (which must not hold a store yet):
  regions.array_record (+ .index.json)  region_store.write_region_store,
      keyed by str(image_id) (or its trailing number, numeric_ids); boxes
      divided by image_w / image_h into [0, 1]; region_tags = canonical
      name of objects_id ('' without objects_id); region_conf =
      objects_conf (1.0 without); region_feats float32 (float16 with
      float16=True; read back as float32).
  meta.json  tags (canonical names, index = class id), synonyms (every
      synonym, canonical ones included -> canonical), feature_dim,
      feature_dtype, source.

It streams: one line is read, checked, written and dropped at a time, so
memory stays flat however large the TSV (the index of image ids is the only
thing that grows). Data first, then the index, then meta.json; the data is
written to a temp file that an exception removes, so an interrupted run
leaves nothing a later one would take for a complete store.

Bad lines raise a FormatError `{file}: line {n}: field '{field}':
{problem}`; with skip_bad they are left out and counted per reason (the
FormatError's). A box may reach 1 pixel past the image (detectors round);
it is clipped. Beyond that, it is an error.
"""

import base64
import binascii
import csv
import os
import re
import sys
from typing import Iterator, Sequence

import numpy as np

from cmal_jax.data import records, region_store
from cmal_jax.convert.formats import (Collector, FormatError, Location,
                                   check_exists)

REQUIRED_FIELDS = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes',
                   'features')
LAYOUTS = {
    'bottom_up': REQUIRED_FIELDS,
    'bottom_up_objects': REQUIRED_FIELDS + ('objects_id', 'objects_conf',
                                            'attrs_id'),
    'bottom_up_attrs': REQUIRED_FIELDS + ('objects_id', 'objects_conf',
                                          'attrs_id', 'attrs_conf'),
    'lxmert': ('img_id', 'img_h', 'img_w', 'objects_id', 'objects_conf',
               'attrs_id', 'attrs_conf', 'num_boxes', 'boxes', 'features'),
}
# Column names some writers use for ours.
FIELD_ALIASES = {'img_id': 'image_id', 'img_w': 'image_w', 'img_h': 'image_h'}
BOX_TOLERANCE = 1.0  # Pixels a box may reach past the image (then clipped).
FLOAT16_MAX = float(np.finfo(np.float16).max)
_COUNT_RE = re.compile(r'[0-9]+')
_TRAILING_NUMBER_RE = re.compile(r'([0-9]+)$')


# ---------------------------------------------------------------- vocabulary

def read_vocab(path: str) -> tuple[list[str], dict[str, str]]:
  """Detector class vocabulary -> (tags, synonyms).

  tags: canonical names, index = class id (line number - 1).
  synonyms: every name on a line -> that line's canonical name. A name that
  is some class's canonical name always means that class; one listed as a
  synonym on two lines keeps the first (a word can anchor one tag only).
  Trailing blank lines are ignored; a blank line before a class, or a
  canonical name used twice, would shift or merge class ids: FormatError.
  """
  check_exists(path, 'detector class vocabulary')
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  tags, first_line, names = [], {}, []
  for number, line in enumerate(lines, 1):
    loc = Location(path, f'line {number}', line=number)
    synonyms = [s.strip() for s in line.split(',') if s.strip()]
    if not synonyms:
      raise loc.error(None, f'no class name (class id {number - 1}); class '
                      'ids are line numbers, so every line needs one',
                      'bad_vocab')
    if synonyms[0] in first_line:
      raise loc.error(None, f'class {synonyms[0]!r} is also line '
                      f'{first_line[synonyms[0]]}', 'bad_vocab')
    first_line[synonyms[0]] = number
    tags.append(synonyms[0])
    names.append(synonyms)
  synonyms = {tag: tag for tag in tags}
  for line_names in names:
    for name in line_names[1:]:
      synonyms.setdefault(name, line_names[0])
  return tags, synonyms


# ---------------------------------------------------------------- layout

def resolve_fields(fields: str | Sequence[str]) -> tuple[str, ...]:
  """A LAYOUTS name or column names -> column names, aliases resolved.

  Raises ValueError if a required column is missing.
  """
  if isinstance(fields, str):
    if fields in LAYOUTS:
      fields = LAYOUTS[fields]
    else:
      fields = [f.strip() for f in fields.split(',')]
  names = tuple(FIELD_ALIASES.get(f, f) for f in fields)
  missing = [f for f in REQUIRED_FIELDS if f not in names]
  if missing:
    raise ValueError(f'fields={list(fields)} lacks the columns {missing}; '
                     f'known layouts: {sorted(LAYOUTS)}')
  return names


def detect_fields(loc: Location, row: list[str]) -> tuple[str, ...]:
  """The layout of a file, told by its first line's columns."""
  by_count = {len(LAYOUTS[name]): name for name in
              ('bottom_up', 'bottom_up_objects', 'bottom_up_attrs')}
  if len(row) not in by_count:
    raise loc.error(None, f'has {len(row)} columns; bottom-up TSVs have 6, 9 '
                    'or 10 (pass fields=... for another layout)',
                    'column_count')
  name = by_count[len(row)]
  # LXMERT's layout also has 10 columns, with num_boxes 8th instead of 4th.
  if (name == 'bottom_up_attrs' and not _COUNT_RE.fullmatch(row[3])
      and _COUNT_RE.fullmatch(row[7])):
    name = 'lxmert'
  return resolve_fields(name)


# ---------------------------------------------------------------- one line

def _count(loc: Location, field: str, text: str, reason: str,
           positive: bool = False) -> int:
  """A non-negative (or positive) integer column."""
  if not _COUNT_RE.fullmatch(text) or (positive and int(text) == 0):
    kind = 'positive' if positive else 'non-negative'
    raise loc.error(field, f'expected a {kind} integer, got {text[:40]!r}',
                    reason)
  return int(text)


def _decode_base64(loc: Location, field: str, text: str) -> bytes:
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    hint = ''
    if text.startswith(("b'", 'b"')):
      hint = (" (it looks like a Python bytes repr: the writer called str() "
              "on b64encode's bytes instead of .decode())")
    raise loc.error(field, f'malformed base64: {e}{hint}',
                    'malformed_base64') from None


def _float_rows(loc: Location, field: str, data: bytes, num_boxes: int,
                width: int | None) -> np.ndarray:
  """float32 bytes -> [num_boxes, width] (width None: whatever divides;
  0 when there are no boxes)."""
  if num_boxes == 0:
    ok = not data
  elif width is None:
    ok = len(data) > 0 and len(data) % (4 * num_boxes) == 0
  else:
    ok = len(data) == 4 * num_boxes * width
  if not ok:
    shape = f'{num_boxes} x {"F" if width is None else width}'
    raise loc.error(field, f'{len(data)} bytes are not float32 [{shape}] '
                    f'for num_boxes={num_boxes}', 'num_boxes_mismatch')
  if num_boxes == 0:
    return np.zeros((0, width or 0), np.float32)
  array = np.frombuffer(data, np.float32)
  if not np.all(np.isfinite(array)):
    raise loc.error(field, 'contains NaN or Inf', 'not_finite')
  return array.reshape(num_boxes, -1)


def _class_ids(loc: Location, data: bytes, num_boxes: int) -> np.ndarray:
  """objects_id bytes -> int64 [num_boxes]; the dtype told by the length
  (see the module docstring)."""
  if num_boxes and len(data) == 8 * num_boxes:
    return np.frombuffer(data, np.int64)
  if len(data) != 4 * num_boxes:
    raise loc.error('objects_id', f'{len(data)} bytes are neither int64 nor '
                    f'32-bit ids for num_boxes={num_boxes}',
                    'num_boxes_mismatch')
  as_float = np.frombuffer(data, np.float32)
  if np.all(np.isfinite(as_float)) and np.all(as_float == np.round(as_float)):
    return as_float.astype(np.int64)
  return np.frombuffer(data, np.int32).astype(np.int64)


def _normalised_boxes(loc: Location, boxes: np.ndarray, width: int,
                      height: int) -> np.ndarray:
  """Pixel boxes [N, 4] -> [0, 1] boxes, clipped within BOX_TOLERANCE."""
  size = np.array([width, height, width, height], np.float64)
  outside = (boxes < -BOX_TOLERANCE) | (boxes > size + BOX_TOLERANCE)
  if np.any(outside):
    i = int(np.argwhere(outside)[0, 0])
    raise loc.error('boxes', f'box {i} {boxes[i].tolist()} lies outside the '
                    f'{width}x{height} image by more than {BOX_TOLERANCE:g} '
                    'pixel', 'box_outside_image')
  flipped = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
  if np.any(flipped):
    i = int(np.argmax(flipped))
    raise loc.error('boxes', f'box {i} {boxes[i].tolist()} needs x1 <= x2 and '
                    'y1 <= y2', 'bad_box')
  clipped = np.clip(boxes.astype(np.float64), 0, size)
  return (clipped / size).astype(np.float32)


class LineParser:
  """Turns TSV lines into region records, holding what lines must share.

  feature_dim: the width every line must have; None: fixed by the first
  line with boxes. seen: image key -> (file, line) where it was read (the
  path string is shared, so this stays small per image).
  """

  def __init__(self, tags: Sequence[str], *, float16: bool = False,
               numeric_ids: bool = False, feature_dim: int | None = None):
    self.tags = list(tags)
    self.float16, self.numeric_ids = float16, numeric_ids
    self.feature_dim = feature_dim
    self._width_from = 'feature_dim' if feature_dim else None
    self.seen: dict[str, tuple[str, int]] = {}

  def parse(self, loc: Location, row: list[str],
            fields: tuple[str, ...]) -> dict:
    """One TSV row -> region record (region_store.REGION_RECORD_FIELDS)."""
    if len(row) != len(fields):
      raise self._column_count_error(loc, row, fields)
    column = dict(zip(fields, row))
    image_id = self._image_key(loc, column['image_id'])
    width = _count(loc, 'image_w', column['image_w'], 'bad_image_size', True)
    height = _count(loc, 'image_h', column['image_h'], 'bad_image_size', True)
    num_boxes = _count(loc, 'num_boxes', column['num_boxes'], 'bad_count')
    boxes = _float_rows(loc, 'boxes',
                        _decode_base64(loc, 'boxes', column['boxes']),
                        num_boxes, 4)
    feats = self._features(loc, column['features'], num_boxes)
    tags, conf = self._objects(loc, column, num_boxes)
    record = {'image_id': image_id, 'region_feats': feats,
              'region_boxes': _normalised_boxes(loc, boxes, width, height),
              'region_tags': tags, 'region_conf': conf}
    # Only a good line claims its id and fixes the width (a skipped one
    # must not).
    self.seen[image_id] = (loc.path, loc.line)
    if num_boxes and self.feature_dim is None:
      self.feature_dim = feats.shape[1]
      self._width_from = f'{loc.path}: {loc.where}'
    return record

  def _column_count_error(self, loc, row, fields) -> FormatError:
    if len(row) < len(fields):
      return loc.error(fields[len(row)], f'missing: the line has {len(row)} '
                       f'columns, the layout {list(fields)} has '
                       f'{len(fields)}', 'column_count')
    return loc.error(None, f'has {len(row)} columns, the layout '
                     f'{list(fields)} has {len(fields)}', 'column_count')

  def _image_key(self, loc: Location, raw: str) -> str:
    key = raw.strip()
    if self.numeric_ids:
      number = _TRAILING_NUMBER_RE.search(key)
      if not number:
        raise loc.error('image_id', f'{raw!r} does not end in a number '
                        '(numeric_ids)', 'bad_image_id')
      key = str(int(number.group(1)))
    if not key:
      raise loc.error('image_id', 'empty', 'bad_image_id')
    if key in self.seen:
      path, line = self.seen[key]
      raise loc.error('image_id', f'duplicate id {key!r} (first at {path}: '
                      f'line {line})', 'duplicate_image_id')
    return key

  def _features(self, loc: Location, text: str,
                num_boxes: int) -> np.ndarray:
    """float32 (or float16) [num_boxes, F], F the file's one width (fixed
    by `parse` once a good line has boxes)."""
    data = _decode_base64(loc, 'features', text)
    feats = _float_rows(loc, 'features', data, num_boxes, None)
    if self.feature_dim is not None:
      if num_boxes and feats.shape[1] != self.feature_dim:
        raise loc.error('features', f'width {feats.shape[1]} differs from '
                        f'{self.feature_dim} (set by {self._width_from})',
                        'feature_width')
      if not num_boxes:  # An empty [0, F] of the file's width.
        feats = feats.reshape(0, self.feature_dim)
    if not self.float16:
      return feats
    if feats.size and np.abs(feats).max() > FLOAT16_MAX:
      raise loc.error('features', f'values beyond float16 range '
                      f'(|x| > {FLOAT16_MAX:g}); convert without float16',
                      'float16_overflow')
    return feats.astype(np.float16)

  def _objects(self, loc: Location, column: dict,
               num_boxes: int) -> tuple[list[str], np.ndarray]:
    """(region_tags [N] canonical names, region_conf float32 [N])."""
    if 'objects_id' not in column:
      return [''] * num_boxes, np.ones(num_boxes, np.float32)
    ids = _class_ids(loc, _decode_base64(loc, 'objects_id',
                                         column['objects_id']), num_boxes)
    unknown = (ids < 0) | (ids >= len(self.tags))
    if np.any(unknown):
      i = int(np.argmax(unknown))
      raise loc.error('objects_id', f'class id {int(ids[i])} of box {i} is '
                      f'not in the vocabulary ({len(self.tags)} classes)',
                      'unknown_object')
    if 'objects_conf' in column:
      conf = _float_rows(loc, 'objects_conf', _decode_base64(
          loc, 'objects_conf', column['objects_conf']), num_boxes, 1)
      conf = conf.reshape(num_boxes)
    else:
      conf = np.ones(num_boxes, np.float32)
    return [self.tags[i] for i in ids.tolist()], conf


# ---------------------------------------------------------------- files

def tsv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, columns) of each non-blank line, read one at a time."""
  # A line holds every region's features: far past csv's default limit.
  csv.field_size_limit(sys.maxsize)
  # newline='': csv handles '\r\n' itself (Python 2's csv wrote those).
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter='\t')
    for row in reader:
      if row:
        yield reader.line_num, row


def region_records(tsv_paths: Sequence[str], parser: LineParser,
                   collector: Collector,
                   fields: tuple[str, ...] | None = None) -> Iterator[dict]:
  """Region records of every good line of the files, in order.

  Bad lines go to collector.bad (raise, or count). Raises ValueError at the
  end if no line was kept, or none had a box (the feature width would be
  unknown): raised inside the stream, so no store is left behind.
  """
  kept = 0
  for path in tsv_paths:
    layout = fields
    for number, row in tsv_rows(path):
      loc = Location(path, f'line {number}', line=number)
      try:
        layout = layout or detect_fields(loc, row)
        record = parser.parse(loc, row, layout)
      except FormatError as e:
        collector.bad(e)
        continue
      kept += 1
      yield record
  files = ', '.join(tsv_paths)
  if not kept:
    raise ValueError(f'{files}: no image kept (skipped: '
                     f'{collector.skipped})')
  if parser.feature_dim is None:
    raise ValueError(f'{files}: no image has a box, so the feature width is '
                     'unknown; pass feature_dim')


def _check_fresh(out_dir: str):
  """Refuses a folder with a store or meta.json: a new store must never be
  mixed with, or half-replace, an old one."""
  store = region_store.store_path(out_dir)
  for path in (store, region_store.index_path(store),
               os.path.join(out_dir, records.META_FILE)):
    if os.path.exists(path):
      raise FileExistsError(f'{path} exists; convert into a fresh directory '
                            '(or delete the old store)')


def convert_bottom_up(tsv_paths: Sequence[str], vocab_path: str,
                      out_dir: str, *,
                      fields: str | Sequence[str] | None = None,
                      float16: bool = False, skip_bad: bool = False,
                      numeric_ids: bool = False,
                      feature_dim: int | None = None
                      ) -> tuple[int, dict[str, int]]:
  """Converts bottom-up TSV files into a region store in out_dir.

  Returns (images written, {reason: lines skipped}). Raises FormatError on
  the first bad line unless skip_bad. See the module docstring.
  """
  tsv_paths = [os.fspath(p) for p in tsv_paths]
  if not tsv_paths:
    raise ValueError('no TSV files given')
  for path in tsv_paths:
    check_exists(path, 'bottom-up-attention TSV')
  _check_fresh(out_dir)
  tags, synonyms = read_vocab(vocab_path)
  layout = None if fields is None else resolve_fields(fields)
  parser = LineParser(tags, float16=float16, numeric_ids=numeric_ids,
                      feature_dim=feature_dim)
  collector = Collector('skip' if skip_bad else 'raise')
  n = region_store.write_region_store(
      region_store.store_path(out_dir),
      region_records(tsv_paths, parser, collector, layout), feature_dim)
  records.write_meta(out_dir, {
      'tags': tags, 'synonyms': synonyms, 'feature_dim': parser.feature_dim,
      'feature_dtype': 'float16' if float16 else 'float32',
      'source': {'format': 'bottom_up_tsv', 'tsv': tsv_paths,
                 'vocab': os.fspath(vocab_path), 'images': n,
                 'skipped': dict(collector.skipped)}})
  return n, dict(collector.skipped)
