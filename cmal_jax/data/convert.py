r"""Converts real-world region features and captions into our records.

  python -m cmal_jax.data.convert bottom_up --tsv=FILE[,FILE...] \
      --vocab=objects_vocab.txt --out=DIR [--float16] [--skip_bad]
  python -m cmal_jax.data.convert captions --format=coco|vg|jsonl \
      --input=FILE --regions=DIR --out=DIR --split=pretrain [--skip_bad]

`bottom_up` turns bottom-up-attention TSV region features (+ the detector's
class vocabulary) into a region store (formats/bottom_up.py); `captions`
joins a caption file with that store into pre-training pair records
(formats/captions.py). Then pre-train on the folder, with the model's
feature width set to the store's:

  python -m cmal_jax.main --config=configs/pretrain.py --workdir=runs/real \
      --config.data.dir=DIR --config.model.region_feat_dim=2048

(pre-training reads the splits `pretrain` and `val`; convert one caption
file into each.) Each subcommand prints what it wrote and, per reason, the
records it skipped (--skip_bad); bad input otherwise stops it with an error
naming the file, line or record, and field.
"""

import argparse

from cmal_jax.data.formats import bottom_up, captions


def summary(what: str, n: int, skipped: dict[str, int]) -> str:
  """'Wrote 3 images to DIR; skipped 2 bad lines: box_outside_image 1, ...'."""
  text = f'Wrote {n} {what}'
  if skipped:
    counts = ', '.join(f'{reason} {count}'
                       for reason, count in sorted(skipped.items()))
    text += f'; skipped {sum(skipped.values())}: {counts}'
  else:
    text += '; skipped none'
  return text


def _bottom_up(a):
  n, skipped = bottom_up.convert_bottom_up(
      [p for p in a.tsv.split(',') if p], a.vocab, a.out, fields=a.fields,
      float16=a.float16, skip_bad=a.skip_bad, numeric_ids=a.numeric_ids)
  print(summary(f'images to {a.out}', n, skipped))
  return n, skipped


def _captions(a):
  n, skipped = captions.convert_captions(
      a.format, a.input, a.regions, a.out, a.split, skip_bad=a.skip_bad)
  print(summary(f'{a.split} pairs to {a.out}', n, skipped))
  return n, skipped


def main(argv=None):
  """Runs a subcommand; returns its (number written, skipped counts)."""
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = ap.add_subparsers(dest='command', required=True)

  b = sub.add_parser('bottom_up', help='TSV region features -> region store')
  b.add_argument('--tsv', required=True, help='Comma-separated TSV files.')
  b.add_argument('--vocab', required=True,
                 help='Detector classes, one a line (objects_vocab.txt).')
  b.add_argument('--out', required=True, help='A fresh output directory.')
  b.add_argument('--fields', default=None,
                 help=f'Column layout: one of {sorted(bottom_up.LAYOUTS)} '
                 'or comma-separated names (default: told by column count).')
  b.add_argument('--float16', action='store_true',
                 help='Store features as float16 (read back as float32).')
  b.add_argument('--numeric_ids', action='store_true',
                 help='Key images by the number ending image_id '
                 '(COCO_train2014_000000000009 -> 9), as caption files do.')
  b.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad lines instead of stopping.')
  b.set_defaults(run=_bottom_up)

  c = sub.add_parser('captions', help='captions + region store -> pairs')
  c.add_argument('--format', required=True, choices=captions.FORMATS)
  c.add_argument('--input', required=True, help='The caption file.')
  c.add_argument('--regions', required=True,
                 help='Directory of the region store (bottom_up --out).')
  c.add_argument('--out', required=True, help='Dataset directory.')
  c.add_argument('--split', default='pretrain',
                 help='Split name: pretrain (training) or val (evaluation).')
  c.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad captions instead of stopping.')
  c.set_defaults(run=_captions)

  a = ap.parse_args(argv)
  return a.run(a)


if __name__ == '__main__':
  main()
