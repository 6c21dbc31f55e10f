"""Inspection of an image store (images.json: image files + boxes): every
listed image read and decoded as fine-tuning reads it (ImageStore[id]); a
missing or corrupt file is an error naming the file and the image id."""

import os

from cmal_jax.convert.inspect_scan import IMAGES, read_folder_meta
from cmal_jax.convert.inspect_stats import (
    ErrorLog, ImageStats, RegionStats, image_format)
from cmal_jax.data import image_store


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

