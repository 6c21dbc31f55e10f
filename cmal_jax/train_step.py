"""The train-step contract: the train state, the optimizer, what a job
hands the loop (Job, with its objectives.Loss), gradient accumulation over
micro-batches, and the jitted step."""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale

from cmal_jax import objectives, sharding
from cmal_jax.logs import log
from cmal_jax.model import bert_init
from cmal_jax.model.cmal import pretrained_param_names
from cmal_jax.model.pixels import reads_pixels


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the data counters (pipeline.STAT_KEYS), which
  live in the checkpoint so a resumed run keeps counting from where it was,
  the number of updates skipped because they were not finite, and the
  recipe's own state (objectives.Loss.extra_state; SemMIM: its momentum
  encoder), never differentiated; None when the recipe keeps none."""
  data_stats: dict
  nonfinite_skips: jax.Array
  extra: Any = None


# ----------------------------------------------- float16: loss scaling

# float16's smallest normal number is 6.1e-5 (subnormals end at 6e-8), so
# small gradients flush to zero in its backward pass. A float16 run
# multiplies the loss by a dynamic scale before differentiating and divides
# the float32 gradients by it after (Flax's DynamicScale, the scheme of
# PyTorch's GradScaler): the scale starts at INITIAL_LOSS_SCALE, halves on
# every step whose scaled gradients overflow (the update is skipped), and
# doubles after LOSS_SCALE_GROWTH_INTERVAL finite steps in a row. It never
# goes below 1 (no scaling): an overflow there is float16's range, not the
# scale's, and counts as a non-finite step. float32 and bfloat16 (float32's
# range) carry no scale: their state and programs are unchanged.
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH_INTERVAL = 2000
MIN_LOSS_SCALE = 1.0


class LossScale(struct.PyTreeNode):
  """A float16 run's loss scale (Flax's DynamicScale: `scale`, and
  `fin_steps`, the finite steps since it last changed) and
  `overflow_skips`, the updates skipped because the scaled gradients
  overflowed."""
  dynamic: DynamicScale
  overflow_skips: jax.Array


class ScaledTrainState(TrainState):
  """A float16 run's TrainState: the same fields plus its LossScale,
  checkpointed with it."""
  loss_scale: LossScale | None = None


def uses_loss_scale(config):
  return config.model.dtype == 'float16'


def initial_loss_scale(scale=INITIAL_LOSS_SCALE,
                       growth_interval=LOSS_SCALE_GROWTH_INTERVAL):
  return LossScale(
      dynamic=DynamicScale(
          growth_interval=growth_interval, minimum_scale=MIN_LOSS_SCALE,
          fin_steps=jnp.zeros((), jnp.int32),
          scale=jnp.asarray(scale, jnp.float32)),
      overflow_skips=jnp.zeros((), jnp.int32))


def with_loss_scale(state, loss_scale):
  """A TrainState as a ScaledTrainState carrying `loss_scale`."""
  fields = {f.name: getattr(state, f.name)
            for f in dataclasses.fields(TrainState)}
  return ScaledTrainState(**fields, loss_scale=loss_scale)


def without_loss_scale(state):
  """A ScaledTrainState as a TrainState (the scale dropped)."""
  return TrainState(**{f.name: getattr(state, f.name)
                       for f in dataclasses.fields(TrainState)})


def next_dynamic_scale(dynamic, finite):
  """DynamicScale after a step whose scaled gradients were `finite` (or
  not): Flax's rule, as DynamicScale.value_and_grad applies it (tested
  against it), taken apart from the differentiation so that micro-batches
  share one scale and the summed gradients are checked once."""
  grow = dynamic.fin_steps == dynamic.growth_interval
  grown = jnp.minimum(dynamic.scale * dynamic.growth_factor,
                      jnp.finfo(jnp.float32).max)
  backed_off = dynamic.scale * dynamic.backoff_factor
  if dynamic.minimum_scale is not None:
    backed_off = jnp.maximum(backed_off, dynamic.minimum_scale)
  scale = jnp.where(finite, jnp.where(grow, grown, dynamic.scale), backed_off)
  fin_steps = jnp.where(grow | ~finite, 0, dynamic.fin_steps + 1)
  return dynamic.replace(fin_steps=fin_steps, scale=scale)


def update_loss_scale(loss_scale, loss_finite, grads_finite):
  """-> (LossScale after the step, overflow).

  overflow: the loss was finite but its scaled gradients were not, at a
  scale that can still halve: an expected float16 event (the update is
  skipped and counted in LossScale.overflow_skips), not a non-finite step.
  A non-finite loss is not the scale's doing (the forward pass does not
  see it), so it leaves the scale as it was."""
  dynamic = loss_scale.dynamic
  overflow = loss_finite & ~grads_finite & (
      dynamic.scale > dynamic.minimum_scale)
  adjusted = next_dynamic_scale(dynamic, grads_finite)
  dynamic = jax.tree.map(lambda new, old: jnp.where(loss_finite, new, old),
                         adjusted, dynamic)
  skips = loss_scale.overflow_skips + overflow.astype(jnp.int32)
  return LossScale(dynamic, skips), overflow


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
                                 reads_pixels(config)),
          config.finetune.pretrained_lr_mult)


def bert_params(config, params):
  """`params` with what config.init.bert's BERT folder initialises (the
  unified encoder and the embeddings it sees); unchanged when it is ''."""
  if not config.get('init', {}).get('bert'):
    return params
  params, taken = bert_init.init_params(jax.device_get(params),
                                        config.init.bert, config.model)
  log(f'init.bert {bert_init.resolve_path(config.init.bert)}: {taken} '
      'parameter arrays (unified encoder, slot and text embeddings, ITM '
      'pooler).')
  return params


def create_train_state(model, init_inputs, stat_keys, tx, config, mesh,
                       axis_rules, abstract_only=False,
                       extra_state=lambda params: None):
  """Initialises the state directly in its shardings (no host copy).

  init_inputs(rng) -> the model's inputs for init; stat_keys: the data
  counters kept in the state. Returns (state, state_shardings); with
  abstract_only, the state as jax.ShapeDtypeStructs (compile_only).
  extra_state(params) -> TrainState.extra (objectives.Loss.extra_state):
  built from the boxed parameters, so what it copies of them is sharded
  as they are.
  """
  def init(rng):
    params = model.init(rng, init_inputs(rng))['params']  # Boxed.
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=tx,
        data_stats={k: jnp.zeros((), jnp.int32) for k in stat_keys},
        nonfinite_skips=jnp.zeros((), jnp.int32),
        extra=extra_state(params))
    if uses_loss_scale(config):
      state = with_loss_scale(state, initial_loss_scale())
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

def split_micro_batches(batch, num):
  """{k: [B, ...]} -> {k: [num, B / num, ...]}; micro-batch i holds rows
  i, i + num, ... so that each is spread over every batch shard (a shard's
  consecutive rows go to different micro-batches) and needs no transfer."""
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(
        x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def loss_and_grads(loss, params, batch, rng, num_micro=1, state=None,
                   loss_scale=None):
  """Gradients and metrics of a Loss on `batch` -> (grads, metrics).

  num_micro > 1 sums the gradients of that many micro-batches (lax.scan,
  one micro-batch's activations live at a time): the same as one batch up
  to float rounding (the corruption is drawn once for the whole batch and
  the means divide by whole-batch counts), ITC's in-batch negatives and
  dropout's draws aside. state: what Loss.prepare reads (the TrainState).
  loss_scale (float16): every micro-batch's loss is multiplied by it before
  differentiating and the summed gradients divided by it once (a power of
  2: exact); the metrics are the unscaled ones.
  """
  prep_rng, dropout_rng = jax.random.split(rng)
  batch = loss.prepare(batch, prep_rng, state)
  denominators = loss.denominators(batch)
  branches, branch = objectives.loss_branches(loss)

  def scaled(objective):
    if loss_scale is None:
      return objective
    def scaled_objective(*args):
      total, metrics = objective(*args)
      return total * loss_scale, metrics
    return scaled_objective

  # Each branch differentiated apart, then switched (Loss.branches): only
  # the batch's branch runs, forward and backward.
  branch_grads = [jax.value_and_grad(scaled(b), has_aux=True)
                  for b in branches]
  def value_and_grad(params, batch, *args):
    if len(branch_grads) == 1:
      return branch_grads[0](params, batch, *args)
    return jax.lax.switch(branch(batch), branch_grads, params, batch, *args)
  unscale = lambda grads: grads if loss_scale is None else jax.tree.map(
      lambda g: g / loss_scale, grads)
  if num_micro == 1:
    (_, metrics), grads = value_and_grad(params, batch, dropout_rng,
                                         denominators)
    return unscale(grads), metrics

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
  return unscale(grads), metrics


def make_train_step(loss, config, schedule):
  """The train step (state, batch) -> (state, metrics) of a Loss, with
  config.grad_accum_steps micro-batches (loss_and_grads); float16 with its
  loss scale (ScaledTrainState)."""
  base_rng = jax.random.key(config.seed)
  scaled = uses_loss_scale(config)

  def train_step(state, batch):
    batch = dict(batch)
    data_stats = {k: v + jnp.sum(batch['stats'][k])
                  for k, v in state.data_stats.items()}
    del batch['stats']
    # All randomness: the config seed folded with the step.
    rng = jax.random.fold_in(base_rng, state.step)
    grads, metrics = loss_and_grads(
        loss, state.params, batch, rng, config.grad_accum_steps, state,
        loss_scale=state.loss_scale.dynamic.scale if scaled else None)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = schedule(state.step)
    # A non-finite loss or gradient skips the update: parameters and
    # optimizer state stay as they were; the step and data still advance.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    metrics['update_skipped'] = ~finite
    counted = ~finite
    if scaled:
      # float16: an overflow of the scaled gradients halves the scale and
      # is counted apart (LossScale.overflow_skips), not as a non-finite
      # step (nonfinite_skips, NonFiniteGuard).
      loss_scale, overflow = update_loss_scale(
          state.loss_scale, jnp.isfinite(metrics['loss']),
          jnp.isfinite(metrics['grad_norm']))
      metrics['float16_overflow_skipped'] = overflow
      counted = counted & ~overflow
    skips = state.nonfinite_skips + counted.astype(jnp.int32)
    # lax.cond, not a select: only the taken branch runs, so a finite step
    # does not read the old and new state (3 x params) once more to choose
    # (6 % of a base step on CPU).
    state = jax.lax.cond(
        finite, lambda s: loss.after_update(s.apply_gradients(grads=grads)),
        lambda s: s.replace(step=s.step + 1), state)
    state = state.replace(data_stats=data_stats, nonfinite_skips=skips)
    if scaled:
      state = state.replace(loss_scale=loss_scale)
    return state, metrics

  return train_step


def jit_train_step(loss, config, schedule, state_shardings, mesh):
  """The jitted train step (state, batch) -> (state, metrics) with the
  state donated (updated in place) and the batch split over data x fsdp.
  Call it under jax.set_mesh(mesh) and the config's axis rules.
  config.compiler_options (XLA options, over the process's XLA_FLAGS) apply
  to this program only."""
  return jax.jit(
      make_train_step(loss, config, schedule),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
      compiler_options=config.compiler_options.to_dict() or None)


# -------------------------------------------------------------------- jobs

@dataclasses.dataclass(frozen=True)
class Job:
  """What differs between pre-training and fine-tuning a task.

  init_inputs(rng) -> model inputs for init; loss: the objectives (an
  objectives.Loss); evaluate(params, final) -> flat results on the eval
  split; finish(best_params, best_step) -> extra final results (or None);
  initial_params(params) -> params before step 0 (init_from).
  """
  model: Any
  train_ds: Any  # A grain MapDataset of process-local batches.
  epoch_size: int  # Examples in one epoch of the train split.
  stat_keys: tuple  # batch['stats'] keys, summed into TrainState.data_stats.
  init_inputs: Callable
  loss: objectives.Loss
  evaluate: Callable
  directory: str
  finish: Callable | None = None
  initial_params: Callable = lambda params: params
