"""The pre-training loop, top to bottom:

  1. setup: config check, mesh, data (generated if missing), tokenizer
  2. model, optimizer and a sharded train state
  3. resume from the workdir's latest checkpoint
  4. the jitted train step
  5. the loop: step, log, checkpoint
  6. final evaluation on held-out pairs -> workdir/eval.json
"""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cmal_jax import checkpoint, configlib, evaluate, objectives, sharding
from cmal_jax.data import pipeline, records, world
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.metrics import MetricWriter
from cmal_jax.model.cmal import CMAL, ModelConfig


def log(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


# ----------------------------------------------------------------- 1. setup

def data_dir(config, workdir):
  return config.data.dir or os.path.join(workdir, 'data')


def ensure_world_data(config, directory):
  """Generates the synthetic world's splits where they are missing."""
  params = world.WorldParams(
      image_size=config.world.image_size,
      feature_dim=config.model.region_feat_dim,
      wrong_tag_prob=config.world.wrong_tag_prob,
      miss_prob=config.world.miss_prob,
      max_background=config.world.max_background)
  for split, num in ((config.data.train_split, config.world.num_train),
                     (config.data.eval_split, config.world.num_eval)):
    if os.path.exists(records.split_path(directory, split)):
      continue
    if jax.process_index() == 0:
      t = time.time()
      world.generate_split(directory, split, num, params, seed=config.seed,
                           workers=min(4, os.cpu_count() or 1))
      log(f'Generated {num} synthetic {split} pairs in {directory} '
          f'({time.time() - t:.0f}s)')
  if jax.process_count() > 1:  # Others wait until process 0 has written.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('world_data')


# ------------------------------------------------ 2. model, optimizer, state

def decay_mask(params):
  """AdamW decays kernels and embeddings, not biases, LayerNorm, scales or
  the [MASK] vector."""
  def decays(path, _):
    name = [k.key for k in path if isinstance(getattr(k, 'key', None), str)][-1]
    return not name.endswith(('bias', 'scale', 'mask_vector'))
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
  return tx, schedule


def dummy_batch(config, batch_size):
  """Zeros with the pipeline's shapes, for init and shape inference."""
  T, R, K = (config.data.max_text_len, config.data.max_regions,
             config.data.max_anchors)
  z = lambda *s, dtype=jnp.int32: jnp.zeros((batch_size,) + s, dtype)
  return dict(input_ids=z(T), text_mask=z(T),
              region_feats=z(R, config.model.region_feat_dim,
                             dtype=jnp.float32),
              region_boxes=z(R, 4, dtype=jnp.float32), region_tags=z(R),
              region_mask=z(R), anchor_text_pos=z(K), anchor_text_end=z(K),
              anchor_region=z(K), anchor_valid=z(K, dtype=bool),
              itm_label=z())


def create_train_state(model, tx, config, specials, mesh, axis_rules):
  """Initialises the state directly in its shardings (no host copy).

  Returns (state, state_shardings).
  """
  def init(rng):
    inputs, _ = objectives.prepare_inputs(
        dummy_batch(config, 1), rng, config, specials)
    params = model.init(rng, inputs)['params']  # Boxed: carries axis names.
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=tx)

  rng = jax.random.key(config.seed)
  with nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_shardings(abstract, mesh, axis_rules)
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


# ----------------------------------------------------------- 4. train step

def make_train_step(model, config, specials, schedule):
  base_rng = jax.random.key(config.seed)

  def train_step(state, batch):
    # All randomness: the config seed folded with the step.
    rng = jax.random.fold_in(base_rng, state.step)
    prep_rng, dropout_rng = jax.random.split(rng)

    def loss_fn(params):
      inputs, targets = objectives.prepare_inputs(
          batch, prep_rng, config, specials)
      outputs = model.apply({'params': params}, inputs, deterministic=False,
                            rngs={'dropout': dropout_rng})
      return objectives.compute_losses(outputs, targets, config)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = schedule(state.step)
    return state.apply_gradients(grads=grads), metrics

  return train_step


# ---------------------------------------------------------------- the run

def train_and_evaluate(config, workdir):
  """Pre-trains per `config`, checkpointing into and resuming from `workdir`.

  Returns the final evaluation dict (also written to workdir/eval.json), or
  None when config.stop_at_step ended the run before total_steps.
  """
  # 1. Setup.
  configlib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  axis_rules = sharding.rules(config)
  local_batch = sharding.per_process_batch_size(config.batch_size, mesh)
  directory = data_dir(config, workdir)
  if not config.data.dir:
    ensure_world_data(config, directory)
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f'config.model.vocab_size={config.model.vocab_size} does not match '
        f'the vocabulary {tokenizer.vocab_path} ({tokenizer.vocab_size}).')
  specials = objectives.SpecialTokens.from_tokenizer(tokenizer)
  train_ds, vocab, _ = pipeline.make_dataset(
      config, directory, config.data.train_split, batch_size=local_batch,
      train=True, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_iter = pipeline.to_iterator(train_ds, config)
  log(f'Mesh {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} devices, {jax.process_count()} '
      f'process(es); data {directory} ({vocab.num_tags} tags).')

  # 2. Model, optimizer, state.
  num_tags = config.model.num_tags or vocab.num_tags
  model = CMAL(ModelConfig.from_config(config.model, num_tags))
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_train_state(model, tx, config, specials,
                                              mesh, axis_rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log(f'Model: {num_params / 1e6:.2f}M parameters, size {config.size}, '
      f'recipe {config.recipe}.')

  # 3. Resume.
  manager = checkpoint.make_manager(workdir, config)
  restored = checkpoint.restore(manager, state, train_iter)
  if restored is not None:
    state = restored
    log(f'Resumed from {workdir}/checkpoints at step {int(state.step)}.')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  # 4. The jitted step; the state is donated, so it is updated in place.
  batch_shardings = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    step_fn = jax.jit(
        make_train_step(model, config, specials, schedule),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)

  # 5. The loop.
  writer = MetricWriter(workdir)
  step = int(state.step)
  stats = dict.fromkeys(pipeline.STAT_KEYS, 0)
  window_start, window_steps, pending = time.time(), 0, []
  # stop_at_step ends this invocation early (saved; the next one resumes).
  last_step = min(config.stop_at_step or config.total_steps, config.total_steps)
  while step < last_step:
    local = next(train_iter)
    for k, v in local.pop('stats').items():
      stats[k] += int(v)
    batch = sharding.global_batch(local, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      state, metrics = step_fn(state, batch)
    step += 1
    window_steps += 1
    pending.append(metrics)
    if step % config.log_every == 0 or step == config.total_steps:
      host = jax.device_get(pending)  # One sync per log interval.
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      elapsed = time.time() - window_start
      mean['steps_per_sec'] = window_steps / elapsed
      mean['examples_per_sec'] = window_steps * config.batch_size / elapsed
      mean.update({f'data/{k}': v for k, v in stats.items()})
      eta = (config.total_steps - step) / mean['steps_per_sec']
      writer.write(step, mean)
      losses = ' '.join(f'{k[5:]}={mean[k]:.3f}' for k in sorted(mean)
                        if k.startswith('loss_'))
      accs = ' '.join(f'{k[4:]}={mean[k]:.2f}' for k in sorted(mean)
                      if k.startswith('acc_'))
      log(f'step {step}/{config.total_steps} loss={mean["loss"]:.3f} '
          f'[{losses}] [{accs}] {mean["steps_per_sec"]:.2f} steps/s '
          f'ETA {eta / 60:.1f} min')
      window_start, window_steps, pending = time.time(), 0, []
    if step % config.checkpoint_every == 0 or step == last_step:
      checkpoint.save(manager, step, state, train_iter)
  manager.close()
  log(f'Data: {stats}')
  if step < config.total_steps:
    log(f'Stopped at step {step} (config.stop_at_step); run again to resume.')
    writer.close()
    return None

  # 6. Final evaluation on held-out pairs.
  results = evaluate.evaluate_pretrain(
      model, state.params, config, directory, specials, mesh, axis_rules)
  results['step'] = step
  results['data_stats'] = stats
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(results, f, indent=2)
  writer.write(step, {f'eval/{k}': v for k, v in results.items()
                      if isinstance(v, (int, float))})
  writer.close()
  log('Evaluation: ' + json.dumps(
      {k: v for k, v in results.items() if k != 'data_stats'}))
  return results
