"""COCO instances / Visual Genome objects + image files -> an image store;
a folder of image files alone -> an image store of grid images.

  python -m cmal_jax.convert coco_instances \\
      --instances=annotations/instances_train2014.json --images=train2014 \\
      --out=DIR [--synonyms=FILE] [--skip_bad]
  python -m cmal_jax.convert vg_objects --objects=objects.json \\
      [--image_data=image_data.json] --images=VG --out=DIR \\
      [--vocab=objects_vocab.txt | --max_tags=1600] [--skip_bad]
  python -m cmal_jax.convert image_folder --images=DIR --out=DIR [--skip_bad]

Each writes, in a fresh `out_dir`, what a model that reads pixels needs
from raw images alone (image_store.py):

  images.json  {image_id: {"file": path relative to out_dir, "boxes":
               [[x1, y1, x2, y2], ...] in pixels, "tags": [...]}}: the
               annotated objects as the image's regions, each tagged with
               its class name, so CMAL's anchors pair caption words with
               them. An image without objects keeps an empty list (the
               pipelines then use its grid cells).
  meta.json    tags (the class names: the tag vocabulary), synonyms,
               feature_dim null (no region features), source.

COCO: `images` [{"id", "file_name", "width", "height"}], `annotations`
[{"image_id", "bbox": [x, y, w, h], "category_id"}], `categories` [{"id",
"name"}]; the tags are the category names in the file's order. Boxes may
overhang their image by 1 pixel (rounding) and are clipped; more is bad.

Visual Genome: objects.json [{"image_id", "objects": [{"x", "y", "w", "h",
"names": [...]}]}]; image sizes and folders from image_data.json [{"image_id"
(or "id"), "width", "height", "url"}] when given, else from the image file.
An image's file is looked up under --images as the url's last two parts
(VG_100K_2/1.jpg), then by name ({id}.jpg, also in VG_100K/ and VG_100K_2/).
VG names are open vocabulary: with --vocab (a VG-style objects_vocab.txt,
one class a line, synonyms comma-separated) an object's tag is the class of
its first name the vocabulary knows; without, the --max_tags most frequent
first names are the tags. Objects with no tag keep their box, tagged "".
VG boxes often overhang the image: they are clipped; an empty or inverted
box is bad.

Image folder (no annotations): every file directly in --images (sorted by
name; hidden files and sub-folders passed over) is an image, its id the
file name without its extension (photo.jpg -> photo; two files with one
stem are bad input). Each entry also records the image's width and height
(read from the file's header) and has no boxes, so the pipelines read the
image's grid cells; meta.json's tag vocabulary is empty (no tags, so no
anchors; MLM, ITM and the task heads still train). A file that is not an
image PIL can open is bad input (`bad_image`).

Bad input raises a FormatError naming the file, the image (`id 9`) and the
field; with skip_bad the image is left out and counted per reason
(formats/__init__.py). An image file that does not exist is bad input too
(`missing_image`): the store's images must all be readable.
"""

import collections
import os
from typing import Any

from cmal_jax.data import image_store, records
from cmal_jax.convert.formats import (Collector, FormatError, Location,
                                   check_exists, image_size, is_finite_number,
                                   load_json, record_location, top_level_list)

# COCO boxes may overhang their image by float rounding; up to this many
# pixels is clipped (refcoco.py's rule).
_OVERHANG_PIXELS = image_store.OVERHANG_PIXELS
VG_DEFAULT_MAX_TAGS = 1600  # The bottom-up-attention VG vocabulary's size.


# -------------------------------------------------------------------- COCO

def read_coco_instances(instances_path: str, images_dir: str, *,
                        synonyms: dict[str, str] | None = None,
                        on_error: str = 'raise'):
  """COCO instances JSON -> (entries, meta, skipped).

  entries: [{"image_id", "file": absolute path, "boxes", "tags"}] in the
  file's image order; meta: {"tags", "synonyms"} (the category names;
  `synonyms` maps further words to them); skipped: {reason: images}.
  """
  data = load_json(instances_path, 'COCO instances JSON')
  tags, tag_of = _coco_categories(instances_path, data)
  images = top_level_list(instances_path, data, 'images')
  annotations = collections.defaultdict(list)
  for index, ann in enumerate(top_level_list(instances_path, data,
                                             'annotations')):
    loc = record_location(instances_path, 'annotations', index, ann, 'id')
    annotations[loc.field(ann, 'image_id', int)].append((loc, ann))
  collector = Collector(on_error)
  for index, image in enumerate(images):
    loc = record_location(instances_path, 'images', index, image, 'id')
    collector.add(_coco_image, loc, image, annotations, tag_of, images_dir)
  entries, skipped = collector.result()
  return entries, _vocab_meta(tags, synonyms), skipped


def _coco_categories(path, data):
  """(tags in file order, {category_id: tag}); a whole-file error if bad."""
  tags, tag_of = [], {}
  for index, category in enumerate(top_level_list(path, data, 'categories')):
    loc = Location(path, f'categories[{index}]')
    name = loc.field(category, 'name', str).strip()
    if not name or name in tags:
      raise loc.error('name', f'empty or repeated category name {name!r}',
                      'bad_category')
    tag_of[loc.field(category, 'id', int)] = name
    tags.append(name)
  return tags, tag_of


def _coco_image(loc, image, annotations, tag_of, images_dir):
  image_id = loc.field(image, 'id', int)
  width, height = image_size(loc, image)
  file = _existing_file(loc, 'file_name', str(image_id), images_dir,
                        [loc.field(image, 'file_name', str)])
  boxes, tags = [], []
  for ann_loc, ann in annotations.get(image_id, ()):
    bbox = ann_loc.field(ann, 'bbox', list)
    boxes.append(_pixel_box(ann_loc, 'bbox', bbox, width, height,
                            clip=False))
    category = ann_loc.field(ann, 'category_id', int)
    if category not in tag_of:
      raise ann_loc.error('category_id', f'category {category} is not in '
                          'categories', 'unknown_category')
    tags.append(tag_of[category])
  return {'image_id': str(image_id), 'file': file, 'boxes': boxes,
          'tags': tags}


# ---------------------------------------------------------- Visual Genome

def read_vg_objects(objects_path: str, images_dir: str, *,
                    image_data_path: str | None = None,
                    vocab_path: str | None = None,
                    max_tags: int = VG_DEFAULT_MAX_TAGS,
                    on_error: str = 'raise'):
  """Visual Genome objects.json -> (entries, meta, skipped), as
  read_coco_instances; see the module docstring for the tags."""
  data = load_json(objects_path, 'Visual Genome objects JSON')
  if not isinstance(data, list):
    raise FormatError(objects_path, 'top level', None, f'expected a JSON list '
                      f'of images, got {type(data).__name__}', 'bad_type')
  image_data = _vg_image_data(image_data_path) if image_data_path else {}
  if vocab_path:
    from cmal_jax.convert.formats import bottom_up
    tags, synonyms = bottom_up.read_vocab(vocab_path)
  else:
    tags = _frequent_names(data, max_tags)
    synonyms = {}
  lookup = {**{t: t for t in tags}, **synonyms}
  collector = Collector(on_error)
  for index, image in enumerate(data):
    loc = record_location(objects_path, 'images', index, image, 'image_id')
    collector.add(_vg_image, loc, image, image_data, lookup, images_dir)
  entries, skipped = collector.result()
  return entries, _vocab_meta(tags, synonyms), skipped


def _vg_id(loc, record):
  """A VG record's image id: 'image_id', or 'id' in older releases."""
  return loc.field(record, 'image_id' if 'image_id' in record else 'id', int)


def _vg_image_data(path):
  """{image_id: image_data.json record}; a whole-file error if malformed."""
  data = load_json(path, 'Visual Genome image_data.json')
  if not isinstance(data, list):
    raise FormatError(path, 'top level', None, f'expected a JSON list, got '
                      f'{type(data).__name__}', 'bad_type')
  return {_vg_id(Location(path, f'[{i}]'), r): r for i, r in enumerate(data)}


def _first_name(obj):
  """An object's first name, lower-cased and stripped ('' if none)."""
  names = obj.get('names') if isinstance(obj, dict) else None
  if isinstance(names, list) and names and isinstance(names[0], str):
    return names[0].strip().lower()
  return ''


def _frequent_names(data, max_tags):
  """The max_tags most frequent first names (ties: first seen first)."""
  counts = collections.Counter(
      _first_name(o) for image in data if isinstance(image, dict)
      for o in (image.get('objects') or []))
  counts.pop('', None)
  return [name for name, _ in counts.most_common(max_tags)]


def _vg_image(loc, image, image_data, lookup, images_dir):
  image_id = _vg_id(loc, image)
  info = image_data.get(image_id, {})
  url = info.get('url') if isinstance(info.get('url'), str) else ''
  names = ['/'.join(url.split('/')[-2:])] if url else []
  names += [f'{image_id}.jpg', f'VG_100K/{image_id}.jpg',
            f'VG_100K_2/{image_id}.jpg']
  file = _existing_file(loc, 'image_id', str(image_id), images_dir, names)
  if info:
    width, height = image_size(Location(loc.path, f'image_data of image_id '
                                   f'{image_id}'), info)
  else:
    width, height = _file_size(loc, file, image_id)
  boxes, tags = [], []
  for j, obj in enumerate(loc.field(image, 'objects', list)):
    label = f'objects[{j}]'
    xywh = [loc.field(obj, k, (int, float), f'{label}.{k}')
            for k in ('x', 'y', 'w', 'h')]
    boxes.append(_pixel_box(loc, label, xywh, width, height, clip=True))
    tags.append(_vg_tag(loc, obj, label, lookup))
  return {'image_id': str(image_id), 'file': file, 'boxes': boxes,
          'tags': tags}


def _vg_tag(loc, obj, label, lookup):
  """The tag of the first of the object's names the vocabulary knows."""
  names = loc.field(obj, 'names', list, f'{label}.names')
  for name in names:
    if isinstance(name, str) and name.strip().lower() in lookup:
      return lookup[name.strip().lower()]
  return ''


def _file_size(loc, file, image_id):
  """(width, height) read from the image file's header."""
  from PIL import Image
  try:
    with Image.open(file) as im:
      return im.size
  except Exception as e:  # Not an image PIL can open.
    raise loc.error('image_id', f'image {image_id}: cannot read the size of '
                    f'{file}: {e}', 'bad_image') from e


# ------------------------------------------------------------ image folder

def read_image_folder(images_dir: str, *, on_error: str = 'raise'):
  """A folder of image files -> (entries, meta, skipped), as
  read_coco_instances; each entry has its width and height and no boxes
  (the grid), meta an empty tag vocabulary."""
  collector = Collector(on_error)
  seen = {}
  for name in folder_files(images_dir):
    loc = Location(os.path.join(images_dir, name), 'file')
    collector.add(_folder_image, loc, name, images_dir, seen)
  entries, skipped = collector.result()
  return entries, _vocab_meta([], {}), skipped


def folder_files(images_dir: str) -> list[str]:
  """The names of the files directly in images_dir, sorted, hidden ones
  left out; a missing folder is a whole-input error."""
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f'{images_dir}: no such folder of images')
  return sorted(n for n in os.listdir(images_dir) if not n.startswith('.')
                and os.path.isfile(os.path.join(images_dir, n)))


def _folder_image(loc, name, images_dir, seen):
  image_id = os.path.splitext(name)[0]
  if image_id in seen:
    raise loc.error('file', f'image id {image_id!r} is also the id of '
                    f'{seen[image_id]}', 'repeated_id')
  file = os.path.abspath(os.path.join(images_dir, name))
  width, height = _file_size(loc, file, image_id)
  seen[image_id] = name
  return {'image_id': image_id, 'file': file, 'width': width,
          'height': height, 'boxes': [], 'tags': []}


# ----------------------------------------------------------------- shared


def _existing_file(loc, field, image_id, images_dir, names):
  """The first of images_dir/name that exists (absolute), else a
  missing_image error naming the image and where it was looked for."""
  for name in names:
    path = os.path.abspath(os.path.join(images_dir, name))
    if os.path.isfile(path):
      return path
  tried = ', '.join(os.path.join(images_dir, n) for n in names)
  raise loc.error(field, f'image {image_id}: no image file ({tried})',
                  'missing_image')


def _pixel_box(loc, field, xywh, width, height, *, clip):
  """[x, y, w, h] in pixels -> [x1, y1, x2, y2] clipped to the image.

  clip=False (COCO): the box may overhang by _OVERHANG_PIXELS, no more.
  clip=True (VG, whose boxes often overhang): any overhang is clipped, but
  what is left must have an area.
  """
  if len(xywh) != 4 or not all(is_finite_number(v) for v in xywh):
    raise loc.error(field, f'expected [x, y, w, h] numbers, got {xywh!r}',
                    'bad_box')
  x, y, w, h = xywh
  bad = lambda why: loc.error(field, f'{xywh!r} {why} of the '
                              f'{width}x{height} image', 'bad_box')
  tol = _OVERHANG_PIXELS
  if w < 0 or h < 0:
    raise loc.error(field, f'{xywh!r}: negative width or height', 'bad_box')
  if not clip and (x < -tol or y < -tol or x + w > width + tol
                   or y + h > height + tol):
    raise bad('reaches outside')
  box = [min(max(x, 0), width), min(max(y, 0), height),
         min(max(x + w, 0), width), min(max(y + h, 0), height)]
  if clip and (box[2] <= box[0] or box[3] <= box[1]):
    raise bad('covers no area')
  return box


def _vocab_meta(tags, synonyms):
  """meta.json's vocabulary: the tags, and synonyms onto them."""
  synonyms = dict(synonyms or {})
  unknown = sorted(set(synonyms.values()) - set(tags))
  if unknown:
    raise ValueError(f'synonyms map onto {unknown[:3]}, which are not tags '
                     f'(tags: {tags[:5]}...)')
  return {'tags': list(tags), 'synonyms': synonyms}


def check_fresh(out_dir: str):
  """Refuses a folder with an image store or meta.json already."""
  for path in (image_store.store_file(out_dir),
               os.path.join(out_dir, records.META_FILE)):
    if os.path.exists(path):
      raise FileExistsError(f'{path} exists; convert into a fresh directory')


def write_image_boxes(out_dir: str, entries: list[dict],
                      meta: dict[str, Any], source: dict[str, Any]) -> int:
  """Writes out_dir/images.json from the readers' entries (files made
  relative to out_dir; their other fields as read) and meta.json. Returns
  the number of images."""
  out_dir = os.fspath(out_dir)
  root = os.path.abspath(out_dir)
  relative = [(e['image_id'], dict(
      {k: e[k] for k in e if k != 'image_id'},
      file=os.path.relpath(e['file'], root))) for e in entries]
  image_store.write_image_store(out_dir, relative)
  records.write_meta(out_dir, dict(meta, feature_dim=None,
                                   source=dict(source, images=len(relative))))
  return len(relative)


def convert_coco_instances(instances_path, images_dir, out_dir, *,
                           synonyms_path=None, skip_bad=False):
  """read_coco_instances + write_image_boxes. Returns (images, skipped)."""
  check_exists(os.fspath(instances_path), 'COCO instances JSON')
  check_fresh(out_dir)
  synonyms = load_json(synonyms_path, 'synonyms JSON') if synonyms_path else {}
  entries, meta, skipped = read_coco_instances(
      instances_path, images_dir, synonyms=synonyms,
      on_error='skip' if skip_bad else 'raise')
  n = write_image_boxes(out_dir, entries, meta, dict(
      format='coco_instances', instances=os.fspath(instances_path),
      images_dir=os.path.abspath(images_dir), skipped=skipped))
  return n, skipped


def convert_vg_objects(objects_path, images_dir, out_dir, *,
                       image_data_path=None, vocab_path=None,
                       max_tags=VG_DEFAULT_MAX_TAGS, skip_bad=False):
  """read_vg_objects + write_image_boxes. Returns (images, skipped)."""
  check_exists(os.fspath(objects_path), 'Visual Genome objects JSON')
  check_fresh(out_dir)
  entries, meta, skipped = read_vg_objects(
      objects_path, images_dir, image_data_path=image_data_path,
      vocab_path=vocab_path, max_tags=max_tags,
      on_error='skip' if skip_bad else 'raise')
  n = write_image_boxes(out_dir, entries, meta, dict(
      format='vg_objects', objects=os.fspath(objects_path),
      images_dir=os.path.abspath(images_dir), skipped=skipped))
  return n, skipped


def convert_image_folder(images_dir, out_dir, *, skip_bad=False):
  """read_image_folder + write_image_boxes. Returns (images, skipped)."""
  check_fresh(out_dir)
  entries, meta, skipped = read_image_folder(
      images_dir, on_error='skip' if skip_bad else 'raise')
  n = write_image_boxes(out_dir, entries, meta, dict(
      format='image_folder', images_dir=os.path.abspath(images_dir),
      skipped=skipped))
  return n, skipped
