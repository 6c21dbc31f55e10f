"""Karpathy split JSON (COCO, Flickr30K) -> `retrieval` task examples.

`{"images": [{"filename", "imgid", "split", "sentences": [{"raw", "tokens",
...}], "cocoid" (COCO only)}], "dataset"}`; split is one of train, val,
test and restval (COCO's images outside the 5k val/test, usually trained on).
"""

import os

from cmal_jax.convert.formats import (Collector, Location, check_image,
                                   load_json, top_level_list)

SPLITS = ('train', 'val', 'test', 'restval')


def read_karpathy(path: str, *, split: str, image_ids: set[str] | None = None,
                  on_error: str = 'raise', restval_as_train: bool = True
                  ) -> tuple[list[dict], dict[str, int]]:
  """Reads one split of a Karpathy split file.

  Returns (examples, skipped): one `retrieval` example per image of the
  split, in file order, with its raw captions (outer whitespace stripped).
  image_id is str(cocoid) when the record has one (COCO), else the file
  name without its extension (Flickr30K). With restval_as_train, split
  'train' also holds the restval images. Images of other splits are passed
  over; bad records raise, or with on_error='skip' are counted per reason.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; Karpathy splits are {list(SPLITS)}')
  wanted = {split}
  if split == 'train' and restval_as_train:
    wanted.add('restval')
  collector = Collector(on_error)
  images = top_level_list(path, load_json(path, 'Karpathy split JSON'),
                          'images')
  for index, record in enumerate(images):
    collector.add(_example, Location(path, f'images[{index}]'), record,
                  wanted, image_ids)
  return collector.result()


def _example(loc: Location, record: dict, wanted: set[str],
             image_ids: set[str] | None) -> list[dict]:
  """One image -> [its `retrieval` example], or [] for another split."""
  split = loc.field(record, 'split', str)
  if split not in SPLITS:
    raise loc.error('split', f'{split!r} is not one of {list(SPLITS)}',
                    'bad_label')
  if split not in wanted:
    return []
  if 'cocoid' in record:
    image_id = str(loc.field(record, 'cocoid', int))
  else:
    image_id = os.path.splitext(loc.field(record, 'filename', str))[0]
  check_image(loc, 'cocoid' if 'cocoid' in record else 'filename', image_id,
              image_ids)
  sentences = loc.items(record, 'sentences', what='captions',
                        reason='no_captions')
  # `raw` sometimes ends in a space in the official files; it means nothing.
  captions = [loc.field(s, 'raw', str, f'sentences[{i}].raw').strip()
              for i, s in enumerate(sentences)]
  return [{'image_id': image_id, 'captions': captions}]
