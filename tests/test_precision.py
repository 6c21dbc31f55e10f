"""Mixed precision (config.model.dtype), float16's dynamic loss scale and
rematerialisation (config.model.remat) of the CMAL model, on the tiny
config.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training.dynamic_scale import DynamicScale

from cmal_jax import (checkpoint, guards, jobs, objectives, pretraining,
                      sharding, train_step)
from cmal_jax.data import pipeline
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.model import layers
from cmal_jax.model.layers import REMAT_POLICIES
from cmal_testutil import (CLS, MASK, PAD, SEP, VOCAB, assert_trees_equal,
                           leaf_types, random_batch, read_jsonl, saved_state,
                           shared_tiny, train_lines)
from configs.pretrain import get_config

B = 8
SPECIALS = objectives.SpecialTokens(PAD, CLS, SEP, MASK, VOCAB)

def tiny(dtype='float32', remat='none'):
  c = get_config('tiny')
  c.model.dtype, c.model.remat = dtype, remat
  return CMAL(ModelConfig.from_config(c.model, num_tags=10)), c


@pytest.fixture(scope='module')
def case():
  """The tiny config, one corrupted random batch and float32 parameters."""
  model, c = tiny()
  d = c.data
  batch = random_batch(0, B, d.max_text_len, d.max_regions, d.max_anchors,
                       c.model.region_feat_dim)
  del batch['stats']
  inputs, targets = jax.jit(
      lambda b: objectives.prepare_inputs(b, jax.random.key(1), c, SPECIALS))(
          batch)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0),
                                                inputs))['params'])()
  return c, inputs, targets, params


def loss_fn(model, config, inputs, targets):
  """params -> (loss, (metrics, outputs)), dropout on."""
  def loss(params):
    out = model.apply({'params': params}, inputs, deterministic=False,
                      rngs={'dropout': jax.random.key(2)})
    total, metrics = objectives.compute_losses(out, targets, config)
    return total, (metrics, out)
  return loss


def loss_and_grads(model, case):
  c, inputs, targets, params = case
  return jax.jit(jax.value_and_grad(loss_fn(model, c, inputs, targets),
                                     has_aux=True))(params)


@pytest.fixture(scope='module')
def reference(case):
  """(loss, (metrics, outputs)), grads of the float32 model, no remat."""
  return loss_and_grads(tiny()[0], case)


def param_avals(model, inputs):
  """{path: (shape, dtype)} of the model's parameters, without running."""
  tree = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                    inputs))['params'])
  return {jax.tree_util.keystr(p): (x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def grad_error(a, b):
  """Global relative L2 distance of two gradient trees."""
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(a))) ** .5


def all_eqns(jaxpr):
  """Every equation of a jaxpr, inside jit, custom_jvp/vjp, remat... too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from all_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from all_eqns(sub)


# ------------------------------------------------------------------ remat

def test_remat_config_reaches_every_encoder(case):
  _, inputs, _, params = case
  model, c = tiny(remat='dots')
  assert model.config.remat == 'dots'
  assert {model.config.encoder(n).remat for n in (1, 2)} == {'dots'}
  # One rematerialised block per BertLayer call: text 1 + vision 1, twice,
  # + unified 2.
  def remat_blocks(model):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, inputs))(
        params).jaxpr
    return sum(e.primitive.name == 'remat2' for e in all_eqns(jaxpr))
  m = c.model
  # The UMSE layers run twice: the moved features' pass too
  # (model.moved_place='none').
  assert remat_blocks(model) == (
      2 * (m.text_layers + m.vision_layers) + m.unified_layers) == 6
  assert remat_blocks(tiny()[0]) == 0
  # Same parameters, names and shapes, whatever the policy (export relies
  # on layer_0 ...).
  avals = param_avals(tiny()[0], inputs)
  assert "['unified']['layer_1']['attention']['query_kernel']" in avals
  for remat in REMAT_POLICIES:
    assert param_avals(tiny(remat=remat)[0], inputs) == avals, remat


def test_remat_saves_less_for_the_backward_pass(case):
  """What the backward pass keeps (traced, not compiled): 'full' keeps
  only each layer's inputs, 'dots' the matmul outputs, both less than no
  remat; so each encoder's layers are rematerialised."""
  c, inputs, targets, params = case

  def saved_bytes(remat):
    """Bytes of the residuals jax.vjp's backward function closes over."""
    loss = loss_fn(tiny(remat=remat)[0], c, inputs, targets)
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(lambda q: loss(q)[0], p)[1],
                            params)
    return sum(np.prod(a.shape) * a.dtype.itemsize
               for a in jax.tree.leaves(vjp_fn))

  # Measured: none 32.4 MB, dots 28.0, dots_no_batch 27.6, full 25.8 (of
  # which 7.8 MB are the [B, 8, 30522] float32 vocabulary logits).
  none, full, dots, no_batch = map(saved_bytes, (
      'none', 'full', 'dots', 'dots_no_batch'))
  assert full < no_batch < dots < none, (none, dots, no_batch, full)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_loss_and_gradients(case, reference, remat):
  (loss, (metrics, _)), grads = loss_and_grads(tiny(remat=remat)[0], case)
  (ref_loss, (ref_metrics, _)), ref_grads = reference
  # Dropout masks are the same: the rngs are lifted into the remat.
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  # Remat recomputes the forward pass inside the backward one, so XLA may
  # fuse and order the sums differently: float32 rounding. Measured with
  # the suite's compile (conftest.py): loss and metrics within 1e-6,
  # gradients within 1e-5 (largest: the vision feature bias, a sum over
  # every region of the batch, 9e-6 on values of ~3). A wrong remat (e.g.
  # other dropout masks) moves them by orders of magnitude more.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-6,
                               atol=1e-7, err_msg=k)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=3e-5,
                               err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------- mixed precision

@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_computes_in_it_and_keeps_float32_where_needed(
    case, dtype):
  """Traced only: parameters float32; every matmul of the forward pass takes
  operands in the compute dtype; softmaxes (exp), statistics and losses
  (every float reduction) run in float32; every output a loss reads is
  float32, the [.., 30522] vocabulary logits straight from a float32
  accumulator (TextEncoder.attend)."""
  c, inputs, targets, params = case
  model, _ = tiny(dtype)
  low = jnp.dtype(dtype)
  assert set(param_avals(model, inputs).values()) == set(
      param_avals(tiny()[0], inputs).values())
  assert {dt for _, dt in param_avals(model, inputs).values()} == {
      jnp.dtype(jnp.float32)}

  loss = loss_fn(model, c, inputs, targets)
  (total, (metrics, out)) = jax.eval_shape(loss, params)
  assert total.dtype == jnp.float32
  assert {v.dtype for v in metrics.values()} <= {jnp.dtype(jnp.float32)}
  assert {k: v.dtype for k, v in out.items()} == {
      k: jnp.dtype(jnp.float32) for k in out}
  x, text_unit, region_unit = jax.eval_shape(
      lambda p: model.apply({'params': p}, inputs, method=CMAL.encode),
      params)
  assert x.dtype == low  # The unified encoder's activations.
  assert text_unit.dtype == region_unit.dtype == jnp.float32  # Unit sphere.

  eqns = list(all_eqns(jax.make_jaxpr(loss)(params).jaxpr))
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  assert dots and all(v.aval.dtype == low for e in dots for v in e.invars)
  vocab = [e for e in dots if e.outvars[0].aval.shape[-1] == VOCAB]
  assert vocab and all(e.outvars[0].aval.dtype == jnp.float32 for e in vocab)
  f32 = jnp.dtype(jnp.float32)
  exps = [e for e in eqns if e.primitive.name == 'exp']
  assert exps and all(e.invars[0].aval.dtype == f32 for e in exps)
  # LayerNorm mean and variance (Flax promotes to float32), softmax sums,
  # L2 norms, loss means.
  reductions = [e for e in eqns if e.primitive.name in (
      'reduce_sum', 'reduce_max', 'reduce_min', 'argmax', 'argmin')
                and jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)]
  assert reductions and all(e.invars[0].aval.dtype == f32
                            for e in reductions)


def test_bfloat16_loss_and_gradients_are_close_to_float32(case, reference):
  (loss, (metrics, out)), grads = loss_and_grads(tiny('bfloat16')[0], case)
  (ref_loss, (ref_metrics, _)), ref_grads = reference
  assert loss.dtype == jnp.float32
  assert out['mlm_logits'].dtype == jnp.float32
  assert {g.dtype for g in jax.tree.leaves(grads)} == {
      jnp.dtype(jnp.float32)}
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # Measured on this batch at init: loss 19.6097 vs 19.6091 (relative
  # 3.5e-5), each objective within 7e-4, logits within 1e-2 (vocabulary)
  # and 7e-4 (ITM, AMC pairing), gradients' relative L2 error 9e-3.
  # (float16: 7e-7, 3e-5, 1e-3 and 1.3e-3.)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
  for k in ('loss_amc_pair', 'loss_amc_label', 'loss_mlm', 'loss_itm'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-2,
                               err_msg=k)
  assert grad_error(ref_grads, grads) < 5e-2


# ------------------------------------------------- float16: the loss scale

def test_loss_scale_follows_flax_dynamic_scale():
  """train_step.next_dynamic_scale is Flax's DynamicScale rule (halve on an
  overflow, double after growth_interval finite steps), applied apart from
  the differentiation; the floor of 1 holds."""
  flags = [False, True, True, True, False, False, False, False, True, True,
           True, True, True, True]
  ours = train_step.initial_loss_scale(scale=8.0, growth_interval=2).dynamic
  flax_scale = DynamicScale(growth_interval=2, minimum_scale=1.0,
                            fin_steps=jnp.zeros((), jnp.int32),
                            scale=jnp.float32(8.0))
  seen = []
  for finite in flags:
    # A gradient that is finite or not, as `finite` says.
    flax_scale, flax_finite, _, _ = flax_scale.value_and_grad(
        lambda x, f=finite: x * (1.0 if f else jnp.inf))(jnp.float32(1.0))
    ours = train_step.next_dynamic_scale(ours, jnp.bool_(finite))
    assert bool(flax_finite) == finite
    assert (float(ours.scale), int(ours.fin_steps)) == (
        float(flax_scale.scale), int(flax_scale.fin_steps))
    seen.append(float(ours.scale))
  assert seen == [4, 4, 4, 8, 4, 2, 1, 1, 1, 1, 2, 2, 2, 4]


# A loss whose gradients sit below float16's normal range (6.1e-5; its
# subnormals end at 6e-8): the model's loss times 2**-14, as a small loss
# weight or a large batch's means make it.
SMALL_LOSS = 2.0 ** -14


def test_float16_loss_scale_recovers_gradients_that_underflow(case,
                                                              reference):
  """Without a scale, float16's backward pass flushes most of this loss's
  gradients to exactly zero, whole parameters' among them; with the
  dynamic scale (from 2**15, halved while the gradients overflow;
  train_step.loss_and_grads multiplies the loss by it and divides the
  gradients) they are float32's within float16's rounding."""
  c, inputs, targets, params = case
  loss16 = loss_fn(tiny('float16')[0], c, inputs, targets)
  def small_loss(p, *_):  # An objectives.Loss on the case's fixed batch.
    total, (metrics, _) = loss16(p)
    return total * SMALL_LOSS, metrics
  loss = objectives.Loss(prepare=lambda batch, rng, state: batch,
                         loss=small_loss, denominators=lambda batch: {})
  grads = jax.jit(lambda p, s: train_step.loss_and_grads(
      loss, p, {}, jax.random.key(0), loss_scale=s)[0])
  # float32's gradients of the same loss (a power-of-2 factor: exact).
  ref = jax.tree.map(lambda g: g * SMALL_LOSS, reference[1])
  unscaled = grads(params, jnp.float32(1.0))  # x * 1 and x / 1 are exact.

  dynamic, overflows = train_step.initial_loss_scale().dynamic, 0
  while True:
    scaled = grads(params, dynamic.scale)
    finite = all(bool(jnp.all(jnp.isfinite(g)))
                 for g in jax.tree.leaves(scaled))
    dynamic = train_step.next_dynamic_scale(dynamic, jnp.bool_(finite))
    if finite:
      break
    overflows += 1
    assert overflows < 15

  ref_leaves = [np.asarray(g) for g in jax.tree.leaves(ref)]
  nonzero = sum(int(np.sum(g != 0)) for g in ref_leaves)
  def flushed(grads):  # float32's nonzero gradients that are exactly 0.
    return sum(int(np.sum((r != 0) & (np.asarray(g) == 0)))
               for r, g in zip(ref_leaves, jax.tree.leaves(grads)))
  def zero_leaves(grads):  # Parameters whose whole gradient is 0.
    return [jax.tree_util.keystr(p) for (p, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), ref_leaves)
            if np.any(r != 0) and not np.any(np.asarray(g) != 0)]
  # Measured: unscaled, 2113716 of the 2222853 nonzero float32 gradients
  # are 0 (95 %), 26 parameters' whole gradient, relative L2 error 0.997;
  # at 2**15 (no overflow), 2356 (0.1 %), none whole, error 1.7e-3.
  assert flushed(unscaled) > 0.5 * nonzero, (flushed(unscaled), nonzero)
  assert len(zero_leaves(unscaled)) > 5, zero_leaves(unscaled)
  assert grad_error(ref, unscaled) > 0.5
  assert flushed(scaled) < 2e-3 * nonzero, (flushed(scaled), nonzero)
  assert zero_leaves(scaled) == []
  assert grad_error(ref, scaled) < 1e-2, grad_error(ref, scaled)


def test_guard_lets_loss_scale_skips_pass():
  """NonFiniteGuard: a float16 overflow skip neither counts toward
  max_nonfinite_steps nor ends a streak of non-finite steps."""
  def metrics(kind):
    finite = kind == 'ok'
    return dict(loss=np.float32(1.0 if kind != 'nan' else np.nan),
                loss_mlm=np.float32(1.0 if kind != 'nan' else np.nan),
                grad_norm=np.float32(1.0 if finite else np.inf),
                update_skipped=np.bool_(not finite),
                float16_overflow_skipped=np.bool_(kind == 'overflow'))
  guard = guards.NonFiniteGuard(2)
  for i, kind in enumerate(['overflow'] * 15 + ['nan', 'ok', 'nan']):
    guard.observe(i + 1, metrics(kind))
  guard.flush()
  guard = guards.NonFiniteGuard(2)
  with pytest.raises(FloatingPointError, match='2 consecutive non-finite '
                     r'updates, steps 1..3: objective\(s\) mlm'):
    for i, kind in enumerate(['nan', 'overflow', 'nan']):
      guard.observe(i + 1, metrics(kind))
    guard.flush()
  # At scale 1 an overflow is a non-finite step; the message says so.
  guard = guards.NonFiniteGuard(1)
  with pytest.raises(FloatingPointError, match='at float16 loss scale 1 .*'
                     'bfloat16'):
    guard.observe(1, dict(metrics('overflow'),
                          float16_overflow_skipped=np.bool_(False)))
    guard.flush()


def float16_tiny(world_dir, **overrides):
  """The suite's shared tiny run in float16, two micro-batches a step (so
  that the micro-batches' shared scale is exercised)."""
  c = shared_tiny(world_dir, log_every=1, checkpoint_every=1000,
                  grad_accum_steps=2, **overrides)
  c.model.dtype = 'float16'
  return c


def test_float16_run_trains_logs_its_loss_scale_and_resumes(
    world_dir, tmp_path, compilation_cache):
  """A tiny float16 run, stopped at step 12 and resumed to 24. Its first
  steps overflow at 2**15: skipped, the scale halved, counted apart
  from nonfinite_skips (which the guard reads); a NaN batch (step 6) is a
  non-finite step that leaves the scale alone; the loss falls; every line
  logs the scale and the overflow count, and the float16 resume continues
  both from the checkpoint."""
  workdir = str(tmp_path)
  for stop in (12, 24):
    assert jobs.train_and_evaluate(float16_tiny(
        world_dir, stop_at_step=stop, max_nonfinite_steps=2,
        debug_nan_steps=(6,)), workdir) is None
  lines = train_lines(read_jsonl(workdir))
  assert [m['step'] for m in lines] == list(range(1, 25))
  overflow = [m['float16_overflow_skipped'] for m in lines]
  scales = [m['float16_loss_scale'] for m in lines]
  skips = [m['float16_overflow_skips'] for m in lines]
  # Each line: the scale after that step. An overflow halves it; nothing
  # else moves it here (it grows after 2000 finite steps), across the
  # resume too: a fresh scale would restart at 2**15 and at 0 skips.
  assert overflow[0] == 1.0 and scales[0] == 2.0 ** 14
  for before, after, m in zip(scales, scales[1:], lines[1:]):
    assert after == (before / 2 if m['float16_overflow_skipped'] else before)
  assert skips == list(np.cumsum(overflow))
  assert 1 <= skips[-1] < 10 and scales[11] < 2.0 ** 15
  assert all(m['update_skipped'] for m, o in zip(lines, overflow) if o)
  # The NaN batch: skipped and counted as non-finite, the scale unchanged.
  assert [m['nonfinite_skips'] for m in lines] == [0] * 5 + [1] * 19
  assert lines[5]['update_skipped'] == 1.0 and overflow[5] == 0.0
  assert not np.isfinite(lines[5]['loss']) and scales[5] == scales[4]
  applied = [m['loss'] for m in lines if not m['update_skipped']]
  # Measured: overflows at steps 1 and 3 (2**15 -> 2**13), none after;
  # applied losses 19.57 (first 3) -> 16.62 (last 3).
  assert np.mean(applied[-3:]) < np.mean(applied[:3]) - 1.0, applied
  saved = saved_state(workdir, 24)['loss_scale']
  assert int(saved['overflow_skips']) == skips[-1]
  assert float(saved['dynamic']['scale']) == scales[-1]


def fresh_state(config, workdir):
  """(a fresh train state of `config`, its data iterator, its manager on
  workdir's checkpoints), as train.py builds them."""
  mesh, rules = sharding.mesh_from_config(config), sharding.rules(config)
  job = pretraining.make_job(config, workdir, mesh, rules, config.batch_size)
  tx, _ = train_step.make_optimizer(config)
  state, _ = train_step.create_train_state(
      job.model, job.init_inputs, job.stat_keys, tx, config, mesh, rules,
      extra_state=job.loss.extra_state)
  return (state, pipeline.to_iterator(job.train_ds, config),
          checkpoint.make_manager(workdir, config))


def test_a_checkpoint_resumes_in_another_dtype(world_dir, tmp_path):
  """model.dtype may change on resume (resume='allow_changes'): a float16
  checkpoint restored in float32 drops its loss scale; a float32 one
  restored in float16 starts a fresh scale. Restored into a fresh state's
  layout, as train.py does, so the compiled step sees the types it
  expects."""
  workdir = str(tmp_path)
  config16 = float16_tiny(world_dir)
  state16, data16, manager = fresh_state(config16, workdir)
  scaled = state16.replace(step=jnp.int32(7), loss_scale=(
      state16.loss_scale.replace(overflow_skips=jnp.int32(3))))
  checkpoint.save(manager, 7, scaled, data16, config16)
  config32 = shared_tiny(world_dir, resume='allow_changes')
  state32, data32, manager32 = fresh_state(config32, workdir)
  restored = checkpoint.restore(manager32, state32, data32)
  assert type(restored) is train_step.TrainState
  assert leaf_types(restored) == leaf_types(state32)
  assert int(restored.step) == 7
  assert_trees_equal(restored.params, state16.params, min_leaves=20)

  checkpoint.save(manager32, 8, restored.replace(step=jnp.int32(8)), data32,
                  config32)
  restored = checkpoint.restore(manager, state16, data16, step=8)
  assert type(restored) is train_step.ScaledTrainState
  assert leaf_types(restored) == leaf_types(state16)
  assert int(restored.step) == 8
  assert float(restored.loss_scale.dynamic.scale) == 2.0 ** 15
  assert int(restored.loss_scale.overflow_skips) == 0
  manager.close()
  manager32.close()


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_dropout_keeps_one_minus_rate_and_rescales(impl):
  """layers.Dropout: keeps 1 - rate of the entries (16-bit draws for
  Threefry keys, jax.random.bernoulli for others), scales them by
  1 / (1 - rate), draws a new mask per key and passes x through when
  deterministic."""
  x = jnp.ones((8, 16, 1000), jnp.float32)
  drop = layers.Dropout(0.1)
  key = jax.random.key(0, impl=impl)
  y = drop.apply({}, x, False, rngs={'dropout': key})
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.005, kept.mean()
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  other = drop.apply({}, x, False,
                     rngs={'dropout': jax.random.key(1, impl=impl)})
  assert 0.75 < np.mean(kept == (np.asarray(other) != 0)) < 0.9
  assert drop.apply({}, x, True) is x
  assert np.all(np.asarray(layers.Dropout(1.0).apply(
      {}, x, False, rngs={'dropout': key})) == 0)
  # Odd sizes: the draws are cut to the mask's size.
  assert layers.keep_mask(key, 0.5, (3, 7)).shape == (3, 7)
