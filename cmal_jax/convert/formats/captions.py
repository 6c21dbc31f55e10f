"""Caption files checked against a region (or image) store -> pre-training
caption records, by reference.

  python -m cmal_jax.convert captions --format=coco|vg|jsonl \\
      --input=FILE --regions=STORE_DIR --split=pretrain [--copy_features]

Caption formats (one record per caption):
  coco   COCO caption JSON: {"images": [...], "annotations": [{"image_id":
         int, "id": int, "caption": str}, ...]}
  vg     Visual Genome region descriptions: [{"id": image_id, "regions":
         [{"region_id", "image_id", "phrase", "x", "y", "width", "height"},
         ...]}, ...]; each phrase is a caption of the whole image (the
         region's box is not kept; the pair uses the detector's regions).
  jsonl  one {"image_id": int or str, "caption": str} per line.

A caption's regions are those the region store (bottom_up.py) holds under
str(image_id); or, when the folder holds an image store instead
(images.json, image_boxes.py: COCO instances or VG objects with the image
files), its image file and boxes, for a model that reads pixels (meta.json's
feature_dim is null). By default the output is written into the store's own
folder (--out defaults to --regions), the folder layout of records.py, so
`--config.data.dir=DIR` pre-trains on it:
  {split}.array_record  caption records {image_id, caption}: pre-training
                        joins each with the store's record of its image at
                        read time (data/pair_source.py), so an image with k
                        captions is stored once
  meta.json             the store's tags, synonyms, feature_dim and
                        feature_dtype, and splits (merged with the other
                        splits already there)
Pre-training reads the splits `pretrain` and `val` (config.data.train_split,
config.data.eval_split).

--copy_features writes the earlier layout instead, pair records
(records.PAIR_FIELDS) that carry their image's features (region_feats in
the store's feature_dtype) or image bytes, into any --out folder: a
self-contained file, but an image with k captions is stored k times
(COCO: 5, VG: ~50).

Streaming: records are written one at a time and JSONL is read line by
line; COCO and VG JSON are parsed whole (json.load), so those files must fit
in memory. Bad captions (a missing field, an empty caption, an image with no
regions in the store, or an image file that does not decode) raise a
FormatError naming the file, the line (JSONL) or record (`id 5` /
`annotations[3]`, `region_id 7`) and the field; with skip_bad they are left
out and counted per reason.
"""

import dataclasses
import os
from typing import Iterator

from cmal_jax.data import image_store, records, region_store
from cmal_jax.convert.formats import (Collector, FormatError, Location,
                                   iter_jsonl, load_json, record_location,
                                   top_level_list)

FORMATS = ('coco', 'vg', 'jsonl')


@dataclasses.dataclass(frozen=True)
class Caption:
  """One caption as read; id_field is the field its image id came from."""
  loc: Location
  id_field: str
  image_id: str
  text: str


def _caption(loc: Location, record: dict, id_field: str, text_field: str,
             image_id=None) -> Caption:
  """Checks record's image id (unless given) and caption text."""
  if image_id is None:
    image_id = loc.field(record, id_field, (int, str))
  text = loc.field(record, text_field, str).strip()
  if not text:
    raise loc.error(text_field, 'empty caption', 'empty_caption')
  return Caption(loc, id_field, str(image_id).strip(), text)


def _checked(collector: Collector, read, *args):
  """read(*args), or None after collector.bad when it raises FormatError."""
  try:
    return read(*args)
  except FormatError as e:
    collector.bad(e)
    return None


# ---------------------------------------------------------------- readers

def coco_captions(path: str, collector: Collector) -> Iterator[Caption]:
  data = load_json(path, 'COCO caption JSON')
  for index, ann in enumerate(top_level_list(path, data, 'annotations')):
    loc = record_location(path, 'annotations', index, ann, 'id')
    caption = _checked(collector, _caption, loc, ann, 'image_id', 'caption')
    if caption:
      yield caption


def vg_captions(path: str, collector: Collector) -> Iterator[Caption]:
  """Each region's phrase; its image id is the region's image_id (the
  image's id where the region has none)."""
  images = load_json(path, 'Visual Genome region descriptions JSON')
  if not isinstance(images, list):
    raise FormatError(path, 'top level', None, f'expected a JSON list of '
                      f'images, got {type(images).__name__}', 'bad_type')
  for index, image in enumerate(images):
    loc = record_location(path, '', index, image, 'id')
    image_id = _checked(collector, loc.field, image, 'id', (int, str))
    if image_id is None:
      continue
    regions = _checked(collector, loc.field, image, 'regions', list)
    if regions is None:
      continue
    for j, region in enumerate(regions):
      rloc = record_location(path, f'{loc.where}: regions', j, region,
                             'region_id')
      own = isinstance(region, dict) and 'image_id' in region
      caption = _checked(collector, _caption, rloc, region,
                         'image_id' if own else 'id', 'phrase',
                         None if own else image_id)
      if caption:
        yield caption


def jsonl_captions(path: str, collector: Collector) -> Iterator[Caption]:
  for loc, record in iter_jsonl(path, collector, 'JSONL captions'):
    caption = _checked(collector, _caption, loc, record, 'image_id',
                       'caption')
    if caption:
      yield caption


READERS = {'coco': coco_captions, 'vg': vg_captions, 'jsonl': jsonl_captions}


# ---------------------------------------------------------------- joining

def pair_records(captions: Iterator[Caption], store, feature_dtype: str,
                 collector: Collector, copy_features: bool = False
                 ) -> Iterator[dict]:
  """The records of the captions whose image the store holds (and can
  read): caption records {image_id, caption}, or with copy_features pair
  records (records.PAIR_FIELDS; from an image store, the image's bytes in
  place of region_feats). The others go to collector.bad."""
  images = isinstance(store, image_store.ImageStore)
  last_id, last = None, None  # Captions of an image often follow.
  for caption in captions:
    if caption.image_id not in store:
      what = 'is not in' if images else 'has no region features in'
      collector.bad(caption.loc.error(
          caption.id_field, f'image {caption.image_id!r} {what} '
          f'{store.path}', 'unknown_image'))
      continue
    if caption.image_id != last_id:
      last_id, last = caption.image_id, _visual_side(store, caption)
    if isinstance(last, FormatError):  # Each of its captions is counted.
      collector.bad(last)
      continue
    if not copy_features:
      yield {'image_id': caption.image_id, 'caption': caption.text}
    elif images:
      yield {**last, 'caption': caption.text}
    else:
      yield {**last, 'caption': caption.text,
             'region_feats': last['region_feats'].astype(feature_dtype,
                                                          copy=False)}


def _visual_side(store, caption: Caption):
  """The store's record of the caption's image (an image store: the file's
  bytes and its boxes), or the FormatError of an image that cannot be
  read."""
  if not isinstance(store, image_store.ImageStore):
    return store[caption.image_id]
  try:
    return store.encoded(caption.image_id)
  except image_store.ImageError as e:
    return caption.loc.error(caption.id_field, str(e), 'bad_image')


def open_store(regions_dir: str):
  """The folder's region store (or image store, images.json) and its
  meta.json."""
  if os.path.exists(image_store.store_file(regions_dir)):
    store = image_store.ImageStore(image_store.store_file(regions_dir))
  else:
    store = region_store.RegionStore(region_store.store_path(regions_dir))
  if not os.path.exists(os.path.join(regions_dir, records.META_FILE)):
    raise FileNotFoundError(
        f'{regions_dir}/{records.META_FILE}: no metadata next to the region '
        'store; write the store with python -m cmal_jax.convert '
        'bottom_up')
  return store, records.read_meta(regions_dir)


def convert_captions(fmt: str, input_path: str, regions_dir: str,
                     out_dir: str | None, split: str, *,
                     skip_bad: bool = False, copy_features: bool = False
                     ) -> tuple[int, dict[str, int]]:
  """Writes out_dir/{split}.array_record and merges out_dir/meta.json.

  out_dir None: regions_dir. Caption records (the default) must be written
  into regions_dir, beside the store they name; copy_features writes pair
  records anywhere. Returns (records written, {reason: captions skipped}).
  """
  if fmt not in READERS:
    raise ValueError(f'format={fmt!r}; expected one of {list(FORMATS)}')
  out_dir = regions_dir if out_dir is None else out_dir
  if not copy_features and not _same_folder(out_dir, regions_dir):
    raise ValueError(
        f'--out={out_dir} is not the store\'s folder --regions={regions_dir}: '
        'caption records name images of that store, and pre-training joins '
        'them with the store of their own folder. Leave --out out (it '
        'defaults to --regions), or pass --copy_features to write pair '
        'records that carry their image (each image once per caption).')
  store, store_meta = open_store(regions_dir)
  feature_dtype = store_meta.get('feature_dtype', 'float32')
  meta = {'tags': store_meta['tags'],
          'synonyms': store_meta.get('synonyms', {}),
          'feature_dim': store_meta['feature_dim'],
          'feature_dtype': feature_dtype}
  records.check_meta_compatible(out_dir, meta)  # Fail before the long part.
  collector = Collector('skip' if skip_bad else 'raise')
  captions = READERS[fmt](os.fspath(input_path), collector)
  n = records.write_records(
      records.split_path(out_dir, split),
      pair_records(captions, store, feature_dtype, collector, copy_features))
  records.write_meta(out_dir, dict(meta, splits={split: n}))
  return n, dict(collector.skipped)


def _same_folder(a: str, b: str) -> bool:
  return os.path.abspath(a) == os.path.abspath(b)
