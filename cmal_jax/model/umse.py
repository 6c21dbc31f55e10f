"""Uni-modal semantic encoding (UMSE): one Transformer per modality, each
ending on the unit hypersphere of its own space (`unit=False`, the
hypersphere ablation, keeps the projection and skips the normalisation).

The encoders compute in cfg.dtype; the sphere projection returns float32 and
the unit features are float32 (they feed ITC's similarity logits directly).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmal_jax.model import axes
from cmal_jax.model.layers import (BertEncoder, Dropout, dense,
                                   dot_general_f32, embed, layer_norm)


def location_features(boxes):
  """UNITER's 7-d location: [B, R, 4] (x1, y1, x2, y2) -> [B, R, 7]."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  w, h = x2 - x1, y2 - y1
  return jnp.stack([x1, y1, x2, y2, w, h, w * h], axis=-1)


def sphere_projection(cfg, name='sphere'):
  """The Dense projection that precedes L2 normalisation: operands in the
  compute dtype, accumulated into and returned as float32."""
  return dense(cfg.hidden_dim, cfg, name, ('embed', 'mlp'), float32_out=True)


def l2_normalize(x):
  """[..., D] -> unit vectors, computed in and returned as float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def end_on_sphere(x, unit):
  """The UMSE output: the projection x on the unit sphere, or (the ablation)
  as it is; float32 either way."""
  return l2_normalize(x) if unit else x.astype(jnp.float32)


class TextEncoder(nn.Module):
  """Token + position embeddings, LayerNorm, L_t layers, sphere projection."""
  cfg: object  # layers.EncoderConfig with num_layers = L_t.
  vocab_size: int
  max_position: int
  unit: bool = True  # L2-normalise the output (the hypersphere).

  def setup(self):
    cfg = self.cfg
    # Tied with the MLM / AMC-label vocabulary softmax (see `attend`).
    self.word_embeddings = embed(self.vocab_size, cfg, 'word_embeddings')
    self.position_embeddings = embed(self.max_position, cfg,
                                     'position_embeddings')
    self.norm = layer_norm(cfg, 'LayerNorm')
    self.dropout = Dropout(cfg.dropout)
    self.encoder = BertEncoder(cfg, name='encoder')
    self.sphere = sphere_projection(cfg)

  def __call__(self, input_ids, text_mask, deterministic, positions=None,
               place=True):
    """input_ids, text_mask [B, T] -> token features [B, T, D], float32,
    unit-norm when self.unit. positions [B, T]: the position ids each token
    reads (default 0 .. T-1; the place controls of evaluate.py scramble
    them). place=False adds no position at all (the features CMAP moves
    with model.moved_place='none')."""
    T = input_ids.shape[1]
    if positions is None:
      positions = jnp.arange(T)[None]
    x = self.word_embeddings(input_ids)
    if place:
      x = x + self.position_embeddings(positions)
    x = self.dropout(self.norm(x.astype(self.cfg.dtype)),
                     deterministic=deterministic)
    x = self.encoder(axes.constrain(x, ('batch', 'length', 'embed')),
                     text_mask, deterministic)
    return end_on_sphere(self.sphere(x), self.unit)

  def attend(self, x):
    """Tied vocabulary logits: [..., D] -> [..., V], float32.

    Not nn.Embed.attend, whose output is in the compute dtype: bfloat16
    logits keep 8 bits, so a logit of 10 is off by up to 0.03 and the MLM /
    AMC-word softmax over 30522 words reads rounded values that no later
    cast recovers. So the operands are cast to the compute dtype (the
    matmul and its backward run at bfloat16 speed) and the product
    accumulates into float32 and stays float32 (dot_general_f32): the cost
    is a float32 [..., V] buffer where a bfloat16 one would do.
    """
    dt = self.cfg.dtype
    # Batch-sharded, width whole, and so is x's cotangent. Left free, XLA
    # gives the backward product d_logits @ table (table [V, D] over
    # (tensor, fsdp), batch over (data, fsdp)) a layout its SPMD partitioner
    # gets wrong when data, fsdp and tensor are all > 1: the batch shards
    # come back permuted (fsdp_tp's gradients 1.6 % off; XLA bug, JAX 0.10.2).
    x = axes.constrain(x, ('batch',) + (None,) * (x.ndim - 1))
    table = self.word_embeddings.embedding.astype(dt).T  # [D, V]
    return dot_general_f32(x.astype(dt), table,
                           (((x.ndim - 1,), (0,)), ((), ())))


class VisionEncoder(nn.Module):
  """Linear(feature) + Linear(location), LayerNorm, L_v layers, sphere
  projection."""
  cfg: object
  unit: bool = True  # L2-normalise the output (the hypersphere).

  @nn.compact
  def __call__(self, region_feats, region_boxes, region_mask, deterministic,
               place=True):
    """feats [B, R, F], boxes [B, R, 4], mask [B, R] -> [B, R, D], float32,
    unit-norm when self.unit. place=False adds no box location."""
    cfg = self.cfg
    linear = lambda name: dense(cfg.hidden_dim, cfg, name,
                                ('feature', 'embed'))
    x = linear('feature')(region_feats)
    if place:
      x = x + linear('location')(location_features(region_boxes))
    x = Dropout(cfg.dropout)(layer_norm(cfg, 'LayerNorm')(x),
                                deterministic=deterministic)
    x = BertEncoder(cfg, name='encoder')(
        axes.constrain(x, ('batch', 'length', 'embed')), region_mask,
        deterministic)
    return end_on_sphere(sphere_projection(cfg)(x), self.unit)
