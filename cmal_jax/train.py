"""The training loop, top to bottom, for pre-training and fine-tuning:

  1. setup: config check, mesh, the job (data generated if missing, model,
     loss, evaluation: pretrain_job here, finetune.make_job for the tasks)
  2. optimizer and a sharded train state (fine-tuning: init_from merged in)
  3. resume from the workdir's latest checkpoint
  4. the jitted train step
  5. the loop: step, log, evaluate, checkpoint
  6. final evaluation -> workdir/eval.json (fine-tuning: the best checkpoint
     on the eval split and every test split, with predictions files)
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils

from cmal_jax import (checkpoint, configlib, evaluate, guards, objectives,
                      semmim, sharding)
from cmal_jax.data import pipeline, tfds_source
from cmal_jax.world import synthetic
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.guards import log
from cmal_jax.metrics import MetricWriter
from cmal_jax.model.cmal import CMAL, ModelConfig, pretrained_param_names


# ----------------------------------------------------------------- 1. setup

# ------------------------------------------------ 2. model, optimizer, state

class TrainState(train_state.TrainState):
  """Flax's TrainState plus the data counters (pipeline.STAT_KEYS), which
  live in the checkpoint so a resumed run keeps counting from where it was,
  the number of updates skipped because they were not finite, and (SemMIM)
  the momentum encoder's parameters: an EMA of `params`, never
  differentiated (None when the recipe has no target encoder)."""
  data_stats: dict
  nonfinite_skips: jax.Array
  ema_params: Any = None


def decay_mask(params):
  """AdamW decays kernels and embeddings, not biases, LayerNorm, scales,
  the [MASK] vectors or SemMIM's prototypes (used normalised)."""
  def decays(path, _):
    name = [k.key for k in path if isinstance(getattr(k, 'key', None), str)][-1]
    return not name.endswith(('bias', 'scale', 'mask_vector', 'mask_token',
                              'prototypes'))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config):
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, int(o.warmup_fraction * config.total_steps),
      config.total_steps,
      end_value=o.lr * o.end_lr_fraction)
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                  mask=decay_mask))
  # Fine-tuning: gentler steps on what init_from loaded. Always chained (an
  # empty mask when nothing was loaded), so the optimizer state keeps one
  # structure and a run resumes whatever the multiplier.
  slow, mult = pretrained_lr(config)
  tx = optax.chain(tx, optax.masked(
      optax.scale(mult),
      lambda params: {k: jax.tree.map(lambda _: k in slow, v)
                      for k, v in params.items()}))
  return tx, schedule


def pretrained_lr(config):
  """(top-level parameter names, lr multiplier) of the parameters a
  fine-tuning run takes from init_from; ((), 1.0) when it loads none."""
  if not config.get('init_from'):
    return (), 1.0
  return (pretrained_param_names(config.task,
                                 configlib.reads_pixels(config)),
          config.finetune.pretrained_lr_mult)


def bert_params(config, params):
  """`params` with what config.init.bert's BERT folder initialises (the
  unified encoder and the embeddings it sees); unchanged when it is ''."""
  if not config.get('init', {}).get('bert'):
    return params
  from cmal_jax.export import bert
  params, taken = bert.init_params(jax.device_get(params), config.init.bert,
                                   config.model)
  log(f'init.bert {bert.resolve_path(config.init.bert)}: {taken} parameter '
      'arrays (unified encoder, slot and text embeddings, ITM pooler).')
  return params


def dummy_batch(config, batch_size):
  """Zeros with the pipeline's shapes, for init and shape inference."""
  shapes = pipeline.Shapes.from_config(config)
  T, R, K = shapes.max_text_len, shapes.max_regions, shapes.max_anchors
  z = lambda *s, dtype=jnp.int32: jnp.zeros((batch_size,) + s, dtype)
  batch = dict(input_ids=z(T), text_mask=z(T),
               region_boxes=z(R, 4, dtype=jnp.float32), region_tags=z(R),
               region_mask=z(R), anchor_text_pos=z(K), anchor_text_end=z(K),
               anchor_region=z(K), anchor_valid=z(K, dtype=bool),
               itm_label=z())
  batch.update(zero_visual_inputs(shapes, batch_size))
  return batch


def zero_visual_inputs(shapes, rows):
  """What the vision side reads, as zeros: images [rows, S, S, 3] uint8
  (model.visual.input='pixels') or region_feats [rows, R, F] float32."""
  if shapes.pixels:
    S = shapes.image_size
    return {'images': jnp.zeros((rows, S, S, 3), jnp.uint8)}
  return {'region_feats': jnp.zeros(
      (rows, shapes.max_regions, shapes.feature_dim), jnp.float32)}


def create_train_state(model, init_inputs, stat_keys, tx, config, mesh,
                       axis_rules, abstract_only=False):
  """Initialises the state directly in its shardings (no host copy).

  init_inputs(rng) -> the model's inputs for init; stat_keys: the data
  counters kept in the state. Returns (state, state_shardings); with
  abstract_only, the state as jax.ShapeDtypeStructs (compile_only).
  The momentum encoder (semmim.uses_target_encoder) starts as a copy of the
  parameters, sharded as they are.
  """
  def init(rng):
    params = model.init(rng, init_inputs(rng))['params']  # Boxed.
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=tx,
        data_stats={k: jnp.zeros((), jnp.int32) for k in stat_keys},
        nonfinite_skips=jnp.zeros((), jnp.int32),
        ema_params=params if semmim.uses_target_encoder(config) else None)
    # create() starts from a weak-typed step; a restored one is int32, and
    # the jitted step must see one type to reuse its compilation.
    return state.replace(step=jnp.zeros((), jnp.int32))

  rng = jax.random.key(config.seed)
  with nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_shardings(abstract, mesh, axis_rules)
    if abstract_only:  # Shapes, dtypes and shardings; nothing allocated.
      return jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          nn.unbox(abstract), shardings), shardings
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


# ----------------------------------------------------------- 4. train step

@dataclasses.dataclass(frozen=True)
class Loss:
  """A job's objectives, in the parts gradient accumulation and SemMIM need.

  prepare(batch, rng, state) -> batch: the corruption (CMAP's anchor
    actions, MLM masking; SemVLP's mode of the step; SemMIM's momentum
    encoder's targets and text-guided masks), applied to the whole batch so
    that accumulating micro-batches sees the same corruption as one batch.
    It is not differentiated; `state` is the TrainState (None outside a
    train step; only SemMIM needs it).
  loss(params, batch, rng, denominators) -> (loss, metrics): the model's
    losses on a (micro-)batch; rng is for dropout.
  denominators(batch) -> {name: scalar}: what each mean divides by, over
    the whole batch; losses and metrics are then sums over micro-batches.
  after_update(state) -> state: runs after each applied update (SemMIM's
    momentum-encoder update), inside the jitted step.
  """
  prepare: Callable
  loss: Callable
  denominators: Callable
  after_update: Callable = lambda state: state


def split_micro_batches(batch, num):
  """{k: [B, ...]} -> {k: [num, B / num, ...]}; micro-batch i holds rows
  i, i + num, ... so that each is spread over every batch shard (a shard's
  consecutive rows go to different micro-batches) and needs no transfer."""
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(
        x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def loss_and_grads(loss, params, batch, rng, num_micro=1, state=None):
  """Gradients and metrics of a Loss on `batch` -> (grads, metrics).

  num_micro > 1 sums the gradients of that many micro-batches (lax.scan,
  one micro-batch's activations live at a time): the same as one batch up
  to float rounding (the corruption is drawn once for the whole batch and
  the means divide by whole-batch counts), ITC's in-batch negatives and
  dropout's draws aside. state: what Loss.prepare reads (the TrainState).
  """
  prep_rng, dropout_rng = jax.random.split(rng)
  batch = loss.prepare(batch, prep_rng, state)
  denominators = loss.denominators(batch)
  value_and_grad = jax.value_and_grad(loss.loss, has_aux=True)
  if num_micro == 1:
    (_, metrics), grads = value_and_grad(params, batch, dropout_rng,
                                         denominators)
    return grads, metrics

  def accumulate(carry, micro):
    i, micro_batch = micro
    (_, metrics), grads = value_and_grad(
        params, micro_batch, jax.random.fold_in(dropout_rng, i), denominators)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  micro_batches = split_micro_batches(batch, num_micro)
  (_, metric_shapes), grad_shapes = jax.eval_shape(
      value_and_grad, params, jax.tree.map(lambda x: x[0], micro_batches),
      dropout_rng, denominators)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       (grad_shapes, metric_shapes))
  (grads, metrics), _ = jax.lax.scan(
      accumulate, zeros, (jnp.arange(num_micro), micro_batches))
  return grads, metrics


def make_train_step(loss, config, schedule):
  """The train step (state, batch) -> (state, metrics) of a Loss, with
  config.grad_accum_steps micro-batches (loss_and_grads)."""
  base_rng = jax.random.key(config.seed)

  def train_step(state, batch):
    batch = dict(batch)
    data_stats = {k: v + jnp.sum(batch['stats'][k])
                  for k, v in state.data_stats.items()}
    del batch['stats']
    # All randomness: the config seed folded with the step.
    rng = jax.random.fold_in(base_rng, state.step)
    grads, metrics = loss_and_grads(loss, state.params, batch, rng,
                                    config.grad_accum_steps, state)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = schedule(state.step)
    # A non-finite loss or gradient skips the update: parameters and
    # optimizer state stay as they were; the step and data still advance.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    metrics['update_skipped'] = ~finite
    skips = state.nonfinite_skips + (~finite).astype(jnp.int32)
    # lax.cond, not a select: only the taken branch runs, so a finite step
    # does not read the old and new state (3 x params) once more to choose
    # (6 % of a base step on CPU).
    state = jax.lax.cond(
        finite, lambda s: loss.after_update(s.apply_gradients(grads=grads)),
        lambda s: s.replace(step=s.step + 1), state)
    return state.replace(data_stats=data_stats, nonfinite_skips=skips), metrics

  return train_step


def jit_train_step(loss, config, schedule, state_shardings, mesh):
  """The jitted train step (state, batch) -> (state, metrics) with the
  state donated (updated in place) and the batch split over data x fsdp.
  Call it under jax.set_mesh(mesh) and the config's axis rules."""
  return jax.jit(
      make_train_step(loss, config, schedule),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)


# -------------------------------------------------------------------- jobs

@dataclasses.dataclass(frozen=True)
class Job:
  """What differs between pre-training and fine-tuning a task.

  init_inputs(rng) -> model inputs for init; loss: the objectives (a
  Loss); evaluate(params, final) -> flat results on the eval
  split; finish(best_params, best_step) -> extra final results (or None);
  initial_params(params) -> params before step 0 (init_from).
  """
  model: Any
  train_ds: Any  # A grain MapDataset of process-local batches.
  epoch_size: int  # Examples in one epoch of the train split.
  stat_keys: tuple  # batch['stats'] keys, summed into TrainState.data_stats.
  init_inputs: Callable
  loss: Loss
  evaluate: Callable
  directory: str
  finish: Callable | None = None
  initial_params: Callable = lambda params: params


def pretrain_objectives(model, config, specials):
  """(init_inputs(rng), Loss) of pre-training: objectives.prepare_inputs'
  corruption (SemMIM: semmim.prepare's), then the configured losses, in
  SemVLP's mode of the step (two_stream_step)."""
  with_target_encoder = semmim.uses_target_encoder(config)
  every = config.get('two_stream_every', 0)

  def prepare(batch, rng, state=None):
    if with_target_encoder:
      inputs, targets = semmim.prepare(model, config, specials, batch, rng,
                                       state)
    else:
      inputs, targets = objectives.prepare_inputs(batch, rng, config,
                                                  specials)
    prepared = dict(inputs=inputs, targets=targets)
    if every:  # Per row, so micro-batches split it like the rest.
      two = (jnp.bool_(config.model.two_stream) if state is None
             else two_stream_step(state.step, every))
      prepared['two_stream'] = jnp.full(batch['input_ids'].shape[:1], two)
    return prepared

  def loss_in_mode(two_stream):
    def loss(params, batch, rng, denominators):
      outputs = model.apply({'params': params}, batch['inputs'],
                            deterministic=False, rngs={'dropout': rng},
                            two_stream=two_stream)
      return objectives.compute_losses(outputs, batch['targets'], config,
                                       denominators)
    return loss

  def loss_fn(params, batch, rng, denominators):
    if not every:
      return loss_in_mode(None)(params, batch, rng, denominators)
    # One program holds both modes; lax.cond runs only the step's.
    loss, metrics = jax.lax.cond(batch['two_stream'][0], loss_in_mode(True),
                                 loss_in_mode(False), params, batch, rng,
                                 denominators)
    # The share of two-stream steps (a sum over micro-batches, like the
    # metrics, so divided by their number).
    metrics['two_stream'] = jnp.mean(batch['two_stream'].astype(
        jnp.float32)) / config.grad_accum_steps
    return loss, metrics

  def init_inputs(rng):
    inputs = objectives.prepare_inputs(dummy_batch(config, 1), rng, config,
                                       specials)[0]
    if with_target_encoder:  # Creates the patch mask token.
      inputs['patch_masked'] = jnp.zeros_like(inputs['region_mask'], bool)
    return inputs

  after_update = lambda state: state
  if with_target_encoder:
    after_update = lambda state: state.replace(ema_params=semmim.ema_update(
        state.ema_params, state.params, config.semmim.ema_momentum))
  return init_inputs, Loss(
      prepare=prepare, loss=loss_fn,
      denominators=lambda batch: objectives.loss_denominators(
          batch['targets'], config), after_update=after_update)


def two_stream_step(step, every):
  """SemVLP's schedule: whether `step` (0-based) runs two-stream. Of each
  `every` steps the last does (every=2: single, two, single, ...)."""
  return step % every == every - 1


def pretrain_job(config, workdir, mesh, axis_rules, local_batch):
  """The Job of a pre-training config: CMAP, AMC, MLM, ITM, MRC, ITC."""
  directory = synthetic.data_dir(config, workdir)
  # data.source='tfds:...' reads a TFDS dataset (tfds_source.py), not
  # `directory`'s records: no synthetic world then.
  tfds_spec = tfds_source.source_spec(config)
  if not config.data.dir and tfds_spec is None:
    synthetic.ensure_world_data(config, directory,
                      every_process=guards.is_remote(workdir))
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f'config.model.vocab_size={config.model.vocab_size} does not match '
        f'the vocabulary {tokenizer.vocab_path} ({tokenizer.vocab_size}).')
  specials = objectives.SpecialTokens.from_tokenizer(tokenizer)
  eval_local = sharding.per_process_batch_size(config.eval.batch_size, mesh)
  for field, rows in (('batch_size', local_batch),
                      ('eval.batch_size', eval_local)):
    if rows % config.data.itm_group:
      raise ValueError(
          f'config.data.itm_group={config.data.itm_group} must divide the '
          f'per-process batch of config.{field} ({rows} rows over '
          f'{jax.process_count()} process(es)): ITM negatives are drawn '
          'within groups of that many rows.')
  train_ds, vocab, _ = pipeline.make_dataset(
      config, directory, config.data.train_split, batch_size=local_batch,
      train=True, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_source, eval_path, _ = tfds_source.open_pairs(
      config, directory, config.data.eval_split)
  num_eval = len(eval_source)
  if num_eval < config.eval.batch_size:  # Else evaluation would see nothing.
    raise ValueError(
        f'{eval_path} holds {num_eval} pairs, fewer than '
        f'config.eval.batch_size={config.eval.batch_size}: lower '
        'eval.batch_size or add pairs.')
  model = CMAL(ModelConfig.from_config(config.model,
                                       config.model.num_tags or vocab.num_tags))
  init_inputs, loss = pretrain_objectives(model, config, specials)

  def evaluate_now(params, final):
    return evaluate.evaluate_pretrain(
        model, params, config, directory, specials, mesh, axis_rules,
        retrieval=final or config.eval.best_metric.startswith('retrieval'))

  data_name = config.data.source if tfds_spec else directory
  log(f'Data {data_name} ({vocab.num_tags} tags).')
  return Job(model=model, train_ds=train_ds,
             epoch_size=len(tfds_source.open_pairs(
                 config, directory, config.data.train_split)[0]),
             stat_keys=pipeline.stat_keys(config), init_inputs=init_inputs,
             loss=loss, evaluate=evaluate_now, directory=data_name)


# ---------------------------------------------------------------- the run

# The share of skipped bad records is checked at log intervals once this many
# examples were read (earlier, a cluster of bad records looks like a flood),
# and always at the end.
MIN_EXAMPLES_FOR_SKIP_CHECK = 1000


def train_and_evaluate(config, workdir):
  """Pre-trains or fine-tunes (config.task) per `config`, checkpointing into
  and resuming from `workdir`.

  Returns the final evaluation dict (also written to workdir/eval.json), or
  None when config.stop_at_step ended the run before total_steps.
  """
  # 1. Setup.
  configlib.validate(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
  mesh = sharding.mesh_from_config(config)
  axis_rules = sharding.rules(config)
  local_batch = sharding.per_process_batch_size(config.batch_size, mesh)
  if config.task == 'pretrain':
    job = pretrain_job(config, workdir, mesh, axis_rules, local_batch)
  else:
    from cmal_jax import finetune
    job = finetune.make_job(config, workdir, mesh, axis_rules, local_batch)
  train_iter = pipeline.to_iterator(job.train_ds, config)
  log(f'Mesh {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} devices, {jax.process_count()} '
      f'process(es); task {config.task}, data {job.directory}.')

  if config.compile_only:
    return compile_report(job, config, workdir, mesh, axis_rules,
                          next(train_iter))

  # 2. Checkpoints: only a checkpoint of the same kind of run resumes; the
  # check comes before the (for big models, slow) state initialisation.
  if config.resume == 'fresh' and jax.process_index() == 0 and epath.Path(
      checkpoint.checkpoint_dir(workdir)).exists():
    for old in (checkpoint.checkpoint_dir(workdir), best_dir(workdir),
                os.path.join(workdir, 'best.json')):
      if epath.Path(old).exists():
        log(f'config.resume=fresh: moved {old} to {guards.move_aside(old)}.')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('resume_fresh')
  manager = checkpoint.make_manager(workdir, config)
  if manager.latest_step() is not None:
    checkpoint.check_signature(manager, manager.latest_step(), config)

  # 3. Optimizer and state; restored if the workdir holds a checkpoint, else
  # (fine-tuning with init_from) the pre-trained parameters merged in.
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_train_state(
      job.model, job.init_inputs, job.stat_keys, tx, config, mesh, axis_rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log(f'Model: {num_params / 1e6:.2f}M parameters, size {config.size}, '
      f'recipe {config.recipe}.')
  restored = checkpoint.restore(manager, state, train_iter)
  if restored is not None:
    state = restored
    log(f'Resumed from {workdir}/checkpoints at step {int(state.step)}.')
  else:
    params = job.initial_params(bert_params(config, state.params))
    if params is not state.params:
      params = jax.device_put(params, state_shardings.params)
      state = state.replace(params=params)
      if state.ema_params is not None:  # The momentum encoder starts equal.
        state = state.replace(ema_params=params)
  step = int(state.step)
  if jax.process_index() == 0:
    guards.write_text_atomic(epath.Path(workdir) / 'config.json',
                             config.to_json_best_effort(indent=2))
    # One line per start; read and rewritten, as GCS cannot append.
    info = epath.Path(workdir) / 'run_info.json'
    guards.write_text_atomic(info, (info.read_text() if info.exists() else '')
                             + json.dumps(dict(guards.run_info(mesh),
                                               start_step=step)) + '\n')

  # 4. The jitted step; the state is donated, so it is updated in place.
  step_fn = jit_train_step(job.loss, config, schedule, state_shardings,
                           mesh)
  with jax.set_mesh(mesh):
    state_is_finite = jax.jit(lambda s: guards.all_finite(s.params))

  def save_checkpoint():
    with jax.set_mesh(mesh):
      if not bool(state_is_finite(state)):  # Cannot happen; never save it.
        raise FloatingPointError(
            f'step {step}: the parameters hold NaN/Inf; not saved.')
    checkpoint.save(manager, step, state, train_iter, config)

  # 5. The loop.
  writer = MetricWriter(workdir, resume_step=step)
  best = BestCheckpoint(workdir, config.eval.best_metric)
  guard = guards.NonFiniteGuard(config.max_nonfinite_steps)
  preemption = guards.Preemption()
  progress = ProgressBar(config.total_steps)
  epoch_size = job.epoch_size
  window_start, window_steps, pending = time.time(), 0, []
  # stop_at_step ends this invocation early (saved; the next one resumes).
  last_step = min(config.stop_at_step or config.total_steps, config.total_steps)
  stopped_early = False
  while step < last_step:
    local = next(train_iter)
    if step + 1 in config.debug_nan_steps:  # Test hook (config.debug_*).
      # Pixels are uint8: the boxes that pool them carry the NaN instead.
      key = 'region_feats' if 'region_feats' in local else 'region_boxes'
      local[key] = np.full_like(local[key], np.nan)
    batch = sharding.global_batch(local, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      state, metrics = step_fn(state, batch)
    step += 1
    window_steps += 1
    pending.append(metrics)
    guard.observe(step, metrics)
    progress.update(step)
    if step % config.log_every == 0 or step == last_step:
      guard.flush()
      # One sync per log interval.
      host, stats, skips = jax.device_get(
          (pending, state.data_stats, state.nonfinite_skips))
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      elapsed = time.time() - window_start
      mean['steps_per_sec'] = window_steps / elapsed
      mean['examples_per_sec'] = window_steps * config.batch_size / elapsed
      mean['epoch'] = int(stats['examples']) / max(epoch_size, 1)
      mean['nonfinite_skips'] = int(skips)
      mean.update({f'data/{k}': int(v) for k, v in stats.items()})
      writer.write(step, mean)
      if mean['data/examples'] >= MIN_EXAMPLES_FOR_SKIP_CHECK:
        pipeline.check_skip_limit(
            {k: int(v) for k, v in stats.items()}, config)
      progress.clear()
      log(format_log_line(step, config.total_steps, mean))
      window_start, window_steps, pending = time.time(), 0, []
    if config.eval.every_steps and step % config.eval.every_steps == 0 and (
        step < config.total_steps):
      results = job.evaluate(state.params, final=False)
      writer.write(step, {f'eval/{k}': v for k, v in results.items()
                          if isinstance(v, (int, float))})
      best.update(step, results, state.params)
    preempted = preemption.reached(step)
    if preempted or step % config.checkpoint_every == 0 or step == last_step:
      guard.flush()  # Raises before a save if the run must stop.
      save_checkpoint()
    if preempted:
      log(f'Preempted (SIGTERM): saved step {step}; run again to resume.')
      stopped_early = True
      break
  guard.flush()
  preemption.close()
  progress.clear()
  manager.close()
  stats = {k: int(v) for k, v in jax.device_get(state.data_stats).items()}
  log(f'Data: {stats}; non-finite updates skipped: '
      f'{int(jax.device_get(state.nonfinite_skips))}.')
  log(pipeline.skip_report(stats))
  pipeline.check_skip_limit(stats, config)
  if stopped_early or step < config.total_steps:
    if not stopped_early:
      log(f'Stopped at step {step} (config.stop_at_step); run again to '
          'resume.')
    writer.close()
    best.close()
    return None

  # 6. Final evaluation; fine-tuning then evaluates the best checkpoint on
  # the eval split and every test split.
  results = job.evaluate(state.params, final=True)
  best.update(step, results, state.params)
  writer.write(step, {f'eval/{k}': v for k, v in results.items()
                      if isinstance(v, (int, float))})
  if job.finish is not None:
    results = job.finish(best.restore(state.params), best.step)
  results['step'] = step
  results['data_stats'] = stats
  results['nonfinite_skips'] = int(jax.device_get(state.nonfinite_skips))
  if jax.process_index() == 0:
    guards.write_text_atomic(epath.Path(workdir) / 'eval.json',
                             json.dumps(results, indent=2))
  best.close()
  writer.close()
  log('Evaluation: ' + json.dumps(
      {k: v for k, v in results.items() if k != 'data_stats'}))
  return results


# ---------------------------------------------------------------- helpers

def compile_report(job, config, workdir, mesh, axis_rules, local_batch):
  """config.compile_only: compiles the train step for `mesh` from abstract
  shapes (no parameters are allocated), prints per-device memory and FLOPs
  per step, writes them to workdir/compile.json and returns them."""
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_train_state(
      job.model, job.init_inputs, job.stat_keys, tx, config, mesh, axis_rules,
      abstract_only=True)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype,
          sharding=batch_sharding), local_batch)
  step_fn = jit_train_step(job.loss, config, schedule, state_shardings, mesh)
  t = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    compiled = step_fn.lower(state, batch).compile()
  seconds = time.time() - t
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  flops_per_device = float(
      (cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0))
  if config.grad_accum_steps > 1:
    # XLA's cost analysis counts a loop body once. The step's FLOPs are
    # those of the same step without micro-batches, from its lowering
    # (the whole program, before it is split over devices).
    one_batch = config.copy_and_resolve_references()
    one_batch.grad_accum_steps = 1
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      cost = jit_train_step(job.loss, one_batch, schedule, state_shardings,
                            mesh).lower(state, batch).cost_analysis()
    flops_per_device = float(cost.get('flops', 0)) / jax.device_count()
  per_device = lambda tree: sum(
      math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
      for s in jax.tree.leaves(tree))
  report = dict(
      mesh=dict(mesh.shape), sharding=config.sharding,
      devices=jax.device_count(), platform=jax.devices()[0].platform,
      batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
      dtype=config.model.dtype, remat=config.model.remat,
      compile_seconds=round(seconds, 2),
      parameters=sum(x.size for x in jax.tree.leaves(state.params)),
      # Per device, in bytes; the state is params + optimizer state + counters.
      params_bytes=per_device(state.params),
      state_bytes=per_device(state),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      generated_code_bytes=memory.generated_code_size_in_bytes,
      # The state is donated, so its output aliases its input.
      peak_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
      flops_per_device=flops_per_device,
  )
  report['flops_per_step'] = report['flops_per_device'] * jax.device_count()
  gib = lambda b: f'{b / 2**30:.3f} GiB'
  log(f'compile_only: mesh {report["mesh"]}, sharding {config.sharding}, '
      f'{report["devices"]} {report["platform"]} devices, batch '
      f'{config.batch_size}; compiled in {seconds:.1f}s.\n'
      f'  per device: state {gib(report["state_bytes"])} (parameters '
      f'{gib(report["params_bytes"])}), temporaries '
      f'{gib(report["temp_bytes"])}, peak {gib(report["peak_bytes"])}\n'
      f'  FLOPs per step: {report["flops_per_step"]:.3e} '
      f'({report["flops_per_device"]:.3e} per device)')
  if jax.process_index() == 0:
    guards.write_text_atomic(epath.Path(workdir) / 'compile.json',
                             json.dumps(report, indent=2))
  return report


def format_log_line(step, total_steps, mean):
  """One line: step, epoch, losses, accuracies, lr, grad norm, speed, ETA."""
  losses = ' '.join(f'{k[5:]}={mean[k]:.3f}' for k in sorted(mean)
                    if k.startswith('loss_'))
  accs = ' '.join(f'{k[4:]}={mean[k]:.2f}' for k in sorted(mean)
                  if k.startswith('acc_'))
  eta = (total_steps - step) / mean['steps_per_sec']
  skipped = (f' skipped={mean["nonfinite_skips"]}'
             if mean['nonfinite_skips'] else '')
  return (f'step {step}/{total_steps} epoch {mean["epoch"]:.2f} '
          f'loss={mean["loss"]:.3f} [{losses}] [{accs}] lr={mean["lr"]:.2e} '
          f'grad_norm={mean["grad_norm"]:.2f}{skipped} '
          f'{mean["steps_per_sec"]:.2f} steps/s '
          f'{mean["examples_per_sec"]:.0f} ex/s ETA {eta / 60:.1f} min')


class ProgressBar:
  """A live one-line bar on a terminal (process 0); nothing otherwise, so
  CI and SLURM logs get only the plain log lines."""

  def __init__(self, total, width=30):
    self.total, self.width = total, width
    self.active = jax.process_index() == 0 and sys.stdout.isatty()
    self.start, self.first = time.time(), None

  def update(self, step):
    if not self.active:
      return
    if self.first is None:
      self.first, self.start = step, time.time()
      return
    done = int(self.width * step / self.total)
    rate = (step - self.first) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    sys.stdout.write(f'\r[{"#" * done}{"." * (self.width - done)}] '
                     f'{step}/{self.total} {rate:.2f} steps/s '
                     f'ETA {eta / 60:.1f} min ')
    sys.stdout.flush()

  def clear(self):
    if self.active:
      sys.stdout.write('\r' + ' ' * (self.width + 50) + '\r')
      sys.stdout.flush()


def best_dir(workdir):
  """workdir/best: absolute when local, as given when gs://."""
  return str(guards.workdir_path(workdir, 'best'))


class BestCheckpoint:
  """Keeps the parameters of the best evaluation so far (higher is better)
  in workdir/best, described by workdir/best.json; survives resumes."""

  def __init__(self, workdir, metric):
    self.metric = metric
    self.json_path = epath.Path(workdir) / 'best.json'
    self.value, self.step = None, None
    if self.json_path.exists():
      saved = json.loads(self.json_path.read_text())
      self.value, self.step = saved['value'], saved['step']
    self.manager = ocp.CheckpointManager(
        best_dir(workdir), item_names=('params',),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))

  def update(self, step, results, params):
    value = float(results[self.metric])
    if self.value is not None and value <= self.value:
      return
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params)), force=True)
    self.manager.wait_until_finished()
    self.value, self.step = value, step
    if jax.process_index() == 0:
      guards.write_text_atomic(self.json_path, json.dumps(
          dict(metric=self.metric, value=value, step=step)))

  def restore(self, params):
    """The best parameters, in the shardings of `params` (same tree)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        params)
    return self.manager.restore(self.step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']

  def close(self):
    self.manager.close()
