"""SNLI-VE JSONL -> `ve` task examples.

One JSON object per line with (among others) `Flickr30K_ID` (the premise
image), `sentence2` (the hypothesis), `gold_label` and `pairID`.
"""

import os

from cmal_jax.convert.formats import (Location, SkipExample, check_image,
                                   convert_jsonl)
from cmal_jax.data.tasks import VE_LABELS

# SNLI's gold label when the annotators reached no consensus.
NO_GOLD_LABEL = '-'


def read_snli_ve(path: str, *, image_ids: set[str] | None = None,
                 on_error: str = 'raise'
                 ) -> tuple[list[dict], dict[str, int]]:
  """Reads an SNLI-VE JSONL file.

  Returns (examples, skipped): one `ve` example per line, in file order.
  Pairs with gold_label '-' are always left out (standard practice: they
  have no label) and counted under 'no_gold_label'; bad lines raise, or
  with on_error='skip' are counted per reason.
  """
  return convert_jsonl(path, _example, os.path.basename(path), image_ids,
                       on_error=on_error, what='SNLI-VE JSONL')


def _example(loc: Location, record: dict, basename: str,
             image_ids: set[str] | None) -> dict:
  """One line -> a `ve` example; raises FormatError or SkipExample."""
  # The label first: a '-' pair is not an example, whatever else it holds.
  label = loc.field(record, 'gold_label', str)
  if label == NO_GOLD_LABEL:
    raise SkipExample('no_gold_label')
  if label not in VE_LABELS:
    raise loc.error('gold_label', f'{label!r} is not one of '
                    f'{list(VE_LABELS)}', 'bad_label')
  # Official files hold the Flickr30K id as a string; accept an int too.
  image_id = str(loc.field(record, 'Flickr30K_ID', (str, int)))
  check_image(loc, 'Flickr30K_ID', image_id, image_ids)
  hypothesis = loc.field(record, 'sentence2', str)
  if 'pairID' in record:
    pair_id = loc.field(record, 'pairID', str)
  else:  # Still unique and traceable to the line.
    pair_id = f'{basename}:{loc.line}'
  return {'pair_id': pair_id, 'image_id': image_id,
          'hypothesis': hypothesis, 'label': label}
