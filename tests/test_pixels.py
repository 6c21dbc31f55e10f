"""The pixel backbone: shapes, grid regions, padding, gradients, jit,
logical axis names.

Each kind is initialised once (module fixture) and everything runs jitted:
eager Flax compiles op by op, and the initialisers' random draws alone take
seconds to compile on a busy 2-core CPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmal_jax import sharding
from cmal_jax.model.pixels import (PixelBackbone, PixelConfig, grid_boxes,
                                   grid_regions)
from cmal_jax.model.roi_align import roi_pool_mean

B, H, W, R = 2, 32, 48, 5
WIDTH = 16
REGIONS = PixelBackbone.regions_from_pixels
GRID = PixelBackbone.grid_from_pixels


def tiny(kind, **overrides):
  fields = dict(kind=kind, width=WIDTH, depth=1, patch_size=8, roi_size=2,
                sampling_ratio=2, grid_size=3, mlp_ratio=2)
  fields.update(overrides)
  return PixelConfig(**fields)


def inputs(seed=0):
  """images [B, H, W, 3] in [0, 1], boxes [B, R, 4], mask [B, R] with
  image 0's last two regions padding."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (B, H, W, 3)).astype(np.float32)
  corners = rng.uniform(0, 1, (B, R, 2, 2))
  boxes = np.concatenate([corners.min(2), corners.max(2)], -1)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  return jnp.asarray(images), jnp.asarray(boxes, jnp.float32), mask


def apply(cfg, variables, *args, method=None):
  """Jitted PixelBackbone(cfg).apply of `method` (default __call__)."""
  model = PixelBackbone(cfg)
  return jax.jit(lambda v, *a: model.apply(v, *a, method=method))(variables,
                                                                   *args)


@pytest.fixture(scope='module', params=['cnn', 'patch'])
def backbone(request):
  """(cfg, variables) of a tiny backbone of each kind."""
  cfg = tiny(request.param)
  variables = jax.jit(PixelBackbone(cfg).init)(jax.random.key(0),
                                               inputs()[0])
  return cfg, variables


def test_shapes_with_boxes_and_grid(backbone):
  cfg, variables = backbone
  images, boxes, mask = inputs()
  fmap = apply(cfg, variables, images)
  assert fmap.shape == (B, H // 8, W // 8, WIDTH)
  feats = apply(cfg, variables, images, boxes, mask, method=REGIONS)
  assert feats.shape == (B, R, WIDTH) and feats.dtype == jnp.float32
  g_feats, g_boxes, g_mask = apply(cfg, variables, images, method=GRID)
  assert g_feats.shape == (B, 9, WIDTH)
  assert g_boxes.shape == (B, 9, 4) and g_mask.shape == (B, 9)
  np.testing.assert_array_equal(np.asarray(g_mask), 1)
  np.testing.assert_array_equal(np.asarray(g_boxes[0]), grid_boxes(3))
  assert np.isfinite(np.asarray(g_feats)).all()
  # Grid mode is RoIAlign pooling over the grid's boxes.
  np.testing.assert_allclose(
      np.asarray(g_feats),
      np.asarray(roi_pool_mean(fmap, g_boxes, (2, 2), 2)), atol=1e-6)


def test_padded_regions_are_zero(backbone):
  cfg, variables = backbone
  images, boxes, mask = inputs(1)
  feats = np.asarray(apply(cfg, variables, images, boxes, mask,
                           method=REGIONS))
  np.testing.assert_array_equal(feats[0, 3:], 0.0)
  assert (np.abs(feats[0, :3]).sum(-1) > 0).all()
  assert (np.abs(feats[1]).sum(-1) > 0).all()


def test_gradients_reach_every_parameter(backbone):
  cfg, variables = backbone
  images, boxes, mask = inputs(2)
  model = PixelBackbone(cfg)
  target = jax.random.normal(jax.random.key(1), (B, R, WIDTH))

  def loss(params):
    feats = model.apply({'params': params}, images, boxes, mask,
                        method=REGIONS)
    return jnp.sum(feats * target)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(grads))
  assert len(leaves) > 5
  for path, g in leaves:
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, path


def test_jit_matches_eager_and_uint8_images(backbone):
  cfg, variables = backbone
  images, boxes, mask = inputs(3)
  model = PixelBackbone(cfg)
  run = lambda v, x: model.apply(v, x, boxes, mask, method=REGIONS)
  jitted = jax.jit(run)
  np.testing.assert_allclose(np.asarray(jitted(variables, images)),
                             np.asarray(run(variables, images)), atol=1e-5)
  # uint8 in [0, 255] reads as the same image in [0, 1].
  as_uint8 = np.round(np.asarray(images) * 255).astype(np.uint8)
  np.testing.assert_allclose(
      np.asarray(jitted(variables, as_uint8)),
      np.asarray(jitted(variables, jnp.asarray(as_uint8 / 255.0,
                                               jnp.float32))), atol=1e-5)


def test_bfloat16_compute(backbone):
  """The same float32 parameters, computed in bfloat16."""
  cfg, variables = backbone
  leaves = jax.tree.leaves(nn.unbox(variables))
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  images, boxes, mask = inputs(4)
  bf16 = tiny(cfg.kind, dtype=jnp.bfloat16)
  feats = apply(bf16, variables, images, boxes, mask, method=REGIONS)
  assert feats.dtype == jnp.bfloat16
  feats = np.asarray(feats, np.float32)
  assert np.isfinite(feats).all()
  reference = np.asarray(apply(cfg, variables, images, boxes, mask,
                               method=REGIONS))
  # Outputs of a final LayerNorm, O(1): bfloat16 keeps them to ~1e-2.
  assert np.abs(feats - reference).max() < 0.25


def test_parameters_carry_logical_names_every_preset_maps(backbone):
  _, variables = backbone
  specs = jax.tree.leaves(
      nn.get_partition_spec(variables),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs and all('feature' in spec for spec in specs)
  for preset in sharding.PRESETS:
    rules = sharding.rules(
        ml_collections.ConfigDict(dict(sharding=preset, axis_rules=())))
    for spec in specs:
      # Raises on a name used twice; 'feature' is replicated everywhere.
      assert all(a is None for a in nn.logical_to_mesh_axes(spec, rules))


def test_cnn_widens_to_width():
  cfg = tiny('cnn', width=32, patch_size=16)
  shapes = jax.eval_shape(PixelBackbone(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  widths = [shapes[f'stage_{i}']['kernel'].value.shape[-1] for i in range(4)]
  assert widths == [8, 8, 16, 32]


def test_grid_boxes_tile_the_unit_square():
  for G in (1, 3, 6, 7):
    boxes = grid_boxes(G).reshape(G, G, 4)  # [row, col, (x1, y1, x2, y2)]
    assert boxes.dtype == np.float32
    # Outer edges exactly 0 and 1; neighbours share edges exactly.
    np.testing.assert_array_equal(boxes[:, 0, 0], 0.0)
    np.testing.assert_array_equal(boxes[0, :, 1], 0.0)
    np.testing.assert_array_equal(boxes[:, -1, 2], 1.0)
    np.testing.assert_array_equal(boxes[-1, :, 3], 1.0)
    np.testing.assert_array_equal(boxes[:, 1:, 0], boxes[:, :-1, 2])
    np.testing.assert_array_equal(boxes[1:, :, 1], boxes[:-1, :, 3])
    # Each column shares its x edges, each row its y edges.
    np.testing.assert_array_equal(boxes[..., 0], boxes[:1, :, 0].repeat(G, 0))
    np.testing.assert_array_equal(boxes[..., 1], boxes[:, :1, 1].repeat(G, 1))
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    assert (widths > 0).all() and (heights > 0).all()
    np.testing.assert_allclose((widths * heights).sum(), 1.0, rtol=1e-6)


def test_grid_regions_of_a_constant_map():
  fmap = jnp.full((2, 4, 4, 3), 1.5)
  feats, boxes, mask = grid_regions(fmap, 2, 3, 2)
  np.testing.assert_allclose(np.asarray(feats), 1.5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(boxes[1]), grid_boxes(2))
  assert mask.dtype == jnp.int32


def test_bad_configs_and_image_sizes():
  with pytest.raises(ValueError, match='kind'):
    PixelConfig(kind='vit')
  with pytest.raises(ValueError, match='power of two'):
    PixelConfig(kind='cnn', patch_size=12)
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(PixelBackbone(tiny('patch')).init, jax.random.key(0),
                   jnp.zeros((1, 30, 32, 3)))
