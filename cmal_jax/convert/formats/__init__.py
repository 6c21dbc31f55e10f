"""Readers for the official downstream annotation formats.

Each reader turns an official annotation file into the task example dicts of
`cmal_jax/data/tasks.py` and returns `(examples, skipped)`, where `skipped`
counts the records left out, per short reason:

  vqa_v2.read_vqa_v2      VQA v2 questions (+ annotations) JSON   -> vqa
  snli_ve.read_snli_ve    SNLI-VE JSONL                           -> ve
  nlvr2.read_nlvr2        NLVR2 JSONL                             -> nlvr2
  refcoco.read_refcoco    RefCOCO/+/g refs pickle + instances     -> rec
  karpathy.read_karpathy  Karpathy split JSON (COCO, Flickr30K)   -> retrieval

Bad input raises a `FormatError` naming the file, the place in it (`line 7`
for JSONL, a record index or id for JSON and pickle) and the field. With
`on_error='skip'` a bad record is left out instead and counted under its
error's `reason`; nothing is dropped without being counted. A problem with a
whole file (missing, not JSON, no top-level list) always raises: no example
could be kept from it.

`python -m cmal_jax.convert vqa_v2|snli_ve|nlvr2|refcoco|karpathy` runs
them (convert/tasks_cli.py).

This module also holds the bookkeeping the readers share (locations, field
checks, JSON/JSONL loading, the skip policy, `summary`: the line every
convert sub-command prints) and `write_task_split` / `read_task_split`,
which store task examples as ArrayRecord files.
"""

import json
import math
import os
from typing import Any, Callable, Iterable, Iterator

from cmal_jax.data.tasks import TASK_FIELDS, task_path

ON_ERROR = ('raise', 'skip')


class FormatError(ValueError):
  """Bad input: `{path}: {where}: field '{field}': {problem}`.

  `field` is None when the problem is not one field's (malformed JSON);
  `reason` is the short key under which `on_error='skip'` counts it.
  """

  def __init__(self, path: str, where: str, field: str | None, problem: str,
               reason: str):
    prefix = f"{path}: {where}: "
    if field is not None:
      prefix += f"field '{field}': "
    super().__init__(prefix + problem)
    self.path, self.where, self.field = path, where, field
    self.problem, self.reason = problem, reason


class SkipExample(Exception):
  """A record that, by standard practice, is not an example (not an error).

  Raised by a converter; always counted under `reason` in `skipped`, whatever
  `on_error` says (e.g. SNLI-VE pairs whose gold label is '-').
  """

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


# ---------------------------------------------------------------- locations

def _type_names(types: tuple[type, ...]) -> str:
  return ' or '.join(t.__name__ for t in types)


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
  """isinstance, except that a bool is not accepted as an int or float."""
  if isinstance(value, bool) and bool not in types:
    return False
  return isinstance(value, types)


class Location:
  """Where one raw record sits in a file; makes errors that name it.

  `line` is the 1-based line number for JSONL records, else None.
  """

  def __init__(self, path: str, where: str, line: int | None = None):
    self.path, self.where, self.line = path, where, line

  def error(self, field: str | None, problem: str,
            reason: str) -> FormatError:
    """Returns (does not raise) a FormatError at this location."""
    return FormatError(self.path, self.where, field, problem, reason)

  def field(self, record: dict, name: str, types: type | tuple[type, ...],
            label: str | None = None) -> Any:
    """Returns record[name], checked to have one of `types`.

    Raises `missing_field` / `bad_type` errors that call the field `label`
    (default `name`; e.g. 'answers[2].answer' for nested fields).
    """
    types = types if isinstance(types, tuple) else (types,)
    label = name if label is None else label
    if not isinstance(record, dict):
      raise self.error(label, f'its record is a {type(record).__name__}, '
                       f'not an object', 'bad_type')
    if name not in record:
      raise self.error(label, 'missing', 'missing_field')
    value = record[name]
    if not _has_type(value, types):
      raise self.error(label, f'expected {_type_names(types)}, got '
                       f'{type(value).__name__} {value!r}', 'bad_type')
    return value

  def items(self, record: dict, name: str, label: str | None = None,
            *, what: str, reason: str) -> list:
    """Returns record[name] as a non-empty list; empty raises `reason`."""
    values = self.field(record, name, list, label)
    if not values:
      raise self.error(label or name, f'no {what}', reason)
    return values


def record_location(path: str, list_name: str, index: int, record: Any,
                    id_field: str) -> Location:
  """A JSON/pickle record's location: `{id_field} {id}` when it has a usable
  int id (what a user searches the file for), else `{list_name}[{index}]`."""
  record_id = record.get(id_field) if isinstance(record, dict) else None
  if _has_type(record_id, (int,)):
    return Location(path, f'{id_field} {record_id}')
  return Location(path, f'{list_name}[{index}]')


def check_image(loc: Location, field: str, image_id: str,
                image_ids: set[str] | None):
  """Raises `unknown_image` if `image_ids` is given and lacks `image_id`."""
  if image_ids is not None and image_id not in image_ids:
    raise loc.error(field, f'image {image_id!r} is not in the region store',
                    'unknown_image')


def is_finite_number(value: Any) -> bool:
  return _has_type(value, (int, float)) and math.isfinite(value)


def image_size(loc: Location, record: dict) -> tuple[float, float]:
  """An image record's (width, height) fields, which must be positive
  numbers (COCO images, Visual Genome image_data)."""
  sizes = []
  for name in ('width', 'height'):
    value = loc.field(record, name, (int, float))
    if not (is_finite_number(value) and value > 0):
      raise loc.error(name, f'expected a positive size, got {value!r}',
                      'bad_image_size')
    sizes.append(value)
  return sizes[0], sizes[1]


# ---------------------------------------------------------------- skipping

class Collector:
  """The examples kept and the records skipped, under one on_error policy."""

  def __init__(self, on_error: str):
    if on_error not in ON_ERROR:
      raise ValueError(f'on_error={on_error!r}; expected one of '
                       f'{list(ON_ERROR)}')
    self.on_error = on_error
    self.examples: list[dict] = []
    self.skipped: dict[str, int] = {}

  def count(self, reason: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1

  def bad(self, error: FormatError):
    """Raises `error`, or counts it when skipping."""
    if self.on_error == 'raise':
      raise error
    self.count(error.reason)

  def add(self, convert: Callable[..., dict | list[dict]], *args):
    """Keeps what `convert(*args)` returns: one example or a list of them.

    A FormatError goes to `bad`; a SkipExample is always counted.
    """
    try:
      result = convert(*args)
    except FormatError as e:
      self.bad(e)
      return
    except SkipExample as e:
      self.count(e.reason)
      return
    self.examples.extend([result] if isinstance(result, dict) else result)

  def result(self) -> tuple[list[dict], dict[str, int]]:
    return self.examples, dict(self.skipped)


def summary(what: str, n: int, skipped: dict[str, int]) -> str:
  """'Wrote 3 images to DIR; skipped 2: box_outside_image 1, ...'.

  The line every convert sub-command prints: `n` written and, per reason,
  the records skipped (a Collector's `skipped`)."""
  text = f'Wrote {n} {what}'
  if skipped:
    counts = ', '.join(f'{reason} {count}'
                       for reason, count in sorted(skipped.items()))
    text += f'; skipped {sum(skipped.values())}: {counts}'
  else:
    text += '; skipped none'
  return text


# ---------------------------------------------------------------- files

def check_exists(path: str, what: str):
  """Raises FileNotFoundError naming `path` and what it should have been."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file ({what})')


def load_json(path: str, what: str) -> Any:
  """Returns the parsed JSON file; a malformed file always raises."""
  check_exists(path, what)
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise FormatError(path, 'file', None, f'malformed JSON: {e}',
                        'malformed_json') from e


def top_level_list(path: str, data: Any, key: str) -> list:
  """Returns data[key], which must be a list (a whole-file error if not)."""
  loc = Location(path, 'top level')
  if not isinstance(data, dict):
    raise loc.error(None, f'expected a JSON object with a {key!r} list, got '
                    f'{type(data).__name__}', 'bad_type')
  return loc.field(data, key, list)


def iter_jsonl(path: str, collector: Collector,
               what: str) -> Iterator[tuple[Location, dict]]:
  """Yields (location, object) for each JSON-object line of a JSONL file.

  Blank lines (e.g. a final newline) hold no record and are passed over;
  malformed lines and non-objects go to `collector.bad`.
  """
  check_exists(path, what)
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      loc = Location(path, f'line {number}', line=number)
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        collector.bad(loc.error(None, f'malformed JSON: {e}',
                                'malformed_json'))
        continue
      if not isinstance(record, dict):
        collector.bad(loc.error(None, f'expected a JSON object, got '
                                f'{type(record).__name__}', 'bad_type'))
        continue
      yield loc, record


def convert_jsonl(path: str, convert: Callable[..., dict], *args,
                  on_error: str, what: str
                  ) -> tuple[list[dict], dict[str, int]]:
  """Runs `convert(location, record, *args)` on every line of a JSONL file.

  Returns (examples, skipped) as every reader does.
  """
  collector = Collector(on_error)
  for loc, record in iter_jsonl(path, collector, what):
    collector.add(convert, loc, record, *args)
  return collector.result()


# ---------------------------------------------------------------- storage

def _missing_fields(task: str, example: Any) -> list[str]:
  if not isinstance(example, dict):
    return list(TASK_FIELDS[task])
  return [f for f in TASK_FIELDS[task] if f not in example]


def write_task_split(directory: str, task: str, split: str,
                     examples: Iterable[dict]) -> str:
  """Writes task examples to `task_path(directory, task, split)`.

  Returns that path. Raises ValueError (naming the example's index) if an
  example lacks one of the task's fields, before anything is written.
  """
  # Imported here: records pulls in flax/JAX, which the readers do not need.
  from cmal_jax.data import records
  path = task_path(directory, task, split)
  examples = list(examples)
  for index, example in enumerate(examples):
    missing = _missing_fields(task, example)
    if missing:
      raise ValueError(f'{path}: example {index}: missing {task} fields '
                       f'{missing}')
  records.write_records(path, examples)
  return path


def read_task_split(directory: str, task: str, split: str) -> list[dict]:
  """Returns the examples stored by `write_task_split`, as a list of dicts.

  Raises FileNotFoundError for a missing split, records.RecordError (naming
  the record) for one that lacks a field of the task.
  """
  from cmal_jax.data import records
  path = task_path(directory, task, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such task file; convert the '
                            f'official {task} annotations with python -m '
                            f'cmal_jax.convert (tasks_cli.py)')
  source = records.open_source(path)
  examples = []
  for index in range(len(source)):
    example = records.decode_record(source[index])
    for field in _missing_fields(task, example):
      raise records.RecordError(path, index, field, 'missing')
    examples.append(_empty_lists_back(example))
  return examples


def _empty_lists_back(example: dict) -> dict:
  """Some flax versions restore an empty msgpack list as {}; every container
  in a task example is a list, so map those back."""
  return {k: [] if v == {} else v for k, v in example.items()}


# The readers import the helpers above, so they come last (no import cycle).
from cmal_jax.convert.formats.karpathy import read_karpathy  # noqa: E402
from cmal_jax.convert.formats.nlvr2 import read_nlvr2  # noqa: E402
from cmal_jax.convert.formats.refcoco import read_refcoco  # noqa: E402
from cmal_jax.convert.formats.snli_ve import read_snli_ve  # noqa: E402
from cmal_jax.convert.formats.vqa_v2 import read_vqa_v2  # noqa: E402
