"""Inspection of a task file ({task}_{split}.array_record): each example
checked as task_pipeline.validate_task_example checks it, its images looked
up in the region or image store beside it, and the anchors of every (text,
image) pair the fine-tuning pipeline feeds."""

import os

from cmal_jax.convert.inspect_scan import FileScan, as_record_error
from cmal_jax.convert.inspect_stats import (
    AnchorStats, ImageIds, TextEncoder, TextStats, unavailable)
from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import task_pipeline


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
      scan.errors.add(as_record_error(e, scan.path, index))
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
    anchor_report = unavailable(no_store or f'no usable {records.META_FILE} '
                                'beside the file: tag vocabulary unknown')
  return dict(valid_records=valid, images=len(images),
              captions=texts.to_dict(), anchors=anchor_report,
              region_store=store.path if store is not None else None)


def _check_images_in_store(scan, store, task, image_ids, index):
  field = task_pipeline.image_id_field(task)
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

