"""The static shapes of a pre-training example, zero inputs of those shapes
(for init and shape inference), and the feature-width check every source of
pairs makes (pipeline.py reads records, tfds_source.py a TFDS dataset;
task_pipeline.py checks its folders the same way)."""

import dataclasses

import jax.numpy as jnp

from cmal_jax.model.pixels import reads_pixels


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static per-example shapes: T text, R regions, K anchors, F features.

  Pixels (image_size S > 0): images [S, S, 3] uint8 replace region_feats
  (feature_dim is 0); an image without boxes gets its G x G grid cells
  (grid_size) as regions, and with grid_only every image does (R = G * G).
  """
  max_text_len: int
  max_regions: int
  max_anchors: int
  feature_dim: int
  image_size: int = 0
  grid_size: int = 0
  grid_only: bool = False

  @property
  def pixels(self) -> bool:
    return self.image_size > 0

  @classmethod
  def from_config(cls, config):
    d = config.data
    if not reads_pixels(config):
      return cls(d.max_text_len, d.max_regions, d.max_anchors,
                 config.model.region_feat_dim)
    v = config.model.visual
    grid_only = v.boxes == 'grid'
    return cls(d.max_text_len, v.grid_size ** 2 if grid_only
               else d.max_regions, d.max_anchors, 0, v.image_size,
               v.grid_size, grid_only)


def zero_inputs(shapes, rows, pretrain=False):
  """Zeros with these shapes, [rows, ...]: what every task's model reads
  (input_ids, text_mask [rows, T]; region_boxes [rows, R, 4]; region_mask
  [rows, R]; and images [rows, S, S, 3] uint8 when shapes.pixels, else
  region_feats [rows, R, F]). pretrain adds the rest of a pre-training batch
  (anchor_text_pos, anchor_text_end, anchor_region, anchor_valid [rows, K];
  region_tags [rows, R]; itm_label [rows]), what the corruption
  (objectives.prepare_inputs) turns into the model's inputs."""
  T, R, K = shapes.max_text_len, shapes.max_regions, shapes.max_anchors
  z = lambda *s, dtype=jnp.int32: jnp.zeros((rows,) + s, dtype)
  inputs = dict(input_ids=z(T), text_mask=z(T),
                region_boxes=z(R, 4, dtype=jnp.float32), region_mask=z(R))
  if shapes.pixels:
    S = shapes.image_size
    inputs['images'] = z(S, S, 3, dtype=jnp.uint8)
  else:
    inputs['region_feats'] = z(R, shapes.feature_dim, dtype=jnp.float32)
  if pretrain:
    inputs.update(anchor_text_pos=z(K), anchor_text_end=z(K),
                  anchor_region=z(K), anchor_valid=z(K, dtype=bool),
                  region_tags=z(R), itm_label=z())
  return inputs


def check_feature_dim(directory, meta_dim, feature_dim):
  """A data folder's meta.json feature_dim must be the config's F. F = 0
  (Shapes of a model that reads pixels) reads no features: any passes."""
  if feature_dim and meta_dim != feature_dim:
    raise ValueError(
        f'{directory}/meta.json: feature_dim={meta_dim} does not match '
        f'config model.region_feat_dim={feature_dim}.')
