"""Where a run writes, local or gs://: workdir paths, files written whole,
moving an old run aside."""

import os
import time

from etils import epath


def move_aside(path):
  """Renames `path` to `path.replaced-<time>` (never deletes a run). On GCS
  a folder's rename copies and deletes each object: slow, but nothing goes."""
  target = f'{path}.replaced-{time.strftime("%Y%m%d-%H%M%S")}'
  epath.Path(path).rename(target)
  return target


def is_remote(path):
  """True for a URL (gs://bucket/dir): an object store, where renames are
  not atomic, objects cannot be appended to and ArrayRecord cannot read."""
  return '://' in os.fspath(path)


def workdir_path(path, *parts):
  """epath.Path of path/parts: a URL as it is, a local path made absolute
  (Orbax wants absolute local paths; os.path.abspath('gs://b') would give
  '<cwd>/gs:/b')."""
  path = epath.Path(path, *parts)
  return path if is_remote(path) else epath.Path(os.path.abspath(path))


def write_text_atomic(path, text):
  """Writes `text` to `path` (local or gs://) so that no reader ever sees
  it half written. Every JSON file of a workdir goes through here."""
  path = epath.Path(path)
  if is_remote(path):
    # An uploaded object appears whole or not at all; a rename would be
    # copy + delete there, so write the object directly.
    path.write_text(text)
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
