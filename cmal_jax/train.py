"""The training loop, top to bottom, for any job (jobs.py hands it one:
pre-training or a downstream task):

  1. setup: config check, the workdir's lock, mesh, the job (data generated if missing, model,
     loss, evaluation: make_job, pretraining's or finetune's)
  2. optimizer and a sharded train state (fine-tuning: init_from merged in)
  3. resume from the workdir's latest checkpoint
  4. the jitted train step
  5. the loop: step, log, evaluate, checkpoint
  6. final evaluation -> workdir/eval.json (fine-tuning: the best checkpoint
     on the eval split and every test split, with predictions files)
"""

import json
import math
import os
import time

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from cmal_jax import (checkpoint, configlib, guards, logs, run_identity,
                      sharding, storage, workdir_lock)
from cmal_jax.checkpoint import BestCheckpoint, best_dir
from cmal_jax.data import pipeline
from cmal_jax.logs import log
from cmal_jax.metrics import MetricWriter
from cmal_jax.train_step import (bert_params, create_train_state,
                                 jit_train_step, make_optimizer)


# ---------------------------------------------------------------- the run

# The share of skipped bad records is checked at log intervals once this many
# examples were read (earlier, a cluster of bad records looks like a flood),
# and always at the end.
MIN_EXAMPLES_FOR_SKIP_CHECK = 1000


def run(config, workdir, make_job):
  """Trains the job make_job(config, workdir, mesh, axis_rules, local_batch)
  -> train_step.Job builds, per `config`, checkpointing into and resuming
  from `workdir`.

  Returns the final evaluation dict (also written to workdir/eval.json), or
  None when config.stop_at_step ended the run before total_steps.
  """
  configlib.validate(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
  if config.compile_only:  # Writes compile.json only: no lock needed.
    return _run(config, workdir, make_job)
  with workdir_lock.hold(workdir):  # One writer per workdir.
    return _run(config, workdir, make_job)


def _run(config, workdir, make_job):
  # 1. Setup.
  mesh = sharding.mesh_from_config(config)
  axis_rules = sharding.rules(config)
  local_batch = sharding.per_process_batch_size(config.batch_size, mesh)
  job = make_job(config, workdir, mesh, axis_rules, local_batch)
  train_iter = pipeline.to_iterator(job.train_ds, config)
  log(f'Mesh {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} devices, {jax.process_count()} '
      f'process(es); task {config.task}, data {job.directory}.')

  if config.compile_only:
    return compile_report(job, config, workdir, mesh, axis_rules,
                          next(train_iter))

  # 2. Checkpoints: only a checkpoint of the same run resumes (identity
  # changes only with resume='allow_changes'); the check comes before the
  # (for big models, slow) state initialisation.
  if config.resume == 'fresh' and jax.process_index() == 0 and epath.Path(
      checkpoint.checkpoint_dir(workdir)).exists():
    for old in (checkpoint.checkpoint_dir(workdir), best_dir(workdir),
                os.path.join(workdir, 'best.json')):
      if epath.Path(old).exists():
        log(f'config.resume=fresh: moved {old} to {storage.move_aside(old)}.')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('resume_fresh')
  manager = checkpoint.make_manager(workdir, config)
  changes = {}
  if manager.latest_step() is not None:
    changes = checkpoint.check_resume(manager, manager.latest_step(), config)

  # 3. Optimizer and state; restored if the workdir holds a checkpoint, else
  # (fine-tuning with init_from) the pre-trained parameters merged in.
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_train_state(
      job.model, job.init_inputs, job.stat_keys, tx, config, mesh, axis_rules,
      extra_state=job.loss.extra_state)
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
      # The recipe's state (SemMIM's momentum encoder) starts from them.
      state = state.replace(extra=job.loss.extra_state(params))
  step = int(state.step)
  if jax.process_index() == 0:
    record_start(workdir, config, mesh, step, changes)

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
  progress = logs.ProgressBar(config.total_steps)
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
      host, stats, skips, loss_scale = jax.device_get(
          (pending, state.data_stats, state.nonfinite_skips,
           getattr(state, 'loss_scale', None)))
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      elapsed = time.time() - window_start
      mean['steps_per_sec'] = window_steps / elapsed
      mean['examples_per_sec'] = window_steps * config.batch_size / elapsed
      mean['epoch'] = int(stats['examples']) / max(epoch_size, 1)
      mean['nonfinite_skips'] = int(skips)
      if loss_scale is not None:  # float16: the scale the next step uses.
        mean['float16_loss_scale'] = float(loss_scale.dynamic.scale)
        mean['float16_overflow_skips'] = int(loss_scale.overflow_skips)
      mean.update({f'data/{k}': int(v) for k, v in stats.items()})
      writer.write(step, mean)
      if mean['data/examples'] >= MIN_EXAMPLES_FOR_SKIP_CHECK:
        pipeline.check_skip_limit(
            {k: int(v) for k, v in stats.items()}, config)
      progress.clear()
      log(logs.format_log_line(step, config.total_steps, mean))
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
  if getattr(state, 'loss_scale', None) is not None:
    loss_scale = jax.device_get(state.loss_scale)
    log(f'float16 loss scale {float(loss_scale.dynamic.scale):g}; updates '
        f'skipped as the scaled gradients overflowed: '
        f'{int(loss_scale.overflow_skips)}.')
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
    storage.write_text_atomic(epath.Path(workdir) / 'eval.json',
                             json.dumps(results, indent=2))
  best.close()
  writer.close()
  log('Evaluation: ' + json.dumps(
      {k: v for k, v in results.items() if k != 'data_stats'}))
  return results


# ---------------------------------------------------------------- helpers

def record_start(workdir, config, mesh, step, changes):
  """Writes config.json and appends this start to run_info.json. A start
  that changed the run's identity (resume='allow_changes') keeps the
  previous config.json as config.until_step_<step>.json and lists the
  changes in its run_info line."""
  config_path = epath.Path(workdir) / 'config.json'
  if changes:
    log(f'config.resume=allow_changes: step {step} resumes with '
        f'{run_identity.describe_changes(changes)}.')
    if config_path.exists():
      storage.write_text_atomic(
          epath.Path(workdir) / f'config.until_step_{step}.json',
          config_path.read_text())
  storage.write_text_atomic(config_path, config.to_json_best_effort(indent=2))
  line = dict(logs.run_info(mesh), start_step=step)
  if changes:
    line['identity_changes'] = {k: dict(checkpoint=old, config=new)
                                for k, (old, new) in changes.items()}
  # One line per start; read and rewritten, as GCS cannot append.
  info = epath.Path(workdir) / 'run_info.json'
  storage.write_text_atomic(info, (info.read_text() if info.exists() else '')
                           + json.dumps(line) + '\n')


def compile_report(job, config, workdir, mesh, axis_rules, local_batch):
  """config.compile_only: compiles the train step for `mesh` from abstract
  shapes (no parameters are allocated), prints per-device memory and FLOPs
  per step, writes them to workdir/compile.json and returns them."""
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_train_state(
      job.model, job.init_inputs, job.stat_keys, tx, config, mesh, axis_rules,
      abstract_only=True, extra_state=job.loss.extra_state)
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
    storage.write_text_atomic(epath.Path(workdir) / 'compile.json',
                             json.dumps(report, indent=2))
  return report
