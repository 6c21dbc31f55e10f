"""RefCOCO / RefCOCO+ / RefCOCOg refs pickle + COCO instances -> `rec`.

`refs(unc).p` (`refs(umd).p`, `refs(google).p`) is a Python pickle of a list
of refs `{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent",
"raw", "tokens", "sent_id"}], "category_id", ...}`; `instances.json` is COCO
style: `{"images": [{"id", "width", "height", ...}], "annotations": [{"id",
"image_id", "bbox": [x, y, w, h], ...}], ...}`.
"""

import pickle

from cmal_jax.convert.formats import (Collector, FormatError, Location,
                                   check_exists, check_image,
                                   image_size, is_finite_number, load_json,
                                   record_location, top_level_list)

SPLITS = ('train', 'val', 'test', 'testA', 'testB')
# COCO boxes may overhang their image by float rounding; up to this many
# pixels is clipped, more is bad input.
_OVERHANG_PIXELS = 1.0


def read_refcoco(refs_path: str, instances_path: str, *, split: str,
                 image_ids: set[str] | None = None, on_error: str = 'raise'
                 ) -> tuple[list[dict], dict[str, int]]:
  """Reads the refs of one split, with their boxes from the instances file.

  Returns (examples, skipped): one `rec` example per referring sentence
  (a ref may have several), in the refs file's order, with `target_box`
  the ref's annotation box as [x1, y1, x2, y2] divided by its image's
  width/height. Refs of other splits are not examples of this one and are
  passed over; bad refs raise, or with on_error='skip' are counted per
  reason.

  `refs_path` is unpickled, and unpickling runs code the file names: only
  pass a refs file you trust (e.g. the official download).
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; RefCOCO splits are {list(SPLITS)}')
  collector = Collector(on_error)
  refs = _load_refs(refs_path)
  instances = load_json(instances_path, 'COCO instances JSON')
  images = _index_by_id(instances_path, instances, 'images')
  annotations = _index_by_id(instances_path, instances, 'annotations')
  for index, ref in enumerate(refs):
    loc = record_location(refs_path, 'refs', index, ref, 'ref_id')
    collector.add(_examples, loc, ref, split, images, annotations,
                  instances_path, image_ids)
  return collector.result()


def _load_refs(path: str) -> list:
  """Returns the unpickled list of refs; an unreadable file always raises."""
  check_exists(path, 'RefCOCO refs pickle')
  with open(path, 'rb') as f:
    try:
      refs = pickle.load(f)
    except Exception as e:  # Unpickling fails in many ways (EOF, bad opcode).
      raise FormatError(path, 'file', None, f'not a readable pickle: {e!r}',
                        'malformed_pickle') from e
  if not isinstance(refs, list):
    raise FormatError(path, 'top level', None, f'expected a list of refs, '
                      f'got {type(refs).__name__}', 'bad_type')
  return refs


def _index_by_id(path: str, instances: dict, key: str) -> dict[int, dict]:
  """Returns id -> record of instances[key]; a record without an int id is
  a whole-file error (no ref could be checked against it)."""
  by_id = {}
  for index, record in enumerate(top_level_list(path, instances, key)):
    loc = Location(path, f'{key}[{index}]')
    by_id[loc.field(record, 'id', int)] = record
  return by_id


def _examples(loc: Location, ref: dict, split: str, images: dict,
              annotations: dict, instances_path: str,
              image_ids: set[str] | None) -> list[dict]:
  """One ref -> its `rec` examples (none for other splits)."""
  if loc.field(ref, 'split', str) != split:
    return []
  ref_id = loc.field(ref, 'ref_id', int)
  ann_id = loc.field(ref, 'ann_id', int)
  image = loc.field(ref, 'image_id', int)
  check_image(loc, 'image_id', str(image), image_ids)
  box = _target_box(loc, ann_id, image, images, annotations, instances_path)
  sentences = loc.items(ref, 'sentences', what='referring sentences',
                        reason='no_sentences')
  return [{'ref_id': ref_id,
           'sent_id': loc.field(s, 'sent_id', int, f'sentences[{i}].sent_id'),
           'image_id': str(image),
           'expression': loc.field(s, 'sent', str, f'sentences[{i}].sent'),
           'target_box': box}
          for i, s in enumerate(sentences)]


def _target_box(ref_loc: Location, ann_id: int, image: int, images: dict,
                annotations: dict, instances_path: str) -> list[float]:
  """Returns the annotation's [x1, y1, x2, y2] normalised by the image size."""
  if ann_id not in annotations:
    raise ref_loc.error('ann_id', f'annotation {ann_id} is not in '
                        f'{instances_path}', 'unknown_annotation')
  if image not in images:
    raise ref_loc.error('image_id', f'image {image} is not in '
                        f'{instances_path}', 'no_image_size')
  width, height = image_size(Location(instances_path, f'image id {image}'),
                              images[image])
  ann_loc = Location(instances_path, f'annotation id {ann_id}')
  bbox = ann_loc.field(annotations[ann_id], 'bbox', list)
  if len(bbox) != 4 or not all(is_finite_number(v) for v in bbox):
    raise ann_loc.error('bbox', f'expected [x, y, w, h] numbers, got {bbox!r}',
                        'bad_box')
  x, y, w, h = bbox
  x1, y1, x2, y2 = x, y, x + w, y + h
  tol = _OVERHANG_PIXELS
  if (w < 0 or h < 0 or x1 < -tol or y1 < -tol or x2 > width + tol
      or y2 > height + tol):
    raise ann_loc.error('bbox', f'{bbox!r} is not a box inside the '
                        f'{width}x{height} image {image}', 'bad_box')
  clip = lambda v: min(max(v, 0.0), 1.0)
  return [clip(x1 / width), clip(y1 / height), clip(x2 / width),
          clip(y2 / height)]
