"""NLVR2 JSONL -> `nlvr2` task examples.

One JSON object per line with `identifier`, `sentence` and `label`
("True"/"False"; the official files use strings). The two images follow
from the identifier `{split}-{set_id}-{pair_id}-{sentence_id}`: e.g.
`dev-850-0-0` -> `dev-850-0-img0` (left) and `dev-850-0-img1` (right), the
official image file names without `.png`.
"""

import re

from cmal_jax.convert.formats import Location, check_image, convert_jsonl

# `split` may itself hold hyphens (only the last three parts are numbers).
_IDENTIFIER = re.compile(r'(.+)-(\d+)-(\d+)-(\d+)', re.ASCII)
_LABELS = {'True': True, 'False': False, True: True, False: False}


def read_nlvr2(path: str, *, image_ids: set[str] | None = None,
               on_error: str = 'raise') -> tuple[list[dict], dict[str, int]]:
  """Reads an NLVR2 JSONL file.

  Returns (examples, skipped): one `nlvr2` example per line, in file order,
  with `image_ids` [left, right] and a bool `label`. Bad lines raise, or
  with on_error='skip' are counted per reason.
  """
  return convert_jsonl(path, _example, image_ids, on_error=on_error,
                       what='NLVR2 JSONL')


def pair_image_ids(identifier: str) -> tuple[str, str] | None:
  """Returns the (left, right) image ids of an NLVR2 identifier, or None
  when it is not `{split}-{set_id}-{pair_id}-{sentence_id}`."""
  match = _IDENTIFIER.fullmatch(identifier)
  if match is None:
    return None
  stem = identifier[:match.end(3)]  # Everything but `-{sentence_id}`.
  return f'{stem}-img0', f'{stem}-img1'


def _example(loc: Location, record: dict,
             image_ids: set[str] | None) -> dict:
  """One line -> an `nlvr2` example; raises FormatError."""
  identifier = loc.field(record, 'identifier', str)
  pair = pair_image_ids(identifier)
  if pair is None:
    raise loc.error('identifier', f'{identifier!r} is not '
                    f'split-set_id-pair_id-sentence_id', 'bad_identifier')
  for image_id in pair:
    check_image(loc, 'identifier', image_id, image_ids)
  sentence = loc.field(record, 'sentence', str)
  label = loc.field(record, 'label', (str, bool))
  if label not in _LABELS:
    raise loc.error('label', f"{label!r} is not one of ['True', 'False']",
                    'bad_label')
  return {'identifier': identifier, 'image_ids': list(pair),
          'sentence': sentence, 'label': _LABELS[label]}
