"""Fine-tuning on the downstream tasks: what differs from pre-training.

train.py runs the same loop for both (checkpoints, resume, metrics,
sharding); this module supplies the task's data, model, loss and evaluation
(train_step.Job). Per task (docs/design.md §2):

  vqa        BCE on VQA v2 soft scores over the answer vocabulary; metric
             VQA accuracy (official normalisation and 10-choose-9 average),
             per question and answer type; predictions: the official VQA
             results JSON [{"question_id", "answer"}].
  ve, nlvr2  softmax cross-entropy over 3 / 2 labels; accuracy.
  rec        softmax over the regions, target the region of highest IoU with
             the gold box; correct when the chosen region's box has IoU >=
             0.5 with the gold box.
  retrieval  ITM cross-entropy with in-batch negatives (+ ITC when
             finetune.itc > 0); recall@1/5/10 both ways over the whole
             split, ITC top-k re-ranked by ITM (or ITM over every pair).

data.on_error='skip' (task_pipeline.TaskDecoder): training feeds the next
good example in a bad one's place and counts it in the train state's
data_stats, which train.py reports and limits as for pre-training;
evaluation leaves bad examples out of the metric and reports them per split
(eval_skips).
"""

import json
import os
import time

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from cmal_jax import (checkpoint, controls, objectives, sharding, storage,
                      task_metrics, train_step)
from cmal_jax.data import pipeline, task_pipeline, tasks
from cmal_jax.data.shapes import zero_inputs
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.model import xent
from cmal_jax.model.cmal import (CMAL, PIXEL_PARAMS, ModelConfig,
                                 itc_features, pretrained_param_names)
from cmal_jax.world import scenes, synthetic, task_baselines, task_examples
from cmal_jax.logs import log
from cmal_jax.model.pixels import reads_pixels

MODEL_INPUTS = task_pipeline.PAIR_KEYS  # What the model reads of a batch.
PREDICTIONS_DIR = 'predictions'
# The tasks whose test results carry the images-shuffled control: their
# answer is a label, so another example's image leaves the answer space
# as it is (REC's answer is a region of the image: its control is the blind
# baseline, a random region; retrieval ranks every image anyway).
IMAGES_SHUFFLED_TASKS = ('vqa', 've', 'nlvr2')
SHUFFLED = '_images_shuffled'  # The control's suffix on a metric's name.
ITC_PREFIX = 'itc_'  # Retrieval's recalls of the ITC ranking alone.


def splits_of(config):
  """(train split, eval split, test splits) of a fine-tuning config."""
  return (config.data.train_split, config.data.eval_split,
          tuple(config.finetune.test_splits))


# ------------------------------------------------------------------- data

def ensure_task_data(config, directory, every_process=False):
  """Generates the synthetic world's splits of config.task where they are
  missing (synthetic.ensure_splits), after synthetic.check_images."""
  synthetic.check_images(config, directory)

  def generate(folder, splits):
    t = time.time()
    params = scenes.WorldParams.from_config(config)
    task_examples.generate(folder, [config.task], splits, params,
                         seed=config.seed)
    log(f'Generated synthetic {config.task} splits {splits} in {directory} '
        f'({time.time() - t:.0f}s)')

  synthetic.ensure_splits(
      directory, synthetic.synthetic_splits(config),
      lambda split: os.path.exists(tasks.task_path(directory, config.task,
                                                   split)),
      generate, every_process, barrier='task_data')


def model_inputs(batch, task):
  """The model's inputs from a task batch: nlvr2's [B, 2, ...] image pairs
  become [2B, ...] rows (example-major, so each example stays on its
  shard)."""
  if task == 'nlvr2':
    batch = task_pipeline.flatten_image_pairs(batch)
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def task_model(config, num_outputs=0):
  """The CMAL model of a fine-tuning config (num_outputs: vqa's answer
  vocabulary size). No tag head: fine-tuning predicts no tags."""
  return CMAL(ModelConfig.from_config(config.model, num_tags=1),
              task=config.task, num_outputs=num_outputs)


def init_inputs(config):
  """Zero model inputs with the task's shapes, for init (NLVR2: one
  example's two images)."""
  return zero_inputs(task_pipeline.task_shapes(config),
                     2 if config.task == 'nlvr2' else 1)


# ------------------------------------------------------------------ losses

def task_denominators(batch, config):
  """What the task's means divide by, over the whole batch (see
  objectives.loss_denominators): its rows, and for REC's loss the rows
  whose target overlaps a kept region."""
  d = {'rows': jnp.float32(jax.tree.leaves(batch)[0].shape[0])}
  if config.task == 'rec':
    d['rec_targets'] = xent.denominator(
        jnp.max(batch['region_iou'], -1) > 0)
  if config.task == 'retrieval':
    d['itc'] = xent.denominator(batch['itm_label'] == 1)
  return d


def task_loss(outputs, batch, config, denominators=None):
  """The task's loss -> (loss, metrics) with loss_{task}, acc_{task}.

  denominators: task_denominators of the whole batch when `batch` is a
  micro-batch; None computes them from `batch`.
  """
  task, logits = config.task, outputs['logits']
  d = (task_denominators(batch, config) if denominators is None
       else denominators)
  mean = lambda x: jnp.sum(x) / d['rows']
  metrics = {}
  if task == 'vqa':
    # UNITER: BCE summed over the answers, averaged over questions.
    bce = optax.sigmoid_binary_cross_entropy(logits, batch['targets'])
    loss = mean(jnp.sum(bce, -1))
    best = jnp.argmax(logits, -1)[:, None]
    # The soft score of the top answer: VQA accuracy against the vocabulary.
    acc = mean(jnp.take_along_axis(batch['targets'], best, 1))
  elif task in ('ve', 'nlvr2'):
    loss, acc, _ = xent.weighted_xent(
        logits, batch['label'], jnp.ones_like(batch['label'], bool),
        d['rows'])
  elif task == 'rec':
    # Examples whose target overlaps no kept region teach nothing.
    has_target = jnp.max(batch['region_iou'], -1) > 0
    loss, _, _ = xent.weighted_xent(logits, batch['gold_region'],
                                          has_target, d['rec_targets'])
    chosen = jnp.take_along_axis(batch['region_iou'],
                                 jnp.argmax(logits, -1)[:, None], 1)[:, 0]
    acc = mean(chosen >= task_pipeline.REC_IOU_THRESHOLD)
  elif task == 'retrieval':
    # With mined negatives the model says which of its 3B rows match.
    label = outputs.get('itm_label', batch['itm_label'])
    loss, acc, _ = xent.weighted_xent(
        logits, label, jnp.ones_like(label, bool),
        d['rows'] * label.shape[0] / batch['itm_label'].shape[0])
    if config.finetune.itc > 0:
      itc, itc_acc = objectives.itc_loss(
          outputs['itc_text'], outputs['itc_image'], outputs['itc_log_scale'],
          batch['itm_label'] == 1, d['itc'])
      metrics.update(loss_itc=itc, acc_itc=itc_acc)
      metrics['loss_itm'] = loss
      loss = loss + config.finetune.itc * itc
  else:
    raise ValueError(f'unknown task {task!r}')
  metrics.update({f'loss_{task}': loss, f'acc_{task}': acc, 'loss': loss})
  return loss, metrics


def make_loss(model, config):
  """The task's objectives.Loss; no corruption step, so prepare is the
  identity. Retrieval with finetune.itm_negatives='hard' trains ITM on
  negatives mined by ITC similarity in the batch (ALBEF)."""
  mined = (config.task == 'retrieval'
           and config.finetune.get('itm_negatives', 'random') == 'hard')

  def loss_fn(params, batch, rng, denominators):
    inputs = model_inputs(batch, config.task)
    if not mined:
      outputs = model.apply({'params': params}, inputs,
                            deterministic=False, rngs={'dropout': rng})
      return task_loss(outputs, batch, config, denominators)
    rng, pick_rng = jax.random.split(rng)
    index = batch['example_index']
    same = index[:, None] == index[None, :]
    pick = lambda sim, log_scale: objectives.mine_hard_negatives(
        sim, jax.lax.stop_gradient(log_scale), same, pick_rng)
    outputs = model.apply({'params': params}, inputs, pick,
                          deterministic=False, rngs={'dropout': rng},
                          method='itm_on_mined_negatives')
    return task_loss(outputs, batch, config, denominators)

  return objectives.Loss(prepare=lambda batch, rng, state=None: batch,
                    loss=loss_fn,
                    denominators=lambda batch: task_denominators(batch,
                                                                 config))


# -------------------------------------------------------------- evaluation

def make_predict_step(model, config, control=None):
  """(params, batch) -> per-example predictions [B] (rec: and the chosen
  region's box [B, 4] and IoU [B]). control: a function of the batch that
  makes a control's inputs (controls.images_shuffled)."""
  def predict(params, batch):
    if control is not None:
      batch = control(batch)
    logits = model.apply({'params': params},
                         model_inputs(batch, config.task))['logits']
    out = {'prediction': jnp.argmax(logits, -1).astype(jnp.int32)}
    if config.task == 'rec':
      idx = out['prediction'][:, None]
      out['box'] = jnp.take_along_axis(batch['region_boxes'], idx[..., None],
                                       1)[:, 0]
      out['iou'] = jnp.take_along_axis(batch['region_iou'], idx, 1)[:, 0]
    return out
  return predict


def predict_split(predict, params, config, directory, split, mesh):
  """Runs `predict` over a whole split: {key: [N] array in record order},
  and the dataset info, with `evaluated` ([N] bool: the examples predicted;
  with data.on_error='skip' the bad ones are not) and `skipped` ({reason:
  examples skipped}, over every process)."""
  local_batch = sharding.per_process_batch_size(config.eval.batch_size, mesh)
  ds, info = task_pipeline.make_task_dataset(
      config, directory, config.task, split, batch_size=local_batch,
      train=False, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  n = info['num_examples']
  out, skipped = {}, {}
  evaluated = np.zeros(n, bool)
  for local in ds:
    stats = local.pop('stats')
    got = jax.device_get(predict(params, sharding.global_batch(local, mesh)))
    # Predictions are replicated; their rows follow the global batch, whose
    # example indices every process gathers the same way.
    index, valid = (np.asarray(multihost_gather(local[k], mesh))
                    for k in ('example_index', 'valid'))
    # The examples skipped (data.on_error='skip'), on every process.
    reasons = [k[len('skipped_'):] for k in stats if k.startswith('skipped_')]
    counts = np.asarray(multihost_gather(np.stack(
        [stats[f'skipped_{r}'] for r in reasons], -1), mesh)).sum(0)
    for r, c in zip(reasons, counts):
      skipped[r] = skipped.get(r, 0) + int(c)
    evaluated[index[valid]] = True
    for k, v in got.items():
      if k not in out:
        out[k] = np.zeros((n,) + v.shape[1:], v.dtype)
      out[k][index[valid]] = v[valid]
  info.update(evaluated=evaluated, skipped=skipped)
  return out, info


def multihost_gather(local, mesh):
  """A process-local batch column -> the global batch's, on every process."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def classification_results(config, directory, split, pred, info, out_dir):
  """Metrics (and the predictions file, when out_dir) of vqa, ve, nlvr2 and
  rec from predict_split's output, over the examples it evaluated (with
  data.on_error='skip', the good ones: eval_skips)."""
  task = config.task
  every = task_pipeline.read_task_examples(directory, task, split,
                                           config.data.on_error)
  kept = np.flatnonzero(info['evaluated'])
  skips = eval_skips(config, directory, split, len(kept), info['skipped'])
  examples = [every[i] for i in kept]
  assert all(ex is not None for ex in examples)  # Checked alike by both.
  results = {'num_examples': len(examples), **skips}
  if task == 'vqa':
    answers = [info['answer_vocab'][i] for i in pred['prediction']]
    results.update(vqa_metrics(examples, [answers[i] for i in kept]))
    if out_dir:  # task_metrics.write_vqa_results' JSON, local or gs://.
      write_vqa_results(epath.Path(out_dir) / f'vqa_{split}_results.json',
                        every, info['evaluated'], answers,
                        info['answer_vocab'])
    return results
  pred = {k: v[kept] for k, v in pred.items()}
  rows = []
  if task in ('ve', 'nlvr2'):
    names = tasks.VE_LABELS if task == 've' else (False, True)
    gold = [names.index(ex['label']) for ex in examples]
    correct = pred['prediction'] == np.asarray(gold)
    key = 'pair_id' if task == 've' else 'identifier'
    rows = [{key: ex[key], 'prediction': names[int(p)], 'label': ex['label']}
            for ex, p in zip(examples, pred['prediction'])]
  elif task == 'rec':
    correct = pred['iou'] >= task_pipeline.REC_IOU_THRESHOLD
    rows = [{'ref_id': ex['ref_id'], 'sent_id': ex['sent_id'],
             'box': [round(float(x), 5) for x in box],
             'iou': round(float(iou), 5), 'correct': bool(c)}
            for ex, box, iou, c in zip(examples, pred['box'], pred['iou'],
                                       correct)]
  results['accuracy'] = float(np.mean(correct))
  if out_dir:
    write_jsonl(epath.Path(out_dir) / f'{task}_{split}.jsonl', rows)
  return results


def vqa_metrics(examples, answers):
  """VQA accuracy (overall, by question and answer type) of the answers to
  the labelled examples, and num_labelled. A split without annotations
  (VQA test-dev) has no accuracy: the keys are absent, not 0."""
  labelled = [i for i, ex in enumerate(examples) if ex['answers']]
  results = {'num_labelled': len(labelled)}
  if labelled:
    acc = task_metrics.vqa_accuracies(
        [answers[i] for i in labelled],
        [examples[i]['answers'] for i in labelled])
    results['vqa_accuracy'] = float(np.mean(acc))
    for field in ('question_type', 'answer_type'):
      results[f'vqa_accuracy_by_{field}'] = task_metrics.accuracy_by_type(
          acc, [examples[i][field] for i in labelled])
  return results


def write_vqa_results(path, examples, evaluated, answers, vocab):
  """The evaluation server's results file of a split: every question of it
  (the server refuses a file that lacks one). A question evaluation skipped
  (data.on_error='skip': its image is bad) gets the most frequent training
  answer, vocab[0], and is logged; an undecodable record has no question
  id to answer."""
  filled = [i for i, ex in enumerate(examples)
            if ex is not None and not evaluated[i]]
  answers = [a if evaluated[i] else vocab[0] for i, a in enumerate(answers)]
  if filled:
    log(f'{path}: {len(filled)} skipped questions answered '
        f'{vocab[0]!r} (the most frequent training answer).')
  ids = [i for i, ex in enumerate(examples) if ex is not None]
  storage.write_text_atomic(path, json.dumps(task_metrics.vqa_results_json(
      [examples[i]['question_id'] for i in ids], [answers[i] for i in ids])))


def eval_skips(config, directory, split, num_evaluated, skipped):
  """What an evaluation skipped (data.on_error='skip'): {num_skipped,
  skipped: {reason: count}} for the split's results (eval.json). Skipped
  examples are left out of the metric, so its denominator is the
  num_evaluated good ones; more than data.max_skip_fraction of them
  (pipeline.check_skip_limit, as for training) raises, naming the split
  file."""
  skipped = {r: c for r, c in skipped.items() if c}
  if skipped:
    path = tasks.task_path(directory, config.task, split)
    stats = dict(examples=num_evaluated,
                 **{f'skipped_{r}': c for r, c in skipped.items()})
    log(f'{path}: {pipeline.skip_report(stats)} Left out of the metrics.')
    pipeline.check_skip_limit(stats, config, where=path)
  return dict(num_skipped=sum(skipped.values()), skipped=skipped)


def write_jsonl(path, rows):
  storage.write_text_atomic(path, ''.join(json.dumps(row) + '\n'
                                         for row in rows))


# -------------------------------------------------------------- retrieval

def retrieval_inputs(config, directory, split):
  """The split's images and captions, encoded once: (captions, images,
  caption_image [Nc], image_ids [Ni], skipped {reason: count}). captions:
  input_ids, text_mask [Nc, T]; images: region_feats [Ni, R, F] (pixels:
  images [Ni, S, S, 3]), region_boxes, region_mask. With
  data.on_error='skip' a bad example (and its captions) is left out and
  counted in `skipped` (task_pipeline.load_split)."""
  items, skipped = task_pipeline.load_split(config, directory, 'retrieval',
                                            split)
  shapes = task_pipeline.task_shapes(config)
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  text, caption_image, images = [], [], []
  for i, item in enumerate(items):
    for caption in item['example']['captions']:
      ids, mask, _ = task_pipeline.encode_text(caption, tokenizer,
                                               shapes.max_text_len)
      text.append((ids, mask))
      caption_image.append(i)
    images.append(task_pipeline.encode_regions(item['images'][0], shapes)[0])
  captions = dict(input_ids=np.stack([t[0] for t in text]),
                  text_mask=np.stack([t[1] for t in text]))
  image_arrays = {k: np.stack([im[k] for im in images]) for k in images[0]}
  return (captions, image_arrays, np.asarray(caption_image),
          [item['example']['image_id'] for item in items], skipped)


def _replicated(x, mesh):
  """A host array, identical on every process -> a replicated jax.Array."""
  s = sharding.replicated(mesh)
  return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


def retrieval_scores(model, params, config, captions, images, mesh):
  """Text-to-image scores [Nc, Ni] and image-to-text scores [Ni, Nc].

  Every caption and image goes through UMSE once. With ITC (finetune.itc
  > 0 and rerank_k > 0) each query's top rerank_k candidates by ITC
  similarity get their ITM log-probability (ALBEF), plus ITC's logit
  sim / tau when finetune.rerank_score='itm_and_itc', and the rest -inf;
  otherwise every pair is scored by ITM. Returns (t2i, i2t, pairs scored,
  the ITC similarities [Nc, Ni] that chose the candidates, or None).
  """
  bs = config.eval.batch_size
  rep = sharding.replicated(mesh)
  embed_text = jax.jit(lambda p, b: model.apply(
      {'params': p}, b, method='embed_text'), out_shardings=rep)
  embed_regions = jax.jit(lambda p, b: model.apply(
      {'params': p}, b, method='embed_regions'), out_shardings=rep)

  def embed(fn, arrays):
    parts = [np.asarray(jax.device_get(fn(params, b)))[:real]
             for b, real in sharding.padded_global_batches(arrays, bs, mesh)]
    return np.concatenate(parts)

  text_unit = embed(embed_text, captions)  # [Nc, T, D]
  region_unit = embed(embed_regions, images)  # [Ni, R, D]
  nc, ni = len(text_unit), len(region_unit)
  k = config.finetune.rerank_k
  sim = None
  if config.finetune.itc > 0 and k > 0:
    # The model's own ITC embeddings (CMAL.itc_embeddings), from the caches.
    text_vec, image_vec = map(np.asarray, itc_features(
        text_unit, region_unit, images['region_mask']))
    sim = text_vec @ image_vec.T  # [Nc, Ni]
    t2i_top = np.argsort(-sim, axis=1)[:, :min(k, ni)]
    i2t_top = np.argsort(-sim.T, axis=1)[:, :min(k, nc)]
    pairs = {(c, i) for c, row in enumerate(t2i_top) for i in row}
    pairs |= {(c, i) for i, row in enumerate(i2t_top) for c in row}
    pairs = np.asarray(sorted(pairs), np.int32)
  else:
    pairs = np.stack(np.meshgrid(np.arange(nc), np.arange(ni),
                                 indexing='ij'), -1).reshape(-1, 2)
    pairs = pairs.astype(np.int32)

  # What fusing a pair reads: the UMSE outputs, the text and the region
  # slots (not the features or pixels they were embedded from).
  cached = {'text_unit': text_unit, 'region_unit': region_unit, **captions,
            'region_boxes': images['region_boxes'],
            'region_mask': images['region_mask']}
  cached = {k: _replicated(v, mesh) for k, v in cached.items()}

  def score(p, c, idx):
    cap, img = idx[:, 0], idx[:, 1]
    inputs = {k: c[k][cap] for k in ('input_ids', 'text_mask')}
    inputs.update({k: c[k][img] for k in ('region_boxes', 'region_mask')})
    return model.apply({'params': p}, c['text_unit'][cap],
                       c['region_unit'][img], inputs, method='itm_log_prob')

  score = jax.jit(score, out_shardings=rep)
  values = np.concatenate([
      np.asarray(jax.device_get(score(params, cached, b['pair'])))[:real]
      for b, real in sharding.padded_global_batches({'pair': pairs}, bs, mesh)])
  if sim is not None and config.finetune.rerank_score == 'itm_and_itc':
    log_scale = jax.device_get(nn.meta.unbox(params)['itc_log_scale'])
    values = values + np.asarray(objectives.itc_logits(
        sim[pairs[:, 0], pairs[:, 1]], log_scale))
  t2i = np.full((nc, ni), -np.inf, np.float32)
  t2i[pairs[:, 0], pairs[:, 1]] = values
  return t2i, t2i.T.copy(), len(pairs), sim


def retrieval_recalls(t2i, i2t, caption_image):
  """Recall@1/5/10 both ways and their mean (mean_recall), from t2i scores
  [Nc, Ni], i2t scores [Ni, Nc] and each caption's image caption_image
  [Nc] (an image's gold captions are those pointing at it)."""
  image_captions = [np.flatnonzero(caption_image == i)
                    for i in range(t2i.shape[1])]
  results = {f't2i_{k}': v for k, v in task_metrics.recall_at_k(
      t2i, caption_image).items()}
  results.update({f'i2t_{k}': v for k, v in task_metrics.recall_at_k(
      i2t, image_captions).items()})
  results['mean_recall'] = float(np.mean(list(results.values())))
  return results


def retrieval_results(model, params, config, directory, split, mesh,
                      out_dir):
  """Recall@1/5/10 both ways, their mean, and (when out_dir) the top-10
  of every query in predictions/retrieval_{split}.json. With ITC's
  candidates, the same recalls of the ITC ranking alone (ITC_PREFIX): what
  re-ranking by ITM added or took away."""
  t0 = time.time()
  captions, images, caption_image, image_ids, skipped = retrieval_inputs(
      config, directory, split)
  skips = eval_skips(config, directory, split, len(image_ids), skipped)
  t2i, i2t, num_pairs, sim = retrieval_scores(model, params, config,
                                              captions, images, mesh)
  results = retrieval_recalls(t2i, i2t, caption_image)
  if sim is not None:
    results.update({ITC_PREFIX + k: v for k, v in retrieval_recalls(
        sim, sim.T, caption_image).items()})
  results.update(num_images=len(image_ids), num_captions=len(caption_image),
                 **skips, pairs_scored=num_pairs, seconds=time.time() - t0)
  if out_dir:
    top = lambda s: np.argsort(-s, axis=1, kind='stable')[:, :10]
    storage.write_text_atomic(
        epath.Path(out_dir) / f'retrieval_{split}.json', json.dumps({
            'images': image_ids,
            'caption_image': caption_image.tolist(),
            't2i_top10': top(t2i).tolist(),  # Image indices per caption.
            'i2t_top10': top(i2t).tolist(),  # Caption indices per image.
        }))
  return results


# --------------------------------------------------------------------- job

def evaluate_split(model, params, config, directory, split, mesh, predict,
                   out_dir=None):
  """The task metrics of `params` on one split (predictions written to
  out_dir when given)."""
  if config.task == 'retrieval':
    return retrieval_results(model, params, config, directory, split, mesh,
                             out_dir)
  pred, info = predict_split(predict, params, config, directory, split, mesh)
  return classification_results(config, directory, split, pred, info, out_dir)


def metric_fields(results, metric):
  """The entries of a split's results that are `metric` or its breakdowns
  ({metric}_by_question_type, ...)."""
  return {k: v for k, v in results.items()
          if k == metric or k.startswith(metric + '_by_')}


def shuffled_metrics(model, params, config, directory, split, mesh,
                     predict_shuffled):
  """The split's metric and its breakdowns with each example scored on
  another example's image (controls.images_shuffled), named with the
  SHUFFLED suffix."""
  control = evaluate_split(model, params, config, directory, split, mesh,
                           predict_shuffled)
  return {k + SHUFFLED: v for k, v in metric_fields(
      control, config.eval.best_metric).items()}


def add_controls(results, model, params, config, directory, mesh,
                 predict_shuffled):
  """Puts the controls beside each labelled split's metric in `results`
  ({split: metrics}, updated in place): the blind baseline
  (world/task_baselines.py: priors from the train split, read once for all
  the splits), and for IMAGES_SHUFFLED_TASKS shuffled_metrics. A split
  without labels (VQA test-dev) gets neither; retrieval no blind baseline
  (a random ranking's mean recall is ~16 / (3N))."""
  labelled = [s for s, r in results.items() if config.eval.best_metric in r]
  if config.task == 'retrieval' or not labelled:
    return
  blind = task_baselines.blind_baseline_of(
      directory, config.task, labelled, config.data.on_error,
      reads_pixels(config))
  for split in labelled:
    results[split]['blind_baseline'] = blind[split]
    if config.task in IMAGES_SHUFFLED_TASKS:
      results[split].update(shuffled_metrics(
          model, params, config, directory, split, mesh, predict_shuffled))


def load_init_params(config):
  """The pre-trained parameters named in config.init_from, or None."""
  if not config.init_from:
    return None
  params, where = checkpoint.load_pretrained_params(
      config.init_from, config.init_step or None)
  check_visual_input(params, config, where)
  return params, where


def check_visual_input(pretrained, config, where):
  """A checkpoint pre-trained on pixels (it has the backbone) only starts a
  model that reads pixels, and one of region features only a region model:
  their vision encoders read different features, even at the same width."""
  had = 'pixels' if PIXEL_PARAMS in pretrained else 'regions'
  wants = 'pixels' if reads_pixels(config) else 'regions'
  if had != wants:
    raise ValueError(
        f'init_from: {where} was pre-trained on {had} and this config reads '
        f'{wants} (config.model.visual.input={wants!r}); set '
        f"--config.model.visual.input={had!r} or start from a {wants} "
        'checkpoint.')


def check_vqa_eval_split_labelled(config, directory, split):
  """The eval split picks the best checkpoint by its VQA accuracy, which a
  split without annotations (converted without --annotations: VQA
  test-dev) has not: ValueError before training. Such a split is a test
  split, which gets its results file and no accuracy."""
  examples = task_pipeline.read_task_examples(directory, 'vqa', split,
                                              config.data.on_error)
  if not any(ex is not None and ex['answers'] for ex in examples):
    raise ValueError(
        f'{tasks.task_path(directory, "vqa", split)} has no answers (no '
        f'--annotations), so data.eval_split={split!r} cannot pick the best '
        'checkpoint: evaluate on a labelled split and list this one in '
        f'--config.finetune.test_splits.')


def make_job(config, workdir, mesh, axis_rules, local_batch):
  """The train_step.Job of a fine-tuning config."""
  directory = synthetic.data_dir(config, workdir)
  if not config.data.dir:
    ensure_task_data(config, directory,
                     every_process=storage.is_remote(workdir))
  train_ds, info = task_pipeline.make_task_dataset(
      config, directory, config.task, config.data.train_split,
      batch_size=local_batch, train=True, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if info['prior_only']:
    log(info['prior_only'])
  model = task_model(config, len(info.get('answer_vocab', ())))
  _, val_split, test_splits = splits_of(config)
  for split in (val_split,) + test_splits:  # Fail now, not after training.
    task_pipeline.task_file(directory, config.task, split)
  if config.task == 'vqa':
    check_vqa_eval_split_labelled(config, directory, val_split)
  predict = predict_shuffled = None
  if config.task != 'retrieval':
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      predict = jax.jit(make_predict_step(model, config),
                        out_shardings=sharding.replicated(mesh))
      if config.task in IMAGES_SHUFFLED_TASKS:
        predict_shuffled = jax.jit(
            make_predict_step(model, config, controls.images_shuffled),
            out_shardings=sharding.replicated(mesh))

  def evaluate(params, final):
    del final  # Every evaluation sees the whole eval split.
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      return evaluate_split(model, params, config, directory, val_split,
                            mesh, predict)

  def finish(best_params, best_step):
    """The best checkpoint on the eval split and every test split, with
    predictions files, each metric beside its controls (add_controls)."""
    out_dir = epath.Path(workdir) / PREDICTIONS_DIR  # Local or gs://.
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
    splits = (val_split,) + test_splits
    by_split = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      for split in splits:
        by_split[split] = evaluate_split(
            model, best_params, config, directory, split, mesh, predict,
            out_dir if jax.process_index() == 0 else None)
      add_controls(by_split, model, best_params, config, directory, mesh,
                   predict_shuffled)
    for split in splits:
      log(f'{split}: ' + json.dumps(
          {k: v for k, v in by_split[split].items()
           if not isinstance(v, dict)}))
    return dict(task=config.task, best_metric=config.eval.best_metric,
                best_step=best_step, **by_split)

  def initial_params(params):
    loaded = load_init_params(config)
    if loaded is None:
      log('init_from is empty: every parameter starts from random init.')
      return params
    pretrained, where = loaded
    names = pretrained_param_names(config.task,
                                   reads_pixels(config))
    merged, taken = checkpoint.merge_pretrained(
        jax.device_get(params), pretrained, names, source=where)
    log(f'init_from {where}: {taken} parameter arrays ({", ".join(names)}); '
        'the task head starts from random init.')
    return merged

  return train_step.Job(
      model=model, train_ds=train_ds, epoch_size=info['num_examples'],
      stat_keys=task_pipeline.stat_keys(config.task, config),
      init_inputs=lambda rng: init_inputs(config),
      loss=make_loss(model, config), evaluate=evaluate, finish=finish,
      initial_params=initial_params, directory=directory)
