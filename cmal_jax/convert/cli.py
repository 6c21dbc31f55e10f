r"""Converts real-world region features and captions into our records.

  python -m cmal_jax.convert bottom_up --tsv=FILE[,FILE...] \
      --vocab=objects_vocab.txt --out=DIR [--float16] [--skip_bad]
  python -m cmal_jax.convert captions --format=coco|vg|jsonl \
      --input=FILE --regions=DIR --split=pretrain [--copy_features --out=DIR]
      [--skip_bad]
  python -m cmal_jax.convert coco_instances --instances=FILE \
      --images=DIR --out=DIR [--synonyms=FILE] [--skip_bad]
  python -m cmal_jax.convert vg_objects --objects=FILE \
      [--image_data=FILE] --images=DIR --out=DIR [--vocab=FILE] [--skip_bad]
  python -m cmal_jax.convert image_folder --images=DIR --out=DIR [--skip_bad]
  python -m cmal_jax.convert vqa_v2 --questions=FILE [--annotations=FILE] \
      --split=train --regions=DIR [--skip_bad]
  python -m cmal_jax.convert snli_ve|nlvr2 --input=FILE --split=train \
      --regions=DIR [--skip_bad]
  python -m cmal_jax.convert refcoco --refs=FILE --instances=FILE \
      --split=train --regions=DIR [--skip_bad]
  python -m cmal_jax.convert karpathy --input=FILE --split=train \
      [--without_restval] --regions=DIR [--skip_bad]
  python -m cmal_jax.convert shard --in=DIR --out=DIR \
      (--shards=N | --shard_bytes=B [--multiple_of=M]) [--splits=pretrain] \
      [--whole_splits=val] [--skip_bad]

`bottom_up` turns bottom-up-attention TSV region features (+ the detector's
class vocabulary) into a region store (formats/bottom_up.py); `captions`
checks a caption file against that store and writes pre-training caption
records beside it, which pre-training joins with the store at read time
(formats/captions.py). `coco_instances` and `vg_objects` describe a folder
of raw images instead (formats/image_boxes.py): images.json (each image's
file, its annotated boxes and their class names as tags) and meta.json (the
class names as the tag vocabulary), for a model that reads pixels;
`image_folder` does so for a folder of image files without annotations
(each image's file, width and height, no boxes: the model reads its grid
cells; an empty tag vocabulary). `captions --regions=` that folder then
writes caption records naming its images. Then pre-train on the folder, with the model's feature width set to
the store's:

  python -m cmal_jax.main --config=configs/pretrain.py --workdir=runs/real \
      --config.data.dir=DIR --config.model.region_feat_dim=2048

or, from images, with --config.model.visual.input=pixels instead.

(pre-training reads the splits `pretrain` and `val`; convert one caption
file into each.)

`shard` rewrites such a folder sharded by image, each host's working set
its own shards (config.data.read=own_shards; convert/reshard.py).

`vqa_v2`, `snli_ve`, `nlvr2`, `refcoco` and `karpathy` turn an official
downstream release (VQA v2, SNLI-VE, NLVR2, RefCOCO/+/g, Karpathy-split COCO
or Flickr30K) into a fine-tuning task split `{task}_{split}.array_record`,
written into the region store's or image folder's own folder (--regions),
where fine-tuning reads both (tasks_cli.py); then `--config.data.dir=DIR`
fine-tunes on it. The VQA answer vocabulary is built by fine-tuning from
vqa_train.

Each subcommand prints what it wrote and, per reason, the records it
skipped (--skip_bad); bad input otherwise stops it with one line,
`convert: error: ...`, naming the file, line or record, and field, and exit
status 1 (--verbose: the traceback instead; cli_errors.py).
"""

import argparse

from cmal_jax import cli_errors
from cmal_jax.convert import reshard, tasks_cli
from cmal_jax.convert.formats import bottom_up, captions, image_boxes, summary


def _bottom_up(a):
  n, skipped = bottom_up.convert_bottom_up(
      [p for p in a.tsv.split(',') if p], a.vocab, a.out, fields=a.fields,
      float16=a.float16, skip_bad=a.skip_bad, numeric_ids=a.numeric_ids)
  print(summary(f'images to {a.out}', n, skipped))
  return n, skipped


def _captions(a):
  n, skipped = captions.convert_captions(
      a.format, a.input, a.regions, a.out, a.split, skip_bad=a.skip_bad,
      copy_features=a.copy_features)
  what = 'pairs' if a.copy_features else 'caption records'
  print(summary(f'{a.split} {what} to {a.out or a.regions}', n, skipped))
  return n, skipped


def _coco_instances(a):
  n, skipped = image_boxes.convert_coco_instances(
      a.instances, a.images, a.out, synonyms_path=a.synonyms,
      skip_bad=a.skip_bad)
  print(summary(f'images to {a.out}', n, skipped))
  return n, skipped


def _vg_objects(a):
  n, skipped = image_boxes.convert_vg_objects(
      a.objects, a.images, a.out, image_data_path=a.image_data,
      vocab_path=a.vocab, max_tags=a.max_tags, skip_bad=a.skip_bad)
  print(summary(f'images to {a.out}', n, skipped))
  return n, skipped


def _image_folder(a):
  n, skipped = image_boxes.convert_image_folder(a.images, a.out,
                                                skip_bad=a.skip_bad)
  print(summary(f'images to {a.out}', n, skipped))
  return n, skipped


def _shard(a):
  split_list = lambda text: [s for s in text.split(',') if s]
  result = reshard.reshard_folder(
      a.in_dir, a.out, shards_wanted=a.shards,
      shard_bytes=None if a.shard_bytes is None else reshard.parse_bytes(
          a.shard_bytes),
      multiple_of=a.multiple_of, splits=split_list(a.splits),
      whole_splits=(None if a.whole_splits is None
                    else split_list(a.whole_splits)),
      skip_bad=a.skip_bad)
  n = sum(result.images)
  print(summary(result.describe(a.out), n, result.skipped))
  return n, result.skipped


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
  c.add_argument('--out', default=None,
                 help='Dataset directory (default: --regions; another one '
                 'needs --copy_features).')
  c.add_argument('--split', default='pretrain',
                 help='Split name: pretrain (training) or val (evaluation).')
  c.add_argument('--copy_features', action='store_true',
                 help='Write pair records that carry their image\'s features '
                 '(or image bytes) instead of caption records naming it.')
  c.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad captions instead of stopping.')
  c.set_defaults(run=_captions)

  o = sub.add_parser('coco_instances',
                     help='COCO instances + image folder -> image store')
  o.add_argument('--instances', required=True,
                 help='COCO instances JSON (images, annotations, categories).')
  o.add_argument('--images', required=True,
                 help='The folder of the image files (file_name).')
  o.add_argument('--out', required=True, help='A fresh output directory.')
  o.add_argument('--synonyms', default=None,
                 help='JSON {word: category name} of more words to anchor.')
  o.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad images instead of stopping.')
  o.set_defaults(run=_coco_instances)

  v = sub.add_parser('vg_objects',
                     help='Visual Genome objects + image folder -> image '
                     'store')
  v.add_argument('--objects', required=True, help='objects.json.')
  v.add_argument('--image_data', default=None,
                 help='image_data.json (sizes, folders); default: read '
                 'from the image files.')
  v.add_argument('--images', required=True,
                 help='The folder of VG_100K/ and VG_100K_2/ (or the images).')
  v.add_argument('--out', required=True, help='A fresh output directory.')
  v.add_argument('--vocab', default=None,
                 help='objects_vocab.txt: the tags and their synonyms; '
                 'default: the --max_tags most frequent names.')
  v.add_argument('--max_tags', type=int,
                 default=image_boxes.VG_DEFAULT_MAX_TAGS)
  v.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad images instead of stopping.')
  v.set_defaults(run=_vg_objects)

  f = sub.add_parser('image_folder',
                     help='A folder of image files, no annotations -> image '
                     'store (grid cells)')
  f.add_argument('--images', required=True,
                 help='The folder of the image files (its files, not '
                 'sub-folders).')
  f.add_argument('--out', required=True, help='A fresh output directory.')
  f.add_argument('--skip_bad', action='store_true',
                 help='Skip and count files that are not images instead of '
                 'stopping.')
  f.set_defaults(run=_image_folder)

  h = sub.add_parser('shard',
                     help='a folder (store + caption splits) -> the same '
                     'sharded by image, for data.read=own_shards')
  h.add_argument('--in', dest='in_dir', required=True,
                 help='The folder: its region store (or images.json), '
                 'caption splits and meta.json.')
  h.add_argument('--out', required=True, help='A fresh output directory.')
  size = h.add_mutually_exclusive_group(required=True)
  size.add_argument('--shards', type=int, help='The number of shards N.')
  size.add_argument('--shard_bytes',
                    help='Bound on a store shard\'s bytes (e.g. 2G): N is '
                    'the smallest that keeps every shard within it.')
  h.add_argument('--multiple_of', type=int, default=1,
                 help='With --shard_bytes: make N a multiple of this (the '
                 'process counts you will read it with).')
  h.add_argument('--splits', default=','.join(reshard.DEFAULT_SPLITS),
                 help='Comma-separated splits to shard (caption records).')
  h.add_argument('--whole_splits', default=None,
                 help='Comma-separated splits copied whole, with a store of '
                 f'their images (default: {reshard.DEFAULT_WHOLE_SPLIT} if '
                 'the folder has it; evaluation reads them globally).')
  h.add_argument('--skip_bad', action='store_true',
                 help='Skip and count bad records instead of stopping.')
  h.set_defaults(run=_shard)

  tasks_cli.add_task_commands(sub)
  for command in sub.choices.values():
    cli_errors.add_verbose_flag(command)

  a = ap.parse_args(argv)
  return a.run(a)


if __name__ == '__main__':
  cli_errors.run_tool('convert', main)
