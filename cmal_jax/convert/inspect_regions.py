"""Inspection of a region store (regions.array_record + its index): one
image per record, checked as region_store.validate_region_record checks it;
then the sidecar index, as RegionStore opens it."""

import functools

from cmal_jax.convert.inspect_scan import (
    FileScan, as_record_error, decode_record_image, expected_width,
    feature_width, stored_dtype, validate_visual)
from cmal_jax.convert.inspect_stats import ImageIds, ImageStats, RegionStats
from cmal_jax.data import records
from cmal_jax.data import region_store


def _check_region_record(scan: FileScan, record, index: int, width):
  """(validated region record, decoded image or None)."""
  validate = functools.partial(region_store.validate_region_record,
                               path=scan.path, index=index)
  rec = validate_visual(validate, record, expected_width(width, record))
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
      scan.errors.add(as_record_error(e, scan.path, index))
      continue
    valid += 1
    width = width or feature_width(rec)
    regions.add(rec, stored_dtype(record))
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

