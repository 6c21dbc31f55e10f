"""SemMIM (configs/pretrain.py:tiny,semmim; cmal_jax/recipes/semmim.py): the
momentum encoder's update and that it is never differentiated, text-guided
masking, Sinkhorn-Knopp targets, the backbone's patch mask token, the grid
of patches as regions, the config checks, and one short pre-training run
fine-tuned from.

The train-step tests run the tiny semmim config shrunk further (D = 16,
32-pixel images: 2 x 2 patches) so that its one compilation is cheap; the
end-to-end runs use shrink, as test_semvlp.py.
"""

import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import (checkpoint, configlib, jobs, objectives, pretraining,
                      sharding, train_step)
from cmal_jax.data import pipeline
from cmal_jax.recipes import semmim
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.model.pixels import pixel_config
from cmal_jax.model.pixels import (PixelBackbone, PixelConfig, grid_boxes,
                                   grid_regions)
from cmal_jax.model.pixels import reads_pixels
from cmal_testutil import (CLS, MASK, PAD, SEP, assert_trees_equal,
                           fast_step, finetune_tiny, saved_state, shrink)
from configs import finetune as finetune_config
from configs import pretrain

VOCAB_SIZE = 512
SPECIALS = objectives.SpecialTokens(PAD, CLS, SEP, MASK, VOCAB_SIZE)


# ------------------------------------------------------- momentum encoder

def test_ema_update_is_exact_per_leaf():
  rng = np.random.default_rng(0)
  ema = {'a': rng.normal(size=(3, 4)).astype(np.float32),
         'b': {'c': rng.normal(size=(5,)).astype(np.float32)}}
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(
      np.float32), ema)
  for m in (0.0, 0.9, 0.99, 1.0):
    out = semmim.ema_update(ema, params, m)
    assert jax.tree.structure(out) == jax.tree.structure(ema)
    for e, p, o in zip(jax.tree.leaves(ema), jax.tree.leaves(params),
                       jax.tree.leaves(out)):
      assert o.dtype == np.float32
      np.testing.assert_array_equal(
          np.asarray(o), np.float32(m) * e + np.float32(1 - m) * p)
  # m = 1 keeps the momentum encoder, m = 0 copies the parameters.
  assert_trees_equal(semmim.ema_update(ema, params, 1.0), ema)
  assert_trees_equal(semmim.ema_update(ema, params, 0.0), params)


def test_uses_target_encoder():
  assert semmim.uses_target_encoder(pretrain.get_config('tiny,semmim'))
  for recipe in ('cmal', 'cmcl', 'mlm_itm', 'semvlp'):
    assert not semmim.uses_target_encoder(
        pretrain.get_config(f'tiny,{recipe}')), recipe
  c = pretrain.get_config('tiny,semmim')
  c.loss.mim = 0.0  # The agreement loss alone still needs it.
  assert semmim.uses_target_encoder(c)
  c.loss.agreement = 0.0
  assert not semmim.uses_target_encoder(c)
  # Fine-tuning configs have no loss section.
  assert not semmim.uses_target_encoder(
      finetune_config.get_config('ve,tiny,semmim'))


def small_semmim_config():
  """tiny,semmim with D = 16, no text/vision layers, 32-pixel images (a
  2 x 2 grid of 16-pixel patches), K = 8, m = 0.9 and no warmup (so the
  first step moves the parameters)."""
  c = pretrain.get_config('tiny,semmim')
  m, v = c.model, c.model.visual
  m.hidden_dim, m.num_heads, m.mlp_dim = 16, 2, 32
  m.text_layers, m.vision_layers, m.unified_layers = 0, 0, 1
  m.vocab_size, m.prototypes = VOCAB_SIZE, 8
  v.image_size, v.width, v.depth = 32, 16, 1
  v.grid_size = v.image_size // v.patch_size
  c.data.max_regions, c.data.max_text_len, c.data.max_anchors = 4, 10, 2
  c.batch_size, c.total_steps = 4, 10
  c.semmim.ema_momentum = 0.9
  c.optim.warmup_fraction, c.optim.lr = 0.0, 1e-2
  configlib.validate(c)
  return c


def host_batch(config, seed):
  """A pipeline-like pixel batch of config's shapes: the grid's boxes,
  random images and captions; rows 0, 1, 3 matched, row 2 a negative."""
  rng = np.random.default_rng(seed)
  B, T = config.batch_size, config.data.max_text_len
  G = config.model.visual.grid_size
  S, K = config.model.visual.image_size, config.data.max_anchors
  ids = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), np.int32)
  for i, n in enumerate((10, 7, 5, 8)):
    ids[i, :n] = [CLS] + list(rng.integers(110, VOCAB_SIZE, n - 2)) + [SEP]
    mask[i, :n] = 1
  z = lambda *shape, dtype=np.int32: np.zeros((B,) + shape, dtype)
  batch = dict(
      input_ids=ids, text_mask=mask,
      images=rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8),
      region_boxes=np.broadcast_to(grid_boxes(G), (B, G * G, 4)).copy(),
      region_mask=np.ones((B, G * G), np.int32),
      region_tags=np.full((B, G * G), -1, np.int32),
      anchor_text_pos=z(K), anchor_text_end=z(K), anchor_region=z(K),
      anchor_valid=z(K, dtype=bool),
      itm_label=np.array([1, 1, 0, 1], np.int32))
  batch['stats'] = {k: z() for k in pipeline.stat_keys(config)}
  return batch


@pytest.fixture(scope='module')
def semmim_state():
  """(config, model, loss, state, step fn, mesh) of the shrunk config."""
  c = small_semmim_config()
  model = CMAL(ModelConfig.from_config(c.model, num_tags=10))
  init_inputs, loss = pretraining.pretrain_objectives(model, c, SPECIALS)
  tx, schedule = train_step.make_optimizer(c)
  mesh = sharding.mesh_from_config(c)
  state, _ = train_step.create_train_state(
      model, init_inputs, pipeline.stat_keys(c), tx, c, mesh,
      sharding.rules(c), extra_state=loss.extra_state)
  step = jax.jit(train_step.make_train_step(loss, c, schedule))
  return c, model, loss, state, step, mesh


def test_train_step_moves_the_momentum_encoder(semmim_state):
  c, _, _, state, step, mesh = semmim_state
  m = c.semmim.ema_momentum
  # The momentum encoder starts as a copy of the parameters.
  assert state.extra is not None
  assert_trees_equal(state.extra['ema_params'], state.params, min_leaves=20)
  assert 'mask_token' in state.params['pixels']
  assert 'prototype_head' in state.params
  states = [state]
  # Device arrays made outside the mesh context in every test here, so they
  # all reuse the step's one compilation.
  batches = [jax.tree.map(jnp.asarray, host_batch(c, seed)) for seed in (1, 2)]
  with jax.set_mesh(mesh):
    for batch in batches:
      new, metrics = step(states[-1], batch)
      metrics = jax.device_get(metrics)
      for key in ('loss', 'loss_mim', 'loss_agreement', 'loss_itc',
                  'loss_mlm', 'acc_mim'):
        assert math.isfinite(float(metrics[key])), (key, metrics)
      assert float(metrics['loss_mim']) > 0
      assert not bool(metrics['update_skipped'])
      states.append(new)
  for old, new in zip(states, states[1:]):
    old_ema, params, ema = map(jax.device_get, (old.extra['ema_params'], new.params,
                                                new.extra['ema_params']))
    moved = max(float(np.abs(p - q).max()) for p, q in zip(
        jax.tree.leaves(params), jax.tree.leaves(old.params)))
    assert moved > 1e-3, moved  # The step updated the parameters...
    for (path, e0), p, e in zip(jax.tree_util.tree_leaves_with_path(old_ema),
                                jax.tree.leaves(params),
                                jax.tree.leaves(ema)):
      # ...and the momentum encoder followed them by (1 - m).
      np.testing.assert_allclose(e, m * e0 + (1 - m) * p, rtol=0, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
    lag = max(float(np.abs(p - e).max()) for p, e in zip(
        jax.tree.leaves(params), jax.tree.leaves(ema)))
    assert lag > 1e-4, lag  # Not a copy of the parameters.
  assert int(states[-1].step) == 2


def test_momentum_encoder_is_not_differentiated(semmim_state):
  c, _, loss, state, step, mesh = semmim_state
  batch = jax.tree.map(jnp.asarray, host_batch(c, 3))
  stats = batch.pop('stats')
  key = jax.random.key(0)
  # The gradients a step applies have the parameters' structure, no EMA.
  grads = jax.eval_shape(lambda s, b: train_step.loss_and_grads(
      loss, s.params, b, key, 1, s)[0], state, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(state.params)

  def loss_of_ema(ema, batch):
    """The loss as a function of the momentum encoder: it reaches the loss
    through the targets and the text-guided mask only."""
    prepared = loss.prepare(batch, key, state.replace(extra={'ema_params': ema}))
    return loss.loss(state.params, prepared, key,
                     loss.denominators(prepared))[0]

  rng = np.random.default_rng(0)
  other = jax.tree.map(lambda x: x + rng.normal(0, 0.5, x.shape).astype(
      x.dtype), jax.device_get(state.extra['ema_params']))
  # Placed as the state's arrays, so the step's compilation is reused.
  other = jax.device_put(other, jax.tree.map(lambda x: x.sharding,
                                             state.extra['ema_params']))
  grad = jax.jit(jax.grad(loss_of_ema))
  with jax.set_mesh(mesh):
    for ema in (state.extra['ema_params'], other):
      for path, g in jax.tree_util.tree_leaves_with_path(grad(ema, batch)):
        assert not np.asarray(g).any(), jax.tree_util.keystr(path)
    # Yet the loss does depend on it (the targets are the EMA's): the same
    # step from another momentum encoder sees another loss.
    batch['stats'] = stats
    losses = [float(step(s, batch)[1]['loss'])
              for s in (state, state.replace(extra={'ema_params': other}))]
  assert all(math.isfinite(v) for v in losses)
  assert abs(losses[0] - losses[1]) > 1e-3, losses
  # Without a train state there is no momentum encoder to read.
  del batch['stats']
  with pytest.raises(ValueError, match='SemMIM needs the momentum encoder'):
    loss.prepare(batch, key, None)


def test_batch_without_a_matched_pair_trains(semmim_state):
  """Regression: with no positive row Sinkhorn had no weighted row and gave
  NaN targets (weighted by zero), so the gradients were NaN and the update
  was skipped."""
  c, _, _, state, step, mesh = semmim_state
  batch = jax.tree.map(jnp.asarray, host_batch(c, 4))
  batch['itm_label'] = jnp.zeros_like(batch['itm_label'])
  with jax.set_mesh(mesh):
    _, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert math.isfinite(float(metrics['loss'])), metrics
  assert math.isfinite(float(metrics['grad_norm'])), metrics
  assert not bool(metrics['update_skipped'])
  # Nothing to score for MIM and agreement (both weighted by matched pairs).
  assert float(metrics['loss_mim']) == 0 and float(
      metrics['loss_agreement']) == 0


# ------------------------------------------------------- text-guided mask

def test_text_guided_mask_takes_the_most_related_patches():
  # Relevance with a known order; row 1 has three padding regions (mask 0)
  # with the highest relevance, which must never be masked; row 2 two real
  # patches (0.4 * 2 < 1: still one).
  relevance = np.array([
      [0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.05, 0.6, 0.4, 0.5],
      [0.5, 0.1, 0.6, 0.2, 0.3, 0.4, 0.05, 0.9, 0.95, 0.99],
      [0.2, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]], np.float32)
  region_mask = np.ones((3, 10), np.int32)
  region_mask[1, 7:] = 0
  region_mask[2, 2:] = 0
  expected = np.zeros((3, 10), bool)
  expected[0, [1, 3, 5, 7]] = True  # round(0.4 * 10) = 4 highest.
  expected[1, [2, 0, 5]] = True  # round(0.4 * 7) = 3 highest real ones.
  expected[2, 0] = True  # max(1, round(0.8)) = 1.
  fn = jax.jit(semmim.text_guided_mask, static_argnums=2)
  mask = np.asarray(fn(relevance, region_mask, 0.4))
  assert mask.shape == (3, 10) and mask.dtype == bool
  np.testing.assert_array_equal(mask, expected)
  # Other relevance values, the same compiled function (static shapes).
  flipped = np.asarray(fn(1.0 - relevance, region_mask, 0.4))
  assert fn._cache_size() == 1
  flipped_expected = np.zeros((3, 10), bool)
  flipped_expected[0, [6, 0, 4, 2]] = True
  flipped_expected[1, [6, 1, 3]] = True
  flipped_expected[2, 1] = True
  np.testing.assert_array_equal(flipped, flipped_expected)
  # A small ratio: at least one patch per image.
  tiny = np.asarray(fn(relevance, region_mask, 0.05))
  np.testing.assert_array_equal(tiny.sum(1), [1, 1, 1])
  np.testing.assert_array_equal(np.argmax(tiny, 1), [1, 2, 0])


def test_text_guided_mask_with_noise_keeps_the_count():
  rng = np.random.default_rng(0)
  B, R = 4, 16
  relevance = rng.uniform(0, 1, (B, R)).astype(np.float32)
  region_mask = (np.arange(R)[None] < np.array([[16], [12], [5], [1]])
                 ).astype(np.int32)
  fn = jax.jit(lambda rel, key, noise: semmim.text_guided_mask(
      rel, region_mask, 0.4, key, noise), static_argnums=2)
  chosen = []
  for seed in range(8):
    mask = np.asarray(fn(relevance, jax.random.key(seed), 1.0))
    np.testing.assert_array_equal(mask.sum(1), [6, 5, 2, 1])  # round(0.4 n)
    assert not mask[region_mask == 0].any()
    chosen.append(mask)
  # Noise samples: the sets vary with the key.
  assert len({m.tobytes() for m in chosen}) > 1
  # Vanishing noise is the plain top-k.
  plain = np.asarray(semmim.text_guided_mask(relevance, region_mask, 0.4))
  np.testing.assert_array_equal(
      np.asarray(fn(relevance, jax.random.key(0), 1e-6)), plain)


def test_text_relevance_on_a_hand_built_attention():
  # [B=1, H=2, L=5, L]: text slots 0-2 (2 is padding), regions 3-4 (4 is
  # padding). Arbitrary values: only the text -> region block is read.
  attention = np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
  text_mask = np.array([[1, 1, 0]])
  region_mask = np.array([[1, 0]])
  out = np.asarray(semmim.text_relevance(attention, text_mask, region_mask))
  assert out.shape == (1, 2)
  # Region 3: mean over heads of query rows 0 and 1 at key column 3.
  heads_mean = attention[0].mean(0)  # [5, 5]
  np.testing.assert_allclose(out[0, 0], (heads_mean[0, 3] + heads_mean[1, 3])
                             / 2, rtol=1e-6)
  assert out[0, 0] == pytest.approx(((3 + 28) / 2 + (8 + 33) / 2) / 2)
  assert out[0, 1] == -np.inf
  # A caption of no real token gives 0 (not NaN) on the real regions.
  empty = np.asarray(semmim.text_relevance(attention, np.zeros((1, 3)),
                                           region_mask))
  assert empty[0, 0] == 0 and empty[0, 1] == -np.inf


# ---------------------------------------------------------------- Sinkhorn

def test_sinkhorn_rows_and_balanced_columns():
  rng = np.random.default_rng(0)
  K, temperature = 4, 0.1
  logits = rng.normal(0, 0.1, (3, 8, K)).astype(np.float32)
  logits[..., 0] += 1.0  # Every row prefers prototype 0...
  weights = rng.random((3, 8)) < 0.7
  weights[0, 0], weights[0, 1] = True, False
  n = weights.sum()
  # ...so much that a plain softmax puts nearly everything on it.
  softmax = np.asarray(jax.nn.softmax(logits / temperature))
  assert softmax[weights].sum(0)[0] > 0.9 * n
  fn = jax.jit(semmim.sinkhorn_knopp, static_argnums=(2, 3))
  for iterations in (1, 3, 50):
    q = np.asarray(fn(logits, weights, temperature, iterations))
    assert q.shape == logits.shape and (q >= 0).all()
    rows = q.sum(-1)
    np.testing.assert_allclose(rows[weights], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(rows[~weights], 0.0)
  # Enough iterations balance the prototypes over the weighted rows: each
  # takes n / K of them.
  np.testing.assert_allclose(q[weights].sum(0), n / K, rtol=1e-3)
  # The unweighted rows take no part: other logits there change nothing.
  noisy = np.where(weights[..., None], logits, 50.0 * rng.normal(
      size=logits.shape)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(fn(noisy, weights, temperature, 50)),
                             q, rtol=1e-5, atol=1e-7)
  # No weighted row at all (a batch without a matched pair): all zeros,
  # not NaN (which soft_xent's zero weights would not cancel).
  none = np.asarray(fn(logits, np.zeros_like(weights), temperature, 3))
  np.testing.assert_array_equal(none, 0.0)


# -------------------------------------------------------- patch mask token

def test_masked_patches_do_not_see_their_pixels():
  cfg = PixelConfig(kind='patch', width=8, depth=1, patch_size=8, roi_size=1,
                    sampling_ratio=1, grid_size=4, mlp_ratio=2)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  masked = np.zeros((2, 16), bool)
  masked[0, [5, 10]] = True  # Cells (1, 1) and (2, 2) of image 0.
  masked[1, 0] = True
  model = PixelBackbone(cfg)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images,
                                           masked))
  assert variables['params']['mask_token'].shape == (8,)
  apply = jax.jit(model.apply)
  base = np.asarray(apply(variables, images, masked))
  assert base.shape == (2, 4, 4, 8)

  def repaint(row, col, image=0):
    out = images.copy()
    out[image, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 1 - out[
        image, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
    return out

  # A masked patch's pixels reach nothing, not even through the blocks'
  # 3 x 3 mixing: the whole map is bitwise the same.
  np.testing.assert_array_equal(
      np.asarray(apply(variables, repaint(1, 1), masked)), base)
  np.testing.assert_array_equal(
      np.asarray(apply(variables, repaint(0, 0, image=1), masked)), base)
  # An unmasked patch's pixels change its cell (and only its neighbours).
  changed = np.asarray(apply(variables, repaint(3, 3), masked))
  diff = np.abs(changed - base).max(-1)[0]  # [4, 4]
  assert diff[3, 3] > 1e-3
  assert (diff[:2] == 0).all() and (diff[:, :2] == 0).all()
  np.testing.assert_array_equal(changed[1], base[1])
  # Unmasked, the same repaint changes the masked cell.
  unmasked = np.zeros_like(masked)
  a = np.asarray(apply(variables, images, unmasked))
  b = np.asarray(apply(variables, repaint(1, 1), unmasked))
  assert np.abs(a - b)[0, 1, 1].max() > 1e-3
  # A cnn's overlapping stages would leak the masked pixels: refused.
  with pytest.raises(ValueError, match='patch_masked needs PixelConfig.kind'):
    jax.eval_shape(PixelBackbone(PixelConfig(kind='cnn', width=8, depth=0,
                                             patch_size=8)).init,
                   jax.random.key(0), images, masked)


def test_semmim_grid_regions_are_the_feature_map_cells():
  c = pretrain.get_config('tiny,semmim')
  cfg = pixel_config(c.model)
  G = c.model.visual.image_size // cfg.patch_size
  assert (cfg.kind, cfg.roi_size, cfg.sampling_ratio, cfg.grid_size) == (
      'patch', 1, 1, G)
  assert c.data.max_regions == G * G
  fmap = np.random.default_rng(0).normal(size=(2, G, G, 5)).astype(
      np.float32)
  feats, boxes, mask = jax.jit(grid_regions, static_argnums=(1, 2, 3))(
      fmap, cfg.grid_size, cfg.roi_size, cfg.sampling_ratio)
  assert feats.shape == (2, G * G, 5)
  np.testing.assert_allclose(np.asarray(feats), fmap.reshape(2, G * G, 5),
                             rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask), 1)
  # Region r is cell (r // G, r % G): row-major, as patch_masked is.
  r = 6
  np.testing.assert_allclose(np.asarray(boxes[0, r]), np.array(
      [r % G, r // G, r % G + 1, r // G + 1], np.float32) / G, atol=1e-7)


# ------------------------------------------------------------------ config

def test_config_checks_name_the_field():
  configlib.validate(pretrain.get_config('tiny,semmim'))
  c = pretrain.get_config('tiny,semmim')
  c.model.visual.boxes = 'given'
  with pytest.raises(ValueError, match=r"config\.model\.visual\.boxes='given'"
                     r'.*SemMIM'):
    configlib.validate(c)
  for field, value, match in (
      ('prototypes', 1, r'config\.model\.prototypes=1'),
      ('unified_layers', 0, r'config\.model\.unified_layers=0')):
    c = pretrain.get_config('tiny,semmim')
    c.model[field] = value
    with pytest.raises(ValueError, match=match):
      configlib.validate(c)
  c = pretrain.get_config('tiny,semmim')
  c.semmim.mask_ratio = 1.0
  with pytest.raises(ValueError, match=r'config\.semmim\.mask_ratio=1\.0'):
    configlib.validate(c)
  c = pretrain.get_config('tiny,semmim')
  c.semmim.sinkhorn_iterations = 0  # Rows would not be distributions.
  with pytest.raises(ValueError,
                     match=r'config\.semmim\.sinkhorn_iterations=0'):
    configlib.validate(c)
  c = pretrain.get_config('tiny,semmim')
  c.loss.mask_anchors = True
  c.cmap.enabled = True
  with pytest.raises(ValueError, match=r'config\.loss\.mask_anchors=True'):
    configlib.validate(c)
  c = pretrain.get_config('tiny,semmim')
  c.model.visual.grid_size = 3  # Not the 4 x 4 patches of 64 / 16.
  with pytest.raises(ValueError, match=r'config\.model\.visual\.grid_size=3'):
    configlib.validate(c)


# ------------------------------------------------------------ end to end

STEPS = 20
LOG_EVERY = 5


@pytest.fixture(scope='module')
def semmim_pretrained(tmp_path_factory):
  """(workdir, config, results) of 20 steps of tiny,semmim (shrunk as
  test_semvlp's run) on a 256-pair world, checkpointed at steps 19 and 20."""
  workdir = str(tmp_path_factory.mktemp('semmim'))
  c = fast_step(shrink(pretrain.get_config('tiny,semmim')))
  c.total_steps, c.log_every, c.checkpoint_every = STEPS, LOG_EVERY, STEPS - 1
  c.world.num_train, c.world.num_eval = 256, 32
  c.eval.batch_size, c.eval.retrieval_images = 32, 8
  return workdir, c, jobs.train_and_evaluate(c, workdir)


# Slow (a whole SemMIM run and a fine-tune from it): the default run covers
# its train step, momentum encoder and masks above, and the recipe hooks
# through test_recipes.py.
@pytest.mark.slow
def test_semmim_pretraining_learns(semmim_pretrained):
  workdir, c, results = semmim_pretrained
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f if '"loss"' in l]
  assert len(lines) == STEPS // LOG_EVERY, lines
  first, last = lines[0]['loss'], lines[-1]['loss']
  print(f'semmim: loss {first:.3f} -> {last:.3f}')
  assert last < first - 1.0, (first, last)
  for key in ('loss_mim', 'loss_agreement', 'loss_itc', 'loss_mlm',
              'loss_itm', 'acc_mim'):
    assert all(math.isfinite(l[key]) for l in lines), key
  assert all(l['loss_mim'] > 0 for l in lines)
  assert all(l['nonfinite_skips'] == 0 for l in lines)
  assert 0 <= results['itm_acc'] <= 1
  assert results['data_stats']['skipped_image'] == 0

  # The checkpoints hold the momentum encoder, and between the last two it
  # moved by the rule: ema_20 = m ema_19 + (1 - m) params_20.
  s19, s20 = saved_state(workdir, STEPS - 1), saved_state(workdir, STEPS)
  assert 'ema_params' in s20['extra']
  m = c.semmim.ema_momentum
  flat = lambda tree: dict(jax.tree_util.tree_leaves_with_path(tree))
  ema19, ema20, params20 = (flat(s19['extra']['ema_params']),
                            flat(s20['extra']['ema_params']),
                            flat(s20['params']))
  assert ema20.keys() == params20.keys()
  for path, e in ema20.items():
    np.testing.assert_allclose(e, m * ema19[path] + (1 - m) * params20[path],
                               rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(e - params20[p]).max())
             for p, e in ema20.items()) > 1e-4


@pytest.mark.slow
def test_ve_finetunes_from_the_semmim_checkpoint(semmim_pretrained,
                                                 tmp_path, capsys):
  workdir, _, _ = semmim_pretrained
  c = finetune_tiny('ve', 'semmim', workdir)
  # The task's regions are its records' boxes, pooled from the backbone.
  assert reads_pixels(c) and c.model.visual.boxes == 'given'
  assert c.model.prototypes == 64 and 'semmim' not in c
  capsys.readouterr()
  results = jobs.train_and_evaluate(c, str(tmp_path))
  log = capsys.readouterr().out
  for split in ('val', 'test'):
    assert 0 <= results[split]['accuracy'] <= 1
    assert results[split]['num_examples'] == 16
  # init_from took every encoder and backbone array of the checkpoint but
  # the pre-training mask token, which the task model has no use for.
  pretrained, _ = checkpoint.load_pretrained_params(workdir)
  names = train_step.pretrained_lr(c)[0]
  assert 'pixels' in names and 'mask_token' in pretrained['pixels']
  expected = sum(len(jax.tree.leaves(pretrained[n])) for n in names) - 1
  match = re.search(r'init_from (\S+)/checkpoints/20: (\d+) parameter arrays '
                    r'\(([^)]*)\)', log)
  assert match, log[-3000:]
  assert int(match.group(2)) == expected
  assert 'pixels' in match.group(3)
  tuned, _ = checkpoint.load_pretrained_params(str(tmp_path))
  assert 'mask_token' not in tuned['pixels']
