r"""The task sub-commands of `python -m cmal_jax.convert`: an official
downstream annotation release -> one fine-tuning task split.

  python -m cmal_jax.convert vqa_v2 --questions=FILE [--annotations=FILE] \
      --split=train --regions=DIR [--out=DIR] [--skip_bad]
  python -m cmal_jax.convert snli_ve --input=snli_ve_train.jsonl --split=train \
      --regions=DIR [--out=DIR] [--skip_bad]
  python -m cmal_jax.convert nlvr2 --input=train.json --split=train \
      --regions=DIR [--out=DIR] [--skip_bad]
  python -m cmal_jax.convert refcoco --refs='refs(unc).p' \
      --instances=instances.json --split=train --regions=DIR [--out=DIR] \
      [--skip_bad]
  python -m cmal_jax.convert karpathy --input=dataset_coco.json --split=train \
      [--without_restval] --regions=DIR [--out=DIR] [--skip_bad]

Each runs one reader of formats/ (vqa_v2 -> task vqa, snli_ve -> ve, nlvr2
-> nlvr2, refcoco -> rec, karpathy -> retrieval) and writes its examples to
DIR/{task}_{split}.array_record (formats.write_task_split: a temp file
renamed when complete).

`--regions=DIR` is the visual side, converted first: a region store
(`bottom_up --out=DIR`) or an image folder (`coco_instances` /
`vg_objects --out=DIR`, images.json). Its image ids are the reader's
`image_ids`, so an example whose image the folder lacks is an
`unknown_image` error (counted with --skip_bad). Fine-tuning reads the task
splits and the visual side from one folder (`--config.data.dir`), so the
split is written into DIR; `--out`, when given, must be that folder.

The VQA answer vocabulary is not written here: fine-tuning builds it from
vqa_train (task_pipeline.load_or_build_answer_vocab, DIR/answer_vocab.json);
writing vqa_train removes an answer_vocab.json built from an earlier one.
"""

import os

from cmal_jax import task_metrics
from cmal_jax.convert.formats import (captions, karpathy, nlvr2, refcoco,
                                      snli_ve, summary, vqa_v2,
                                      write_task_split)
from cmal_jax.data import task_pipeline


def task_folder(args) -> str:
  """The folder the split goes to: the visual side's (--regions).

  Raises ValueError when --out names another folder: the pipeline would
  find no store beside the split there.
  """
  same = args.out is None or (os.path.realpath(args.out)
                              == os.path.realpath(args.regions))
  if not same:
    raise ValueError(
        f'--out={args.out} is not the --regions folder {args.regions}: '
        'fine-tuning reads a task split and its region store or images '
        'from one folder (data.dir), so the split is written beside them; '
        'drop --out or give the --regions folder')
  return args.regions


def convert_task(args, task: str, read, *paths, **options
                 ) -> tuple[list[dict], dict[str, int]]:
  """Reads `read(*paths, **options)` against the --regions folder's image
  ids, writes the task split there and prints the summary line.

  Returns (examples written, {reason: records skipped}). Raises the
  reader's FormatError on bad input unless --skip_bad, and ValueError when
  no example is left (fine-tuning refuses an empty split).
  """
  directory = task_folder(args)
  store, _ = captions.open_store(directory)
  image_ids = set(store.image_ids())
  examples, skipped = read(
      *paths, image_ids=image_ids,
      on_error='skip' if args.skip_bad else 'raise', **options)
  if not examples:
    raise ValueError(f'no {task} {args.split} examples in the input (skipped: '
                     f'{skipped or "none"}), so nothing was written to '
                     f'{directory}; is --split={args.split} a split of the '
                     f'file?')
  write_task_split(directory, task, args.split, examples)
  print(summary(f'{task} {args.split} examples to {directory}',
                len(examples), skipped))
  shown = {i for ex in examples for i in task_pipeline.image_ids_of(ex, task)}
  print(f'Images: {len(shown)} of the {len(image_ids)} in {directory}')
  return examples, skipped


def answers_line(examples: list[dict]) -> str:
  """How many distinct answers the split's questions have, after the
  normalisation the answer vocabulary applies."""
  answers = [ex['answers'] for ex in examples]
  if not any(answers):
    return 'Answers: none (no --annotations: an unlabelled split)'
  # build_answer_vocab keeps the top_n; all of them is at most every answer.
  distinct = task_metrics.build_answer_vocab(
      answers, top_n=sum(len(a) for a in answers))
  return (f'Answers: {len(distinct)} distinct; fine-tuning keeps the '
          f'finetune.num_answers most frequent of vqa_train')


def drop_stale_answer_vocab(directory: str):
  """Removes directory/answer_vocab.json: it was built from the vqa_train
  just replaced (the pipeline's staleness check compares only the number
  of questions)."""
  path = os.path.join(directory, task_pipeline.ANSWER_VOCAB_FILE)
  if os.path.exists(path):
    os.remove(path)
    print(f'Removed {path} (built from the earlier vqa_train; fine-tuning '
          'rebuilds it)')


def _vqa_v2(args):
  examples, skipped = convert_task(args, 'vqa', vqa_v2.read_vqa_v2,
                                   args.questions, args.annotations)
  print(answers_line(examples))
  if args.split == 'train':
    drop_stale_answer_vocab(task_folder(args))
  return len(examples), skipped


def _snli_ve(args):
  examples, skipped = convert_task(args, 've', snli_ve.read_snli_ve,
                                   args.input)
  return len(examples), skipped


def _nlvr2(args):
  examples, skipped = convert_task(args, 'nlvr2', nlvr2.read_nlvr2,
                                   args.input)
  return len(examples), skipped


def _refcoco(args):
  examples, skipped = convert_task(args, 'rec', refcoco.read_refcoco,
                                   args.refs, args.instances,
                                   split=args.split)
  return len(examples), skipped


def _karpathy(args):
  examples, skipped = convert_task(
      args, 'retrieval', karpathy.read_karpathy, args.input,
      split=args.split, restval_as_train=not args.without_restval)
  return len(examples), skipped


def _add_common(parser, split_help: str, split_choices=None):
  """--split, --regions, --out and --skip_bad, the same for every task."""
  parser.add_argument('--split', required=True, choices=split_choices,
                      help=split_help)
  parser.add_argument('--regions', required=True,
                      help='The visual side: the folder of a region store '
                      '(bottom_up --out) or of images.json (coco_instances '
                      '/ vg_objects --out). The split is written into it.')
  parser.add_argument('--out', default=None,
                      help='Dataset directory: the --regions folder (the '
                      'default; another is refused).')
  parser.add_argument('--skip_bad', action='store_true',
                      help='Skip and count bad records instead of stopping.')


def add_task_commands(sub):
  """Registers the five task sub-commands on cli.main's subparsers."""
  q = sub.add_parser('vqa_v2', help='VQA v2 questions (+ annotations) -> '
                     'vqa split')
  q.add_argument('--questions', required=True,
                 help='v2_OpenEnded_mscoco_{split}_questions.json.')
  q.add_argument('--annotations', default=None,
                 help='v2_mscoco_{split}_annotations.json (none for test).')
  _add_common(q, 'Split name: train, val, test, ... (vqa_{split}).')
  q.set_defaults(run=_vqa_v2)

  e = sub.add_parser('snli_ve', help='SNLI-VE JSONL -> ve split')
  e.add_argument('--input', required=True, help='snli_ve_{split}.jsonl.')
  _add_common(e, 'Split name: train, dev, test (ve_{split}).')
  e.set_defaults(run=_snli_ve)

  n = sub.add_parser('nlvr2', help='NLVR2 JSON lines -> nlvr2 split')
  n.add_argument('--input', required=True,
                 help='train.json / dev.json / test1.json (one JSON object '
                 'a line; images {identifier stem}-img0/-img1).')
  _add_common(n, 'Split name: train, dev, test1 (nlvr2_{split}).')
  n.set_defaults(run=_nlvr2)

  r = sub.add_parser('refcoco', help='RefCOCO/+/g refs + COCO instances -> '
                     'rec split')
  r.add_argument('--refs', required=True,
                 help='refs(unc).p / refs(umd).p / refs(google).p (a pickle: '
                 'only a file you trust).')
  r.add_argument('--instances', required=True,
                 help='The instances.json shipped with the refs (boxes, '
                 'image sizes).')
  _add_common(r, 'The refs\' split to convert (rec_{split}).',
              refcoco.SPLITS)
  r.set_defaults(run=_refcoco)

  k = sub.add_parser('karpathy', help='Karpathy split JSON (COCO, '
                     'Flickr30K) -> retrieval split')
  k.add_argument('--input', required=True,
                 help='dataset_coco.json / dataset_flickr30k.json.')
  k.add_argument('--without_restval', action='store_true',
                 help='--split=train without the restval images (default: '
                 'with them, the usual COCO training set).')
  _add_common(k, 'The Karpathy split to convert (retrieval_{split}).',
              karpathy.SPLITS)
  k.set_defaults(run=_karpathy)
