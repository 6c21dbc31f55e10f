"""The one-hour baseline (issue 26): what a practitioner writes first for a
task without pre-training, trained on the task's train split with
fine-tuning's data, batch and step budget. The bar: random-init CMAL should
come near it, pre-trained CMAL should beat it.

  python -m cmal_jax.experiments.one_hour_baseline --task=vqa --size=small \\
      --seeds=0,1,2 --out=runs/baseline [--visual=regions|pixels] [--steps=N]

The model (one_hour_model.py): bag-of-words text, an MLP over each region's
features and box (--visual=pixels: a 2-layer CNN, pooled over each box),
text-conditioned attention pooling, an MLP over [text, image, text * image]
and the task's head; retrieval is a dual encoder with an in-batch
contrastive loss.

What it shares with `python -m cmal_jax.main
--config=configs/finetune.py:TASK,SIZE` (--visual=pixels: with
--config.model.visual.input=pixels):
  data     seed s reads the synthetic splits that fine-tuning with
           --config.seed=s generates (finetune.ensure_task_data, into
           OUT/data/{task}-{size}-s{seed}[-pixels]); --data_dir reads a
           folder you have (every seed the same), as --config.data.dir does.
           Batches come from task_pipeline.make_task_dataset (VQA's answer
           vocabulary from load_or_build_answer_vocab).
  budget   the config's batch_size and total_steps (--steps overrides) and
           its optimizer (train_step.make_optimizer: AdamW, warm-up then
           cosine decay, gradient clipping) at optim.lr (--lr overrides).
  losses   finetune.task_loss (vqa soft-score BCE, ve and nlvr2 cross-
           entropy, rec softmax over the regions); retrieval
           objectives.itc_loss.
  metrics  finetune.evaluate_split (vqa, ve, nlvr2, rec); retrieval:
           finetune.retrieval_inputs and retrieval_recalls, every pair
           ranked by cosine similarity (fine-tuning's ranking with
           finetune.itc=0, the dual encoder's score in place of ITM).
  choice   the eval split every eval.every_steps steps and at the end; the
           parameters best by eval.best_metric are evaluated on the test
           splits. Nothing is chosen on test.

Writes OUT/{task}_{visual}_s{seed}.json ({val: {...}, test: {...}} with
eval.json's metric names, best_step, val_curve ([step, val metric] at each
evaluation: python -m cmal_jax.report --curves plots it), blind_baseline
per split (world/task_baselines.py: the score of a model that never sees
the image), and what ran) and prints a line with the mean ± std (sample
std) over seeds.
"""

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

from cmal_jax import (cli_errors, config_base, configlib, finetune,
                      objectives, sharding, storage, train_step)
from cmal_jax.data import pipeline, task_pipeline, tasks
from cmal_jax.experiments.grid_report import mean_std
from cmal_jax.experiments.one_hour_model import OneHourBaseline
from cmal_jax.logs import log
from cmal_jax.model.pixels import reads_pixels
from cmal_jax.world import task_baselines

VISUALS = configlib.VISUAL_INPUTS  # ('regions', 'pixels').


# ------------------------------------------------------------------ config

def baseline_config(task, size, visual='regions', seed=0, steps=0, lr=0.0,
                    data_dir=''):
  """configs/finetune.py:TASK,SIZE as fine-tuning runs it with
  --config.seed=seed, model.visual.input=visual and data.dir=data_dir;
  steps / lr > 0 override total_steps / optim.lr."""
  if visual not in VISUALS:
    raise ValueError(f'visual={visual!r}: one of {VISUALS}')
  c = config_base.config_module('finetune').get_config(f'{task},{size}')
  c.seed = seed
  c.model.visual.input = visual
  c.data.dir = data_dir
  if steps:
    c.total_steps = steps
  if lr:
    c.optim.lr = lr
  if task == 'retrieval':
    # Every row its image's own caption: the dual encoder has no ITM head
    # for negatives to train, and the other rows of the batch are the
    # contrastive loss's negatives anyway. The splits and batches are
    # otherwise fine-tuning's.
    c.data.itm_neg_prob = 0.0
  configlib.validate(c)
  return c


def data_folder(out, config):
  """OUT/data/{task}-{size}-s{seed}[-pixels]: one folder per generated
  world, so sizes, seeds and the pixel data (it holds images) never share
  one (a folder is only ever completed, not checked against the config)."""
  kind = '-pixels' if reads_pixels(config) else ''
  return os.path.join(out, 'data',
                      f'{config.task}-{config.size}-s{config.seed}{kind}')


def prepare_data(config, out):
  """The task folder of `config`: data.dir as it is, else the synthetic
  world's splits of config.seed generated into data_folder(out, config).
  Every split is checked to exist (and VQA's eval split to have answers)
  before any training, as fine-tuning does."""
  directory = config.data.dir or data_folder(out, config)
  if not config.data.dir:
    finetune.ensure_task_data(config, directory)
  _, val_split, test_splits = finetune.splits_of(config)
  for split in (config.data.train_split, val_split) + test_splits:
    task_pipeline.task_file(directory, config.task, split)
  if config.task == 'vqa':
    finetune.check_vqa_eval_split_labelled(config, directory, val_split)
  return directory


# ------------------------------------------------------------------- model

def make_model(config, num_answers=0):
  """The baseline of config.task at config.model.hidden_dim (D)."""
  v = config.model.visual
  return OneHourBaseline(
      task=config.task, vocab_size=config.model.vocab_size,
      dim=config.model.hidden_dim, pixels=reads_pixels(config),
      num_outputs=num_answers, roi_size=v.roi_size,
      sampling_ratio=v.sampling_ratio)


def init_params(model, config):
  """Random parameters from config.seed (on fine-tuning's init inputs)."""
  return model.init(jax.random.key(config.seed),
                    finetune.init_inputs(config))['params']


def count_params(params):
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------- training

def baseline_loss(outputs, batch, config):
  """(loss, metrics): fine-tuning's task loss, or for retrieval InfoNCE both
  ways over the batch's matched pairs."""
  if config.task != 'retrieval':
    return finetune.task_loss(outputs, batch, config)
  loss, acc = objectives.itc_loss(
      outputs['itc_text'], outputs['itc_image'], outputs['itc_log_scale'],
      batch['itm_label'] == 1)
  return loss, {'loss': loss, 'loss_itc': loss, 'acc_itc': acc}


def make_train_step(model, config, tx):
  """(params, opt_state, batch) -> (params, opt_state, metrics), jitted.
  batch: a task batch without 'stats' (finetune.model_inputs picks what
  the model reads; the loss reads its targets)."""
  def loss_fn(params, batch):
    outputs = model.apply({'params': params},
                          finetune.model_inputs(batch, config.task))
    return baseline_loss(outputs, batch, config)

  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def without_stats(batch):
  """A pipeline batch minus its per-example counters (host-side only)."""
  return {k: v for k, v in batch.items() if k != 'stats'}


# --------------------------------------------------------------- evaluation

def make_evaluate(model, config, directory, mesh):
  """evaluate(params, split) -> the split's results, named as in
  fine-tuning's eval.json. Jitted once, reused by every evaluation."""
  if config.task != 'retrieval':
    predict = jax.jit(finetune.make_predict_step(model, config))
    return lambda params, split: finetune.evaluate_split(
        model, params, config, directory, split, mesh, predict)

  embed = {method: jax.jit(lambda p, b, method=method: model.apply(
      {'params': p}, b, method=method)) for method in ('itc_text', 'itc_image')}

  def embed_all(method, params, arrays):
    """{k: [N, ...]} -> [N, D], in batches of eval.batch_size."""
    return np.concatenate([
        np.asarray(jax.device_get(embed[method](params, b)))[:real]
        for b, real in sharding.padded_global_batches(
            arrays, config.eval.batch_size, mesh)])

  def evaluate(params, split):
    captions, images, caption_image, image_ids, skipped = (
        finetune.retrieval_inputs(config, directory, split))
    skips = finetune.eval_skips(config, directory, split, len(image_ids),
                                skipped)
    t2i = embed_all('itc_text', params, captions) @ embed_all(
        'itc_image', params, images).T  # [Nc, Ni] cosine similarities.
    results = finetune.retrieval_recalls(t2i, t2i.T, caption_image)
    results.update(num_images=len(image_ids), num_captions=len(t2i),
                   **skips, pairs_scored=int(t2i.size))
    return results

  return evaluate


def train_line(step, total_steps, lr, logged):
  """One log line: the step, the lr of its update and the mean of each
  metric over `logged` (the train steps' metrics since the last line)."""
  logged = jax.device_get(logged)
  mean = {k: float(np.mean([m[k] for m in logged])) for k in logged[0]}
  return (f'step {step}/{total_steps} lr={float(lr):.2e} '
          + ' '.join(f'{k}={v:.3f}' for k, v in sorted(mean.items())))


def headline(results):
  """The results without their breakdowns (per question type, skips by
  reason), for a log line."""
  return {k: round(v, 4) if isinstance(v, float) else v
          for k, v in results.items() if not isinstance(v, dict)}


# --------------------------------------------------------------------- run

def train_and_evaluate(config, directory):
  """Trains the baseline on the train split and evaluates it (module
  docstring, "choice"). Returns {task, visual, best_metric, best_step,
  num_params, val split: results, each test split: results}."""
  t0 = time.time()
  mesh = sharding.mesh_from_config(config)
  train_ds, info = task_pipeline.make_task_dataset(
      config, directory, config.task, config.data.train_split,
      batch_size=config.batch_size, train=True, seed=config.seed)
  if info['prior_only']:
    log(info['prior_only'])
  model = make_model(config, len(info.get('answer_vocab', ())))
  params = init_params(model, config)
  tx, schedule = train_step.make_optimizer(config)
  opt_state = tx.init(params)
  step_fn = make_train_step(model, config, tx)
  evaluate = make_evaluate(model, config, directory, mesh)
  _, val_split, test_splits = finetune.splits_of(config)
  metric = config.eval.best_metric
  log(f'one_hour_baseline {config.task} ({config.model.visual.input}, '
      f'{config.size}, seed {config.seed}): {count_params(params):,} '
      f'parameters, {config.total_steps} steps of {config.batch_size}, '
      f'data {directory}')

  best = dict(value=None, step=0, params=None, results=None)
  curve = []  # [step, val metric] at each evaluation: the learning curve.
  batches, logged = pipeline.to_iterator(train_ds, config), []
  for step in range(1, config.total_steps + 1):
    params, opt_state, metrics = step_fn(params, opt_state,
                                         without_stats(next(batches)))
    logged.append(metrics)
    if step % config.log_every == 0 or step == config.total_steps:
      log(train_line(step, config.total_steps, schedule(step - 1), logged))
      logged = []
    every = config.eval.every_steps
    if (every and step % every == 0) or step == config.total_steps:
      results = evaluate(params, val_split)
      log(f'step {step} {val_split}: {headline(results)}')
      curve.append([step, results[metric]])
      # Strictly better replaces, as fine-tuning's BestCheckpoint. A host
      # copy: the next step donates the device buffers.
      if best['value'] is None or results[metric] > best['value']:
        best.update(value=results[metric], step=step, results=results,
                    params=jax.tree.map(np.array, params))

  out = dict(task=config.task, visual=config.model.visual.input,
             best_metric=metric, best_step=best['step'],
             num_params=count_params(params), val_split=val_split,
             test_splits=list(test_splits), val_curve=curve,
             **{val_split: best['results']})
  best_params = jax.device_put(best['params'])
  for split in test_splits:
    out[split] = evaluate(best_params, split)
    log(f'best step {best["step"]} {split}: {headline(out[split])}')
  # Beside each split's metric, what a model that never sees the image
  # scores there (the bar the image must raise).
  out['blind_baseline'] = task_baselines.blind_baseline_of(
      directory, config.task, (val_split,) + tuple(test_splits),
      config.data.on_error, reads_pixels(config))
  out['seconds'] = round(time.time() - t0, 1)
  return out


def result_path(out, task, visual, seed):
  return os.path.join(out, f'{task}_{visual}_s{seed}.json')


def run_seed(args, seed):
  """One seed: its config, data, training and evaluation; writes and
  returns its result (the JSON of result_path)."""
  config = baseline_config(args.task, args.size, args.visual, seed,
                           args.steps, args.lr, args.data_dir)
  directory = prepare_data(config, args.out)
  os.makedirs(args.out, exist_ok=True)
  results = train_and_evaluate(config, directory)
  results.update(size=config.size, seed=seed, steps=config.total_steps,
                 batch_size=config.batch_size, lr=config.optim.lr,
                 data_dir=os.path.abspath(directory))
  path = result_path(args.out, args.task, args.visual, seed)
  storage.write_text_atomic(path, json.dumps(results, indent=1))
  log(f'Wrote {path}')
  return results


def summary_line(results):
  """One line: each evaluated split's best_metric, mean ± std over the
  seeds' results."""
  first = results[0]
  metric, splits = first['best_metric'], [first['val_split']] + first[
      'test_splits']
  parts = []
  for split in splits:
    m, s = mean_std([r[split][metric] for r in results])
    b, _ = mean_std([r['blind_baseline'][split] for r in results])
    parts.append(f'{split} {metric} {m:.3f} ± {s:.3f} (blind {b:.3f})')
  seeds = ','.join(str(r['seed']) for r in results)
  return (f'one_hour_baseline {first["task"]} ({first["visual"]}, '
          f'{first["size"]}, {first["steps"]} steps of '
          f'{first["batch_size"]}, seeds {seeds}): ' + ', '.join(parts))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--task', required=True, choices=tasks.TASKS)
  ap.add_argument('--size', default='small', choices=sorted(config_base.SIZES),
                  help="The fine-tuning config's size (data, batch, steps).")
  ap.add_argument('--seeds', default='0',
                  help='Comma-separated seeds, e.g. 0,1,2.')
  ap.add_argument('--out', required=True,
                  help='Where the per-seed JSON files (and data/) go.')
  ap.add_argument('--visual', default='regions', choices=VISUALS,
                  help='Region features, or pixels through a small CNN.')
  ap.add_argument('--steps', type=int, default=0,
                  help="Training steps (0: the fine-tuning config's).")
  ap.add_argument('--lr', type=float, default=0.0,
                  help="Peak learning rate (0: the fine-tuning config's).")
  ap.add_argument('--data_dir', default='',
                  help='A task folder to read instead of generating the '
                  "synthetic world's (as --config.data.dir).")
  cli_errors.add_verbose_flag(ap)
  args = ap.parse_args(argv)
  try:
    args.seeds = tuple(int(s) for s in args.seeds.split(',') if s.strip())
  except ValueError:
    ap.error(f'--seeds={args.seeds!r}: comma-separated integers, e.g. 0,1,2')
  if not args.seeds:
    ap.error('--seeds: give at least one seed')
  if args.steps < 0:
    ap.error(f'--steps={args.steps}: must be >= 1 (0: the config\'s)')
  if args.lr < 0:
    ap.error(f'--lr={args.lr}: must be > 0 (0: the config\'s)')
  if args.data_dir and not os.path.isdir(args.data_dir):
    ap.error(f'--data_dir={args.data_dir!r}: no such folder')
  return args


def main(argv=None):
  args = parse_args(argv)
  results = [run_seed(args, seed) for seed in args.seeds]
  log(summary_line(results))
  return results


if __name__ == '__main__':
  cli_errors.run_tool('one_hour_baseline', main)
