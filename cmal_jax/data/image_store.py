"""Image store: image id -> the image and its boxes, the visual side of a
model that reads pixels (model.visual.input='pixels').

What a store returns for an id (the region store's record with the image
standing where region_feats would):

  image         uint8 [H, W, 3], as decoded (the pipelines resize it)
  region_boxes  float32 [N, 4], (x1, y1, x2, y2) normalised to [0, 1]
  region_tags   list[str] of length N ("" = no tag)
  region_conf   float32 [N]

N == 0 is valid: the pipelines then use the image's G x G grid cells.

Two stores share that interface (open_image_store picks the one a dataset
folder holds):

  ImageStore    a folder of image files (PNG, JPEG) and images.json,
                  {image_id: {"file": path, "boxes": [[x1, y1, x2, y2],
                   ...] in pixels, "tags": [...], "conf": [...]}}
                "file" is relative to the JSON's folder (or absolute);
                "boxes", "tags" and "conf" are optional (no boxes: the grid;
                no tags: ""; no conf: 1.0). The converters of COCO instances
                and Visual Genome objects write it (formats/image_boxes.py).
  StoredImages  a region store whose records carry the encoded image in an
                `image` field (the synthetic world's, world_tasks --images).

Image files are read when asked for; a missing or undecodable one raises
ImageError naming the file and the image id. read_image_file reads an image
file outside any store the same way (python -m cmal_jax.predict --image=
photo.jpg).

  store = open_image_store('/data/refcoco')
  store['139']['image'].shape   # (480, 640, 3)
"""

import io
import json
import os
from typing import Iterable

import numpy as np

from cmal_jax.data import records
from cmal_jax.data import region_store

IMAGE_STORE_FILE = 'images.json'
# A box may overhang its image by this many pixels (annotation rounding);
# it is clipped. More is bad input.
OVERHANG_PIXELS = 1.0


class ImageError(ValueError):
  """A missing, unreadable or badly described image: names where and which."""


# ------------------------------------------------------------------ pixels

def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, ...) -> uint8 [H, W, 3] RGB.

  Raises ValueError when the bytes are not a complete image."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Decodes now: a truncated file fails here.
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise ValueError(f'cannot decode the image: {type(e).__name__}: {e}') from e


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], a plain (bilinear, not
  aspect-preserving) resize, so boxes normalised by the image size stay
  valid. Returned as it is when it has the size already."""
  if image.shape[:2] == (size, size):
    return image
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((size, size),
                                                  Image.BILINEAR))


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (lossless)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


# -------------------------------------------------------- a folder of files

def store_file(directory: str) -> str:
  """Where a dataset folder's images.json lives."""
  return os.path.join(directory, IMAGE_STORE_FILE)


class ImageStore:
  """Read-only mapping image_id -> image and boxes, from image files and
  images.json (see the module docstring)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(
          f'{self.path}: no such image store (a JSON of {{image_id: '
          '{"file", "boxes", "tags"}}); write one with python -m '
          'cmal_jax.convert coco_instances|vg_objects')
    with open(self.path, encoding='utf-8') as f:
      try:
        self._entries = json.load(f)
      except json.JSONDecodeError as e:
        raise ImageError(f'{self.path}: malformed JSON: {e}') from e
    if not isinstance(self._entries, dict):
      raise ImageError(f'{self.path}: expected a JSON object {{image_id: '
                       f'{{"file", "boxes", "tags"}}}}, got '
                       f'{type(self._entries).__name__}')
    self.root = os.path.dirname(os.path.abspath(self.path))

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, image_id) -> bool:
    return image_id in self._entries

  def image_ids(self) -> list[str]:
    """All ids, in the JSON's order."""
    return list(self._entries)

  def file_of(self, image_id: str) -> str:
    """The image file of an id (checked to be named, not to exist)."""
    entry = self._entry(image_id)
    name = entry.get('file')
    if not isinstance(name, str) or not name:
      raise self._error(image_id, 'file', f'expected a file name, got '
                        f'{name!r}')
    return os.path.normpath(os.path.join(self.root, name))

  def __getitem__(self, image_id: str) -> dict:
    """The decoded image uint8 [H, W, 3] and its normalised regions."""
    file, about = self.file_of(image_id), f'image {image_id!r}: '
    image = decode_file(read_file(file, about), file, about)
    height, width = image.shape[:2]
    return dict(image_id=image_id, image=image,
                **self._regions(image_id, width, height))

  def encoded(self, image_id: str) -> dict:
    """The image file's bytes as they are (for pair records) and its
    normalised regions; the bytes are checked to decode."""
    file, about = self.file_of(image_id), f'image {image_id!r}: '
    data = read_file(file, about)
    height, width = decode_file(data, file, about).shape[:2]
    return dict(image_id=image_id, image=data,
                **self._regions(image_id, width, height))

  # -- helpers

  def _entry(self, image_id):
    try:
      entry = self._entries[image_id]
    except (KeyError, TypeError):
      raise KeyError(f'{self.path}: no image with id {image_id!r} '
                     f'({len(self)} images in the store)') from None
    if not isinstance(entry, dict):
      raise self._error(image_id, None, f'expected an object with "file", '
                        f'got {type(entry).__name__}')
    return entry

  def _error(self, image_id, field, problem):
    where = f"field '{field}': " if field else ''
    return ImageError(f'{self.path}: image {image_id!r}: {where}{problem}')

  def _regions(self, image_id, width, height):
    """region_boxes (normalised by the image size), tags and conf."""
    return entry_regions(
        self._entry(image_id), width, height,
        lambda field, problem: self._error(image_id, field, problem))


def read_file(file, about=''):
  """The bytes of an image file; ImageError naming it (and `about`, e.g.
  "image '139': ") when it cannot be read."""
  try:
    with open(file, 'rb') as f:
      return f.read()
  except OSError as e:
    raise ImageError(f'{file}: {about}cannot read the image file: '
                     f'{e.strerror or e}') from e


def decode_file(data, file, about=''):
  """decode_image of a file's bytes; ImageError naming the file (and
  `about`) when they are not an image."""
  try:
    return decode_image(data)
  except ValueError as e:
    raise ImageError(f'{file}: {about}{e}') from e


def entry_regions(entry, width, height, err):
  """The regions of an images.json entry ("boxes" in pixels, "tags",
  "conf"; all optional) of a width x height image: region_boxes
  (normalised), region_tags and region_conf. err(field, problem) makes the
  exception raised for a bad field."""
  boxes = entry.get('boxes', [])
  try:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  except (TypeError, ValueError):
    raise err('boxes', f'expected [[x1, y1, x2, y2], ...] in pixels, got '
              f'{entry.get("boxes")!r:.80}') from None
  n = len(boxes)
  tags = entry.get('tags', [''] * n)
  if not isinstance(tags, list) or not all(isinstance(t, str)
                                           for t in tags):
    raise err('tags', 'expected a list of str')
  if len(tags) != n:
    raise err('tags', f'has {len(tags)} tags for {n} boxes')
  conf = np.asarray(entry.get('conf', [1.0] * n), np.float64)
  if conf.shape != (n,) or not np.all(np.isfinite(conf)):
    raise err('conf', f'expected {n} finite numbers')
  return dict(region_boxes=normalise_boxes(boxes, width, height,
                                           lambda p: err('boxes', p)),
              region_tags=list(tags),
              region_conf=conf.astype(np.float32))


def read_image_file(path, regions=None) -> dict:
  """An image file outside any store as a store returns one (its image_id
  the path): decoded as ImageStore decodes its files, regions (an
  images.json entry's "boxes" in pixels, "tags", "conf"; None: no boxes,
  so the pipelines use the grid) normalised by its size. ImageError naming
  the file when it is missing, does not decode or has a bad box."""
  path = os.fspath(path)
  image = decode_file(read_file(path), path)
  height, width = image.shape[:2]
  where = lambda field, problem: ImageError(f'{path}: {field}: {problem}')
  return dict(image_id=path, image=image,
              **entry_regions(regions or {}, width, height, where))


def normalise_boxes(boxes, width, height, error):
  """Pixel (x1, y1, x2, y2) [N, 4] -> float32 normalised to [0, 1] of a
  width x height image; up to OVERHANG_PIXELS outside is clipped. error(
  problem) makes the exception raised for a bad box."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not np.all(np.isfinite(boxes)):
    raise error('contains NaN or Inf')
  size = np.array([width, height, width, height], np.float64)
  tol = OVERHANG_PIXELS
  for box in boxes:
    x1, y1, x2, y2 = box
    if (x1 > x2 or y1 > y2 or x1 < -tol or y1 < -tol or x2 > width + tol
        or y2 > height + tol):
      raise error(f'{[round(float(v), 2) for v in box]} is not an (x1, y1, '
                  f'x2, y2) box inside the {width}x{height} image')
  return np.clip(boxes / size, 0.0, 1.0).astype(np.float32)


def write_image_store(directory: str, entries: Iterable[tuple[str, dict]]
                      ) -> str:
  """Writes directory/images.json from (image_id, {"file", "boxes", ...})
  pairs (file relative to `directory`, or absolute), atomically. Returns
  its path."""
  path = store_file(directory)
  os.makedirs(directory, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(dict(entries), f)
  os.replace(tmp, path)
  return path


# ------------------------------------------- images inside a region store

class StoredImages:
  """A region store whose records carry the encoded image (`image` bytes)
  as an image store: the same ids, each image decoded when asked for."""

  def __init__(self, path: str):
    self.regions = region_store.RegionStore(path, visual='pixels')
    self.path = self.regions.path

  def __len__(self) -> int:
    return len(self.regions)

  def __contains__(self, image_id) -> bool:
    return image_id in self.regions

  def image_ids(self) -> list[str]:
    return self.regions.image_ids()

  def __getitem__(self, image_id: str) -> dict:
    record = self.regions[image_id]
    try:
      image = decode_image(record[records.IMAGE_FIELD])
    except ValueError as e:
      raise ImageError(f'{self.path}: image {image_id!r}: {e}') from e
    return dict(record, image=image)

  def encoded(self, image_id: str) -> dict:
    return self.regions[image_id]


def open_image_store(directory: str):
  """The image store of a dataset folder: images.json (ImageStore) if it
  has one, else its region store's images (StoredImages)."""
  if os.path.isfile(store_file(directory)):
    return ImageStore(store_file(directory))
  regions = region_store.store_path(directory)
  if os.path.exists(regions):
    return StoredImages(regions)
  raise FileNotFoundError(
      f'{directory}: no images for a model that reads pixels: neither '
      f'{IMAGE_STORE_FILE} (image files + boxes; python -m '
      'cmal_jax.convert coco_instances|vg_objects) nor '
      f'{region_store.REGION_STORE_FILE} with images (python -m '
      'cmal_jax.world.task_examples --images)')
