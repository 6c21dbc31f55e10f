"""Pre-training pairs by reference: caption records joined with the folder's
visual store at read time.

A split file `{split}.array_record` holds one record per pair, either

  a caption record  {image_id: str, caption: str}: the pair's regions (or
                    image) are the folder's store's record of image_id;
  a pair record     records.PAIR_FIELDS (or PIXEL_PAIR_FIELDS): the image's
                    features (or bytes) copied into the record, the layout
                    before references; still read as it is.

An image with k captions is stored once in the store, not k times: the
converters (`convert captions`) and the synthetic world write caption
records. The store is the one fine-tuning reads: regions.array_record (+
its index; region_store.py), or for a model that reads pixels the image
store the folder holds (image_store.open_image_store).

JoinedPairs gives pipeline.decode_pair the same pair record either way, so
training on caption records equals, bitwise, training on the copied pair
records of the same data (tests/test_pair_source.py). The join happens in
Grain's map step, on the process that reads the record.

  source, path = open_split('/data/coco', 'pretrain', pixels=False,
                            feature_dim=2048)
  source[3]   # dict: image_id, caption, region_feats, region_boxes, ...
"""

import functools
import os

from cmal_jax.data import image_store
from cmal_jax.data import records
from cmal_jax.data import region_store

CAPTION_FIELDS = records.TEXT_FIELDS


def is_caption_record(record) -> bool:
  """True for a caption record (names its image, carries no visual side)."""
  return (isinstance(record, dict) and 'region_feats' not in record
          and records.IMAGE_FIELD not in record)


def has_store(directory: str, pixels: bool) -> bool:
  """Whether the folder holds the visual store caption records are joined
  with (pixels: images.json or a region store with images)."""
  if pixels and os.path.isfile(image_store.store_file(directory)):
    return True
  return os.path.exists(region_store.store_path(directory))


def open_store(directory: str, *, pixels: bool, feature_dim: int | None):
  """The folder's visual store: its image store (pixels) or region store.
  A missing or truncated store file raises here, naming it."""
  if pixels:
    return image_store.open_image_store(directory)
  return region_store.RegionStore(region_store.store_path(directory),
                                  feature_dim=feature_dim)


def check_caption_record(record: dict, *, path: str, index: int):
  """Raises a RecordError naming path, index and field unless `record` is
  exactly CAPTION_FIELDS, each a str."""
  records.check_text_fields(
      record, functools.partial(records.RecordError, path, index))
  extra = sorted(set(record) - set(CAPTION_FIELDS))
  if extra:
    raise records.RecordError(path, index, extra[0],
                              'unexpected field in a caption record')


class JoinedPairs:
  """Random-access source: record i of a split file as a pair record (a
  dict), a caption record joined with the store's record of its image.

  A caption record whose image the store lacks raises a RecordError naming
  the split file, the record and its image_id (data.on_error='skip' counts
  it under image_id); an image the store cannot read raises one naming the
  image field, after the store's own message.
  """

  def __init__(self, source, store, *, path: str, pixels: bool):
    self.source, self.store, self.path, self.pixels = (
        source, store, path, pixels)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    index = int(index)
    return self.join(
        records.decode_record_at(self.source[index], self.path, index), index)

  def join(self, record, index: int) -> dict:
    """A decoded record of the split as a pair record."""
    if not is_caption_record(record):
      return record  # A pair record, or not a dict (decode_pair says so).
    check_caption_record(record, path=self.path, index=index)
    return dict(self.visual_record(record['image_id'], index),
                caption=record['caption'])

  def visual_record(self, image_id: str, index: int) -> dict:
    """The store's record of image_id (pixels: the encoded image)."""
    try:
      if self.pixels:
        return self.store.encoded(image_id)
      return self.store[image_id]
    except KeyError as e:
      raise records.RecordError(self.path, index, 'image_id',
                                e.args[0]) from None
    except image_store.ImageError as e:
      raise records.RecordError(self.path, index, records.IMAGE_FIELD,
                                str(e)) from e


def folder_joiner(directory: str, path: str, feature_dim: int | None):
  """A JoinedPairs (no source: its join only) for the records of `path`
  with `directory`'s store, the region store if it has one, else its image
  store (convert.inspect's view); None when it has neither."""
  for pixels in (False, True):
    if has_store(directory, pixels):
      store = open_store(directory, pixels=pixels, feature_dim=feature_dim)
      return JoinedPairs(None, store, path=path, pixels=pixels)
  return None


def open_split(directory: str, split: str, *, pixels: bool,
               feature_dim: int | None):
  """The pairs of `directory`'s split: (source, path).

  With a visual store in the folder, a JoinedPairs over the split file;
  without one, the file's records as they are (pair records), after
  checking that its first record is not a caption record, which would need
  the store: that is an error here, at start, naming the folder.
  """
  path = records.split_path(directory, split)
  source = records.open_source(path)
  if has_store(directory, pixels):
    store = open_store(directory, pixels=pixels, feature_dim=feature_dim)
    return JoinedPairs(source, store, path=path, pixels=pixels), path
  if len(source) and _first_is_caption_record(source, path):
    wanted = (f'{image_store.IMAGE_STORE_FILE} or '
              f'{region_store.REGION_STORE_FILE} with images' if pixels
              else region_store.REGION_STORE_FILE)
    raise FileNotFoundError(
        f'{path}: holds caption records (image_id + caption) but '
        f'{directory} has no store of their images ({wanted}): write the '
        'captions into the folder of the store they name (python -m '
        'cmal_jax.convert captions --regions=DIR --out=DIR)')
  return source, path


def _first_is_caption_record(source, path) -> bool:
  """Whether record 0 is a caption record; one that does not decode is left
  to the pipeline (data.on_error decides)."""
  try:
    return is_caption_record(records.decode_record_at(source[0], path, 0))
  except records.RecordError:
    return False
