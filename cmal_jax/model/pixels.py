"""Pixel backbone: images -> a feature map -> one feature vector per region.

For plain image files (docs/design.md §3): region features come from a
small backbone trained end to end with the rest of the model, pooled by
RoIAlign over the given boxes, or over a G x G grid of cells when an image
has no boxes. Its output stands where a detector's region_feats [B, R, F]
would (F = PixelConfig.width), next to region_boxes [B, R, 4] and
region_mask [B, R].

Two kinds, both with a feature map of stride patch_size (H' = H / patch_size):
  'cnn'    log2(patch_size) stride-2 3x3 convolutions (LayerNorm, GELU),
           widening to `width`;
  'patch'  a ViT-style patch embedding, a patch_size x patch_size
           convolution of stride patch_size, then LayerNorm;
each followed by `depth` residual blocks (a depthwise 3x3 convolution for
spatial mixing, LayerNorm and a pointwise MLP, as in ConvNeXt) and a final
LayerNorm.

Parameters are float32 and computed in cfg.dtype, as in layers.py. Every
kernel names its output channels 'feature' (its other dimensions are
unnamed: Flax allows a name once per array), norms and biases likewise:
every sharding preset replicates 'feature', and a backbone this small costs
less to copy to each device than the collectives that sharding it would add.
Activations are batch-sharded.
"""

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cmal_jax.model import axes
from cmal_jax.model.roi_align import roi_pool_mean
from cmal_jax.model.layers import PARAM_DTYPE, dense

KINDS = ('cnn', 'patch')

# ImageNet channel statistics: images in [0, 1] are centred with these.
_PIXEL_MEAN = (0.485, 0.456, 0.406)
_PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PixelConfig:
  """The pixel backbone's shape and pooling."""
  kind: str = 'patch'  # 'cnn' | 'patch'.
  width: int = 128  # Channels C of the feature map = the region feature width.
  depth: int = 2  # Residual conv/MLP blocks after the downsampling.
  patch_size: int = 16  # Image pixels per feature-map cell (the stride).
  roi_size: int = 7  # RoIAlign bins per side (P).
  sampling_ratio: int = 2  # Bilinear samples per bin and axis (S > 0).
  grid_size: int = 6  # Regions per side when an image has no boxes (G).
  mlp_ratio: int = 4  # Hidden width of each block's MLP, over `width`.
  dtype: jnp.dtype = jnp.float32  # Compute dtype; parameters stay float32.

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'PixelConfig.kind={self.kind!r}: one of {KINDS}.')
    if self.kind == 'cnn' and (self.patch_size < 2 or
                               self.patch_size & (self.patch_size - 1)):
      raise ValueError(
          f'PixelConfig.patch_size={self.patch_size}: the cnn downsamples '
          'by stride-2 stages, so it must be a power of two >= 2.')
    for name in ('width', 'patch_size', 'roi_size', 'sampling_ratio',
                 'grid_size', 'mlp_ratio'):
      if getattr(self, name) < 1:
        raise ValueError(f'PixelConfig.{name}={getattr(self, name)}: must '
                         'be >= 1.')
    if self.depth < 0:
      raise ValueError(f'PixelConfig.depth={self.depth}: must be >= 0.')

  def feature_map_size(self, image_height, image_width):
    """(H', W') of the feature map of [image_height, image_width] images."""
    for side in (image_height, image_width):
      if side % self.patch_size:
        raise ValueError(
            f'image size {image_height}x{image_width} is not divisible by '
            f'PixelConfig.patch_size={self.patch_size}: resize images to a '
            'multiple of it.')
    return image_height // self.patch_size, image_width // self.patch_size


def pixel_config(model_config):
  """The PixelConfig of config.model.visual when it reads pixels, else None
  (also for configs written before model.visual existed)."""
  visual = model_config.get('visual')
  if visual is None or visual.get('input', 'regions') != 'pixels':
    return None
  return PixelConfig(
      kind=visual.kind, width=visual.width, depth=visual.depth,
      patch_size=visual.patch_size, roi_size=visual.roi_size,
      sampling_ratio=visual.sampling_ratio, grid_size=visual.grid_size,
      dtype=jnp.dtype(model_config.get('dtype', 'float32')))


def reads_pixels(config) -> bool:
  """Whether the model reads images (model.visual.input='pixels') rather
  than region features. Configs written before the field read regions."""
  visual = config.model.get('visual')
  return visual is not None and visual.get('input', 'regions') == 'pixels'


# ---------------------------------------------------------------------------
# Layers with float32 parameters named for the sharding rules.


def _conv_kernel_init(key, shape, dtype=PARAM_DTYPE):
  """LeCun normal for a conv kernel [k, k, C_in, C_out], drawn as the
  [k * k * C_in, C_out] matrix it is (same fan-in, same distribution):
  XLA:CPU compiles rank-4 random draws several times slower."""
  matrix = nn.initializers.lecun_normal()(key, (math.prod(shape[:-1]),
                                                shape[-1]), dtype)
  return matrix.reshape(shape)


def _conv(features, kernel_size, stride, cfg, name, groups=1,
          padding='SAME'):
  """nn.Conv [k, k, C_in / groups, features] in the compute dtype. SAME
  padding maps n cells to ceil(n / stride)."""
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=padding, feature_group_count=groups, dtype=cfg.dtype,
      param_dtype=PARAM_DTYPE, name=name,
      kernel_init=axes.init(_conv_kernel_init, (None, None, None, 'feature')),
      bias_init=axes.init(nn.initializers.zeros, ('feature',)))


def _channel_norm(cfg, name):
  """LayerNorm over channels (statistics in float32, as layers.layer_norm)."""
  return nn.LayerNorm(
      epsilon=1e-6, dtype=cfg.dtype, param_dtype=PARAM_DTYPE, name=name,
      scale_init=axes.init(nn.initializers.ones, ('feature',)),
      bias_init=axes.init(nn.initializers.zeros, ('feature',)))


def _gelu(x):
  return nn.gelu(x, approximate=False)


def _constrain_map(x):
  """Sharding hint for a feature map [B, H, W, C]: batch-sharded."""
  return axes.constrain(x, ('batch', None, None, 'feature'))


class ConvMlpBlock(nn.Module):
  """x + MLP(LayerNorm(depthwise 3x3 conv(x))) on [B, H, W, C]."""
  cfg: PixelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    C = x.shape[-1]
    h = _conv(C, 3, 1, cfg, 'depthwise', groups=C)(x)
    h = _channel_norm(cfg, 'norm')(h)
    h = _gelu(dense(cfg.mlp_ratio * C, cfg, 'expand', (None, 'feature'))(h))
    # BERT-scale init (std 0.02): each block starts near the identity.
    h = dense(C, cfg, 'project', (None, 'feature'))(h)
    return _constrain_map(x + h)


def _stage_widths(cfg):
  """The cnn's channels per stride-2 stage, doubling up to cfg.width."""
  num_stages = int(math.log2(cfg.patch_size))
  return [max(cfg.width >> (num_stages - 1 - i), min(cfg.width, 8))
          for i in range(num_stages)]


def _normalise_pixels(images):
  """[B, H, W, 3] in [0, 1] (float) or [0, 255] (integer dtypes) ->
  float32 centred by the ImageNet channel mean and std."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  mean = jnp.asarray(_PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(_PIXEL_STD, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


# ---------------------------------------------------------------------------
# Regions from a feature map (no parameters).


def grid_boxes(grid_size):
  """[G*G, 4] float32 normalised (x1, y1, x2, y2) of a G x G grid tiling
  [0, 1]^2 in row-major order; neighbours share their edges exactly."""
  edges = np.arange(grid_size + 1, dtype=np.float64) / grid_size
  edges = edges.astype(np.float32)  # One rounding: shared edges stay equal.
  row, col = np.meshgrid(np.arange(grid_size), np.arange(grid_size),
                         indexing='ij')
  row, col = row.ravel(), col.ravel()
  return np.stack([edges[col], edges[row], edges[col + 1], edges[row + 1]],
                  axis=-1)


def pool_regions(feature_map, boxes, region_mask, roi_size, sampling_ratio):
  """feature_map [B, H', W', C], boxes [B, R, 4], region_mask [B, R]
  -> region_feats [B, R, C]: RoIAlign (roi_size x roi_size bins) averaged
  over its bins; zero where the mask is 0 (padding)."""
  pooled = roi_pool_mean(feature_map, boxes, (roi_size, roi_size),
                         sampling_ratio, True)
  keep = (region_mask > 0)[..., None]
  return axes.constrain(jnp.where(keep, pooled, 0),
                        ('batch', 'length', 'feature'))


def grid_regions(feature_map, grid_size, roi_size, sampling_ratio):
  """feature_map [B, H', W', C] -> (region_feats [B, G*G, C], region_boxes
  [B, G*G, 4] float32, region_mask [B, G*G] int32 ones): the cells of a
  G x G grid as regions, pooled exactly as given boxes are."""
  B = feature_map.shape[0]
  boxes = jnp.broadcast_to(jnp.asarray(grid_boxes(grid_size)),
                           (B, grid_size * grid_size, 4))
  mask = jnp.ones((B, grid_size * grid_size), jnp.int32)
  feats = pool_regions(feature_map, boxes, mask, roi_size, sampling_ratio)
  return feats, boxes, mask


# ---------------------------------------------------------------------------
# The backbone.


class PixelBackbone(nn.Module):
  """Images [B, H, W, 3] -> feature map [B, H / p, W / p, width] (p =
  patch_size), and region features from it (regions_from_pixels,
  grid_from_pixels).

  Images: float in [0, 1], or uint8 in [0, 255] (a quarter of the bytes to
  ship to the device); all of one fixed size divisible by patch_size.
  """
  cfg: PixelConfig

  @nn.compact
  def __call__(self, images, patch_masked=None):
    """images [B, H, W, 3] -> feature map [B, H', W', width] in cfg.dtype.

    patch_masked [B, H' * W'] bool (cells in row-major order; kind 'patch'):
    those patch embeddings are replaced by a learned mask token before the
    blocks (SemMIM's masked image modelling), so no block sees their pixels.
    """
    cfg = self.cfg
    map_h, map_w = cfg.feature_map_size(images.shape[1], images.shape[2])
    x = _normalise_pixels(images).astype(cfg.dtype)
    if cfg.kind == 'cnn':
      for i, width in enumerate(_stage_widths(cfg)):
        x = _conv(width, 3, 2, cfg, f'stage_{i}')(x)
        x = _gelu(_channel_norm(cfg, f'stage_{i}_norm')(x))
    else:
      # Non-overlapping p x p patches: cell j covers pixels [j p, (j + 1) p),
      # the map-covers-the-image geometry roi_align assumes.
      p = cfg.patch_size
      x = _conv(cfg.width, p, p, cfg, 'patch_embed', padding='VALID')(x)
      x = _channel_norm(cfg, 'patch_norm')(x)
    if patch_masked is not None:
      if cfg.kind != 'patch':  # A cnn's overlapping stages would leak.
        raise ValueError(f'patch_masked needs PixelConfig.kind=patch, not '
                         f'{cfg.kind!r}')
      token = self.param('mask_token', axes.init(nn.initializers.normal(0.02),
                                                 ('feature',)),
                         (cfg.width,), PARAM_DTYPE)
      where = patch_masked.reshape(-1, map_h, map_w, 1)
      x = jnp.where(where, token.astype(x.dtype), x)
    x = _constrain_map(x)
    for i in range(cfg.depth):
      x = ConvMlpBlock(cfg, name=f'block_{i}')(x)
    return _constrain_map(_channel_norm(cfg, 'final_norm')(x))

  def regions_from_pixels(self, images, boxes, region_mask,
                          patch_masked=None):
    """images [B, H, W, 3], boxes [B, R, 4] (normalised x1, y1, x2, y2),
    region_mask [B, R] -> region_feats [B, R, width] in cfg.dtype, zero on
    padding. patch_masked: see __call__."""
    cfg = self.cfg
    return pool_regions(self(images, patch_masked), boxes, region_mask,
                        cfg.roi_size, cfg.sampling_ratio)

  def grid_from_pixels(self, images):
    """images [B, H, W, 3] -> (region_feats [B, G*G, width], region_boxes
    [B, G*G, 4], region_mask [B, G*G]) for images without boxes."""
    cfg = self.cfg
    return grid_regions(self(images), cfg.grid_size, cfg.roi_size,
                        cfg.sampling_ratio)
