"""Mixed precision (config.model.dtype) and rematerialisation
(config.model.remat) of the CMAL model, on the tiny config.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import objectives
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.model.layers import REMAT_POLICIES
from cmal_testutil import CLS, MASK, PAD, SEP, VOCAB, random_batch
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
