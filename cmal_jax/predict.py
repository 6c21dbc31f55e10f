"""Ask a fine-tuned model about one image (or a few): the predictions of a
training workdir's best (or any) checkpoint for queries you type.

  python -m cmal_jax.predict --workdir=runs/vqa --image=ID --question="..."
  python -m cmal_jax.predict --workdir=runs/ve --image=ID --hypothesis="..."
  python -m cmal_jax.predict --workdir=runs/rec --image=ID --expression="..."
  python -m cmal_jax.predict --workdir=runs/nlvr2 --image=ID --image2=ID \\
      --statement="..."
  python -m cmal_jax.predict --workdir=runs/retrieval --caption="..." \\
      --images=ID,ID,...
  python -m cmal_jax.predict --workdir=runs/pretrain --step=latest \\
      --caption="..." --image=N    # anchors (predict_anchors.py)

--step=best (default: workdir/best, the parameters the run evaluated on its
test splits), N (checkpoints/N) or latest; --top_k (vqa answers, retrieval
images); --json prints one JSON object; --draw=out.png also saves the image
with the prediction drawn (predict_draw.py). From Python:

  predictor = Predictor.from_workdir('runs/vqa')
  predictor.answer(['img-1'], ['what color is the cube?'], top_k=3)
  # [[{'answer': 'red', 'score': 0.93}, ...]]

An image is an image id of the workdir's data folder (its region store; for
a model that reads pixels, its image store). A model that reads pixels also
takes an image file: a path that is not an id of its store, or
ImageFile(path, boxes=[[x1, y1, x2, y2], ...] in pixels, tags=[...]) to
give its boxes (without boxes the model reads the image's grid cells, as it
does for an image of the store without any):

  python -m cmal_jax.predict --workdir=runs/vqa_pixels --image=photo.jpg \\
      --question="..." [--boxes=boxes.json]
  predictor.answer(['photo.jpg', ImageFile('photo.jpg', boxes=[[0, 0, 40,
                    30]])], ['what is it?'] * 2)

--boxes is a JSON list of [x1, y1, x2, y2] boxes in pixels, or an object
{"boxes": [...], "tags": [...]} (an images.json entry without "file"). The
file is decoded by the image store's own code (image_store.read_image_file),
so a file of the data folder gets the prediction its image id gets.

A query is encoded by the task pipeline's own encoder
(task_pipeline.TaskBatchEncoder), so it reaches the model exactly as an
evaluation example does; the model runs jitted, one compile per batch size.
"""

import argparse
import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from cmal_jax import cli_errors, finetune, predict_anchors, predict_draw
from cmal_jax.data import image_store, task_pipeline, tasks
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.export import export
from cmal_jax.world import synthetic

PROG = 'predict'

# The head of each task's model; a pre-training checkpoint has the AMC
# pairing head instead (and, as retrieval's, the ITM head).
TASK_HEADS = {'vqa': 'vqa_head', 've': 've_head', 'nlvr2': 'nlvr2_head',
              'rec': 'rec_head', 'retrieval': 'itm_head'}
PRETRAINING_HEAD = 'pairing_head'

# The task fields of an example built from a query that the batch encoder
# turns into training targets: placeholders, as the model never reads them.
QUERY_PLACEHOLDERS = {
    'vqa': dict(question_id=0, answers=[], question_type='',
                answer_type=''),
    've': dict(pair_id='query', label=tasks.VE_LABELS[0]),
    'nlvr2': dict(identifier='query', label=False),
    'rec': dict(ref_id=0, sent_id=0, target_box=[0.0, 0.0, 1.0, 1.0]),
}


def read_answer_vocab(config, workdir):
  """The VQA head's answers, from the run's data folder (answer_vocab.json,
  which the run built from its vqa_train split)."""
  vocab = export.answer_vocab(config, workdir)
  if vocab is None:
    path = os.path.join(synthetic.data_dir(config, workdir),
                        task_pipeline.ANSWER_VOCAB_FILE)
    raise FileNotFoundError(f'{PROG}: {path} not found: the answers of the '
                            f'vqa head of {workdir} are unknown.')
  return vocab


def check_fine_tuned(config, workdir):
  """Raises ValueError for a pre-training workdir: the task methods need a
  fine-tuned model."""
  if config.task == 'pretrain':
    raise ValueError(
        f'{PROG}: {workdir} is a pre-training workdir; the task methods need '
        'a fine-tuned one (python -m cmal_jax.main '
        '--config=configs/finetune.py:TASK --config.init_from=...).')


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """An image file for a model that reads pixels, with its boxes (pixels,
  x1 y1 x2 y2) and their tags; boxes=None: the grid."""
  path: str
  boxes: list | None = None
  tags: list | None = None

  def regions(self):
    """Its images.json-style entry (image_store.entry_regions)."""
    return {k: v for k, v in (('boxes', self.boxes), ('tags', self.tags))
            if v is not None}


def image_name(image):
  """The str an image (an id, a path or an ImageFile) goes by in a query
  example."""
  return image.path if isinstance(image, ImageFile) else os.fspath(image)


def read_boxes_file(path):
  """--boxes: a JSON list of [x1, y1, x2, y2] in pixels, or {"boxes": [...],
  "tags": [...]} -> the entry {"boxes", "tags"?}; ValueError naming the file
  when it is neither (the boxes themselves are checked against the image:
  image_store.entry_regions)."""
  with open(path, encoding='utf-8') as f:
    try:
      boxes = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: malformed JSON: {e}') from e
  if isinstance(boxes, list):
    return dict(boxes=boxes)
  if not isinstance(boxes, dict) or 'boxes' not in boxes or (
      set(boxes) - {'boxes', 'tags'}):
    raise ValueError(f'{path}: expected a list of [x1, y1, x2, y2] boxes in '
                     'pixels or {"boxes": [...], "tags": [...]}')
  return boxes


def query_example(task, text, image_ids):
  """A task example (tasks.py schema) of a query: its text and image ids,
  the other fields placeholders (QUERY_PLACEHOLDERS), validated as a record
  would be."""
  example = {task_pipeline.TEXT_FIELDS[task]: text,
             task_pipeline.image_id_field(task): (
                 list(image_ids) if task == 'nlvr2' else image_ids[0]),
             **QUERY_PLACEHOLDERS[task]}
  return task_pipeline.validate_task_example(example, task, path='<query>',
                                             index=0)


def chunks(items, size):
  return [items[i:i + size] for i in range(0, len(items), size)]


def softmax(logits):
  """Over the last axis, in float64: [..., C] -> [..., C]."""
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(logits):
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def cls_region_attention(intermediates, inputs, num_layers):
  """[CLS]'s attention over the region slots in the last unified layer, from
  the probabilities it sowed ([B, H, L, L], L = T + R): averaged over heads,
  renormalised over the real regions -> [B, R]. In SemVLP's two-stream mode
  text reads regions only through the cross-attention sub-layer, so that is
  the one read when the layer ran it."""
  layer = intermediates['unified'][f'layer_{num_layers - 1}']
  module = layer['cross_attention' if 'cross_attention' in layer
                 else 'attention']
  probs = module['attention_probs'][0]
  T = inputs['input_ids'].shape[1]
  mask = inputs['region_mask'] > 0
  weights = jnp.where(mask, probs[:, :, 0, T:].astype(jnp.float32).mean(1), 0)
  return weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)


class Predictor:
  """A fine-tuned model and what it needs to read a query: the workdir's
  config, data folder (images, answer vocabulary) and tokenizer.

  config: the run's config (config.json); params: its parameters (host or
  device arrays); answer_vocab: vqa's answers in the head's order.
  """

  def __init__(self, config, params, *, workdir, where, answer_vocab=None):
    self.config, self.task = config, config.task
    self.workdir, self.where = workdir, where
    check_fine_tuned(config, workdir)
    head = TASK_HEADS[self.task]
    if head not in params or PRETRAINING_HEAD in params:
      why = f'no {head}' if head not in params else f'a {PRETRAINING_HEAD}'
      raise ValueError(
          f'{PROG}: {where} holds a pre-training checkpoint ({why}), not a '
          f'fine-tuned {self.task} model.')
    self.answer_vocab = answer_vocab
    self.model = finetune.task_model(config, len(answer_vocab or ()))
    self.params = jax.device_put(params)
    self.shapes = task_pipeline.task_shapes(config)
    self.directory = synthetic.data_dir(config, workdir)
    self.store = task_pipeline.open_store(self.directory, self.shapes)
    self.tokenizer = load_tokenizer(config.data.vocab_path or None)
    self.encoder = task_pipeline.TaskBatchEncoder(
        config, self.task, train=False, answer_vocab=answer_vocab)
    self.batch_size = config.eval.batch_size
    # Compiles per batch size (model rows), counted when jit traces.
    self.compiles = collections.Counter()
    self._logits = jax.jit(self._apply)
    self._attention = jax.jit(self._apply_attention)

  @classmethod
  def from_workdir(cls, workdir, step='best'):
    """The predictor of a training workdir's checkpoint `step`: 'best'
    (workdir/best), 'latest' or N (workdir/checkpoints/N). Only the
    parameters are read, not the optimizer state."""
    config = export.read_run_config(workdir, what=PROG)
    check_fine_tuned(config, workdir)  # Before the checkpoint is read.
    params, where = export.load_params(workdir, export.parse_step(step),
                                       what=PROG)
    vocab = (read_answer_vocab(config, workdir) if config.task == 'vqa'
             else None)
    return cls(config, params, workdir=workdir, where=where,
               answer_vocab=vocab)

  # ----------------------------------------------------------- the model

  def _apply(self, params, inputs):
    self.compiles[len(inputs['input_ids'])] += 1  # Runs at trace time only.
    return self.model.apply({'params': params}, inputs)['logits']

  def _require(self, task, method, *queries):
    """Checks that `method` fits this workdir's task and that its lists
    (`queries`) are non-empty and of one length."""
    if self.task != task:
      raise ValueError(f'{self.workdir} is a {self.task} workdir; '
                       f'{method}() needs a {task} one.')
    lengths = {len(q) for q in queries}
    if len(lengths) != 1 or 0 in lengths:
      raise ValueError(f'{method}(): expected non-empty lists of one length, '
                       f'got lengths {[len(q) for q in queries]}.')

  def image_record(self, image):
    """The record the model reads of an image: an image id of the store;
    for a model that reads pixels also an image file (an ImageFile, or a
    path that is not an id of the store), read as the store reads its own
    (image_store.read_image_file). ValueError naming the image when it is
    none of these (the user's input, not a lookup bug)."""
    if isinstance(image, ImageFile):
      return self._file_record(image)
    try:
      return self.store[image]
    except KeyError as e:
      # (Only a path: os.path.isfile takes an int for a file descriptor.)
      if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return self._file_record(ImageFile(os.fspath(image)))
      raise ValueError(self._unknown_image(image, e.args[0])) from e

  def _file_record(self, image):
    """The record of an ImageFile; ValueError for a region-store model,
    which has no pixels to read it with."""
    if not self.shapes.pixels:
      raise ValueError(
          f'{image.path}: the model of {self.workdir} reads region '
          'features, not pixels: give an image id of its region store '
          f'{self.store.path}')
    return image_store.read_image_file(image.path, image.regions())

  def _unknown_image(self, image, not_in_store):
    """Why an image that is not an id of the store was refused."""
    if not self.shapes.pixels:
      return not_in_store
    return (f'{image}: no such image file, nor an image id of '
            f'{self.store.path} ({len(self.store)} images)')

  def _run(self, inputs):
    """The model's logits of inputs [B, ...] as a host array."""
    return np.asarray(jax.device_get(self._logits(self.params, inputs)))

  def _example_batches(self, texts, image_ids):
    """The task batches of one query per text with its images (image_ids: a
    list per text), encoded as evaluation encodes a task example, in
    batches of at most eval.batch_size."""
    queries = [(query_example(self.task, t, [image_name(i) for i in ids]),
                ids) for t, ids in zip(texts, image_ids)]
    batches = []
    for part in chunks(queries, self.batch_size):
      items = [dict(example=ex, index=0,
                    images=[self.image_record(i) for i in ids])
               for ex, ids in part]
      # The rng draws only retrieval's negatives; other tasks ignore it.
      batches.append(self.encoder(items, np.random.default_rng(0)))
    return batches

  def _pair_batches(self, pairs):
    """Model inputs of (text, image id) pairs, as retrieval evaluation
    encodes them, in batches of at most eval.batch_size."""
    batches = []
    for part in chunks(pairs, self.batch_size):
      rows = [task_pipeline.encode_example(t, self.image_record(i),
                                           self.tokenizer, self.shapes)[0]
              for t, i in part]
      batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return batches

  def _example_logits(self, texts, image_ids):
    """The logits of one query per text with its images: ([N, ...] logits,
    the encoded batches)."""
    batches = self._example_batches(texts, image_ids)
    logits = [self._run(finetune.model_inputs(b, self.task)) for b in batches]
    return np.concatenate(logits), batches

  def _apply_attention(self, params, inputs):
    _, state = self.model.apply({'params': params}, inputs,
                                mutable=['intermediates'])
    return cls_region_attention(state['intermediates'], inputs,
                                self.config.model.unified_layers)

  def region_attention(self, texts, image_ids):
    """What the model looked at: the attention of [CLS] over the region
    slots in the last unified layer (model/layers.py sows it; nothing else
    of the model changes), per image of each query. image_ids: a list per
    text (nlvr2: [left, right]; other tasks: one id).

    Returns one list per text of (weights [R], boxes [R, 4], mask [R]) per
    image: weights averaged over heads and renormalised over the real
    regions (they sum to 1; 0 on padding), boxes normalised x1 y1 x2 y2."""
    if self.task == 'retrieval':  # Its encoder builds no query examples.
      batches = self._pair_batches([(t, i) for t, ids in zip(texts, image_ids)
                                    for i in ids])
    else:
      batches = self._example_batches(texts, image_ids)
    rows = []
    for batch in batches:
      inputs = finetune.model_inputs(batch, self.task)
      weights = np.asarray(jax.device_get(self._attention(self.params,
                                                          inputs)))
      rows += zip(weights, inputs['region_boxes'], inputs['region_mask'])
    per_text = [len(ids) for ids in image_ids]
    starts = np.cumsum([0] + per_text)
    return [rows[a:a + n] for a, n in zip(starts, per_text)]

  # ------------------------------------------------------- per task

  def answer(self, images, questions, top_k=5):
    """VQA: the top_k answers of each question about its image, by the
    head's sigmoid score (it was trained with a binary cross-entropy per
    answer): [[{'answer', 'score'}] * top_k] per question, best first."""
    self._require('vqa', 'answer', images, questions)
    logits, _ = self._example_logits(questions, [[i] for i in images])
    scores = sigmoid(logits)  # [N, V]
    top = np.argsort(-scores, axis=1, kind='stable')[:, :top_k]
    return [[{'answer': self.answer_vocab[j], 'score': float(s[j])}
             for j in row] for s, row in zip(scores, top)]

  def entail(self, images, hypotheses):
    """VE: {label: probability} of each hypothesis about its image, over
    tasks.VE_LABELS (softmax: they sum to 1)."""
    self._require('ve', 'entail', images, hypotheses)
    logits, _ = self._example_logits(hypotheses, [[i] for i in images])
    return [dict(zip(tasks.VE_LABELS, map(float, p)))
            for p in softmax(logits)]

  def ground(self, images, expressions):
    """REC: the region each expression refers to: {'box': [x1, y1, x2, y2]
    (normalised, as region_boxes), 'score': its softmax probability over
    the image's regions, 'region': its slot among the R regions kept}."""
    self._require('rec', 'ground', images, expressions)
    logits, batches = self._example_logits(expressions,
                                           [[i] for i in images])
    boxes = np.concatenate([b['region_boxes'] for b in batches])  # [N, R, 4]
    probs = softmax(logits)  # [N, R]; padding slots have logit -1e9.
    chosen = probs.argmax(-1)
    return [{'box': [float(x) for x in boxes[n, r]],
             'score': float(probs[n, r]), 'region': int(r)}
            for n, r in enumerate(chosen)]

  def compare(self, images_left, images_right, statements):
    """NLVR2: the probability that each statement is true of its pair of
    images: [p_true] (floats)."""
    self._require('nlvr2', 'compare', images_left, images_right,
                  statements)
    logits, _ = self._example_logits(
        statements, [[a, b] for a, b in zip(images_left, images_right)])
    return [float(p) for p in softmax(logits)[:, 1]]

  def rank(self, caption, images, top_k=None):
    """Retrieval: the images ranked by the ITM probability that the caption
    describes them (every pair scored by ITM, as evaluation does without
    ITC): [{'image', 'score'}], best first (top_k of them when given)."""
    self._require('retrieval', 'rank', images)
    logits = [self._run(inputs) for inputs in
              self._pair_batches([(caption, i) for i in images])]
    scores = softmax(np.concatenate(logits))[:, 1]
    order = np.argsort(-scores, kind='stable')[:top_k]
    return [{'image': images[i], 'score': float(scores[i])} for i in order]


# -------------------------------------------------------------------- CLI

# The query flag of each task, and the image flags it reads.
TASK_FLAGS = {'vqa': 'question', 've': 'hypothesis', 'rec': 'expression',
              'nlvr2': 'statement', 'retrieval': 'caption'}
FLAG_TASKS = {flag: task for task, flag in TASK_FLAGS.items()}
IMAGE_FLAGS = {'nlvr2': ('image', 'image2'), 'retrieval': ('images',)}


class UsageError(ValueError):
  """A command line that does not fit the workdir."""


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m cmal_jax.predict',
      description='Predictions of a fine-tuned model (a training workdir) '
      'for one image: give the query flag of its task. A pre-training '
      'workdir: --caption and --image (a pair index) give its anchors.')
  export.add_checkpoint_flags(parser, 'A fine-tuning workdir (python -m '
                              'cmal_jax.main).', default_step='best')
  parser.add_argument('--image', help='An image id of the workdir\'s data; '
                      'for a model that reads pixels also an image file.')
  parser.add_argument('--boxes', metavar='BOXES.json',
                      help='With --image an image file (pixels): its boxes, '
                      'a JSON list of [x1, y1, x2, y2] in pixels or '
                      '{"boxes": [...], "tags": [...]} (default: the grid).')
  parser.add_argument('--image2', help='nlvr2: the right image id.')
  parser.add_argument('--images', help='retrieval: image ids, comma-'
                      'separated, to rank.')
  parser.add_argument('--question', help='vqa: a question about --image.')
  parser.add_argument('--hypothesis', help='ve: a hypothesis about --image.')
  parser.add_argument('--expression',
                      help='rec: a referring expression in --image.')
  parser.add_argument('--statement', help='nlvr2: a statement about --image '
                      '(left) and --image2 (right).')
  parser.add_argument('--caption', help='retrieval: a caption to rank '
                      '--images by.')
  parser.add_argument('--top_k', type=int, default=5,
                      help='vqa: answers shown; retrieval: images shown.')
  parser.add_argument('--draw', metavar='OUT.png',
                      help='Also save the image with the prediction drawn '
                      '(rec: the chosen box; other tasks: a heat map of '
                      'where [CLS] attended; cmal_jax/predict_draw.py).')
  parser.add_argument('--json', action='store_true',
                      help='Print one JSON object (for scripts).')
  cli_errors.add_verbose_flag(parser)
  return parser.parse_args(argv)


def check_flags(args, task):
  """The query flag of `task`, after checking the command line gives it
  (and only it) with its images; UsageError otherwise."""
  given = [f for f in FLAG_TASKS if getattr(args, f) is not None]
  wanted = TASK_FLAGS.get(task)
  if wanted is None:
    raise UsageError(f'{args.workdir} is a {task} workdir; predict needs a '
                     f'fine-tuned one ({", ".join(TASK_FLAGS)})')
  for flag in given:
    if flag != wanted:
      raise UsageError(f'{args.workdir} is a {task} workdir; --{flag} needs '
                       f'a {FLAG_TASKS[flag]} one (a {task} workdir takes '
                       f'--{wanted})')
  if not given:
    raise UsageError(f'{args.workdir} is a {task} workdir: give --{wanted}')
  for flag in IMAGE_FLAGS.get(task, ('image',)):
    if not getattr(args, flag):
      raise UsageError(f'--{wanted} needs --{flag}')
  if args.boxes is not None and not args.image:
    raise UsageError('--boxes goes with --image (an image file)')
  return wanted


def query_images(args, task):
  """The images of the command line's query: [--image] ([--image,
  --image2] for nlvr2; --images' for retrieval), --image an ImageFile
  when --boxes gives its boxes."""
  if task == 'retrieval':
    return [i for i in args.images.split(',') if i]
  image = (ImageFile(args.image, **read_boxes_file(args.boxes))
           if args.boxes else args.image)
  return [image, args.image2] if task == 'nlvr2' else [image]


def predict(predictor, args, images):
  """Runs the query of the command line about its images (query_images):
  (JSON-able result, text lines)."""
  task, top_k = predictor.task, args.top_k
  if task == 'vqa':
    got = predictor.answer(images, [args.question], top_k)[0]
    lines = [f'{s["score"]:.4f}  {s["answer"]}' for s in got]
  elif task == 've':
    got = predictor.entail(images, [args.hypothesis])[0]
    lines = [f'{p:.4f}  {label}' for label, p in
             sorted(got.items(), key=lambda kv: -kv[1])]
  elif task == 'rec':
    got = predictor.ground(images, [args.expression])[0]
    box = ', '.join(f'{x:.4f}' for x in got['box'])
    lines = [f'{got["score"]:.4f}  region {got["region"]}  box [{box}]']
  elif task == 'nlvr2':
    got = predictor.compare(images[:1], images[1:], [args.statement])[0]
    lines = [f'{got:.4f}  true', f'{1 - got:.4f}  false']
  else:
    got = predictor.rank(args.caption, images, top_k)
    lines = [f'{s["score"]:.4f}  {s["image"]}' for s in got]
  return got, lines


def check_pretraining_flags(args):
  """A pre-training workdir takes --caption and one --image (a pair index
  of its evaluation split); UsageError otherwise."""
  others = [f for f in ('image2', 'images', 'boxes', *FLAG_TASKS)
            if f != 'caption' and getattr(args, f) is not None]
  if others:
    raise UsageError(f'{args.workdir} is a pretrain workdir; --{others[0]} '
                     'needs a fine-tuned one (a pretrain workdir takes '
                     '--caption and --image: its anchors)')
  if args.caption is None or args.image is None:
    raise UsageError(f'{args.workdir} is a pretrain workdir: give --caption '
                     'and --image (a pair index of its evaluation split)')


def print_anchors(args):
  """The anchors of --caption with the pair --image of a pre-training
  workdir, and the region AMC pairs with each (predict_anchors.py)."""
  check_pretraining_flags(args)
  finder = predict_anchors.AnchorFinder.from_workdir(args.workdir, args.step)
  found = finder.anchors([args.image], [args.caption])[0]
  if args.draw:
    predict_draw.draw_anchors(finder.pair(args.image), found).save(args.draw)
  if args.json:
    print(json.dumps(dict(workdir=args.workdir, checkpoint=finder.where,
                          task='pretrain', caption=args.caption,
                          image=args.image, anchors=found)))
    return
  print(f'pretrain ({finder.where}): {args.caption}')
  for a in found:
    box = ', '.join(f'{x:.2f}' for x in a['box'])
    print(f'{a["word"]} -> region {a["region"]} (box [{box}], '
          f'tag {a["tag"] or "none"})')
  if not found:
    print('no anchors: no word of the caption names a tag of its regions')


def main(argv=None):
  """Prints the prediction of the command line; raises on bad input (the
  `python -m` entry prints it as one line: cli_errors.run_tool)."""
  args = parse_args(argv)
  config = export.read_run_config(args.workdir, what=PROG)
  if config.task == 'pretrain':
    return print_anchors(args)
  flag = check_flags(args, config.task)
  predictor = Predictor.from_workdir(args.workdir, args.step)
  images = query_images(args, predictor.task)
  result, lines = predict(predictor, args, images)
  if args.draw:
    predict_draw.draw_prediction(predictor, getattr(args, flag), images,
                                 result).save(args.draw)
  if args.json:
    query = {k: getattr(args, k) for k in (flag, 'image', 'image2', 'images',
                                           'boxes')
             if getattr(args, k) is not None}
    print(json.dumps(dict(workdir=args.workdir, checkpoint=predictor.where,
                          task=predictor.task, **query, prediction=result)))
  else:
    print(f'{predictor.task} ({predictor.where}): {getattr(args, flag)}')
    print('\n'.join(lines))


if __name__ == '__main__':
  cli_errors.run_tool(PROG, main)
