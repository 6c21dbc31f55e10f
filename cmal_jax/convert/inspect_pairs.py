"""Inspection of a pair file ({split}.array_record, meta.json beside it):
each pair checked as pipeline.decode_pair checks it (a caption record
joined with the folder's store first, as pair_source.JoinedPairs joins it);
its image described once, its caption and anchors every time."""

import functools
import os

from cmal_jax.convert.inspect_scan import (
    FileScan, as_record_error, decode_record_image, expected_width,
    feature_width, stored_dtype, validate_visual)
from cmal_jax.convert.inspect_stats import (
    AnchorStats, ImageIds, ImageStats, RegionStats, TextEncoder, TextStats,
    unavailable)
from cmal_jax.data import pair_source
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import shards


def _check_pair(scan: FileScan, example, index: int, width):
  """(validated pair, decoded image or None): pipeline.decode_pair's
  checks, for regions and / or pixels."""
  if not isinstance(example, dict):
    raise records.RecordError(scan.path, index, '*', 'record is not a dict')
  validate = functools.partial(records.validate_pair, path=scan.path,
                               index=index)
  pair = validate_visual(validate, example, expected_width(width, example))
  if scan.vocab is not None:
    pipeline.tag_ids_of(pair['region_tags'], scan.vocab, path=scan.path,
                        index=index)
  return pair, decode_record_image(pair, scan.path, index)


def _joiner(scan: FileScan):
  """The folder's store, for the file's caption records (a caption shard's:
  its own store shard); a RecordError (for every caption record) when the
  folder has none."""
  store = shards.store_shard_of(scan.path)
  if store is not None and os.path.exists(store):
    pixels = scan.meta_width is None  # Pixel folders have no feature width.
    return pair_source.JoinedPairs(
        None, shards.open_shard_store(store, pixels=pixels,
                                      feature_dim=scan.meta_width),
        path=scan.path, pixels=pixels)
  joiner = pair_source.folder_joiner(scan.folder, scan.path, scan.meta_width)
  if joiner is None:
    raise records.RecordError(
        scan.path, 0, 'image_id', f'a caption record, but {scan.folder} has '
        'no region or image store to join it with')
  return joiner


def scan_pairs(scan: FileScan, top: int) -> dict:
  """Pair records: images, regions, captions, anchors."""
  width = scan.meta_width
  images, regions = ImageIds(), RegionStats(scan.vocab)
  pixels, texts = ImageStats(), TextStats(TextEncoder())
  anchors = AnchorStats(scan.vocab) if scan.vocab is not None else None
  valid = by_reference = 0
  joiner = None
  for index, example in scan.decoded():
    try:
      if pair_source.is_caption_record(example):
        joiner = _joiner(scan) if joiner is None else joiner
        by_reference += 1
        example = joiner.join(example, index)
      pair, image = _check_pair(scan, example, index, width)
    except Exception as e:  # pylint: disable=broad-except
      scan.errors.add(as_record_error(e, scan.path, index))
      continue
    valid += 1
    width = width or feature_width(pair)
    if images.add(pair['image_id']):  # Describe each image once.
      regions.add(pair, stored_dtype(example))
      if image is not None:
        pixels.add(image, pair[records.IMAGE_FIELD])
    encoded = texts.add(pair['caption'])
    if anchors is not None:
      anchors.add(pair['caption'], encoded, pair['region_tags'],
                  pair['region_conf'])
  return dict(
      valid_records=valid, caption_records=by_reference, images=len(images),
      **regions.to_dict(top, scan.meta_width), pixels=pixels.to_dict(),
      captions=texts.to_dict(),
      anchors=(anchors.to_dict(top) if anchors is not None else unavailable(
          f'no usable {records.META_FILE} beside the file: tag vocabulary '
          'unknown')))

