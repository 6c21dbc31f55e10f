"""Uni-modal semantic encoding (UMSE): one Transformer per modality, each
ending on the unit hypersphere of its own space."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmal_jax.model import axes
from cmal_jax.model.unified import BertEncoder, layer_norm, location_features


def sphere_projection(cfg, name='sphere'):
  """The Dense projection that precedes L2 normalisation."""
  return nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, name=name,
                  kernel_init=axes.init(axes.bert_init, ('embed', 'mlp')),
                  bias_init=axes.init(nn.initializers.zeros, ('mlp',)))


def l2_normalize(x):
  """[..., D] -> unit vectors (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


class TextEncoder(nn.Module):
  """Token + position embeddings, LayerNorm, L_t layers, sphere projection."""
  cfg: object  # unified.EncoderConfig with num_layers = L_t.
  vocab_size: int
  max_position: int

  def setup(self):
    cfg = self.cfg
    # Tied with the MLM / AMC-label vocabulary softmax (see `attend`).
    self.word_embeddings = nn.Embed(
        self.vocab_size, cfg.hidden_dim, name='word_embeddings',
        embedding_init=axes.init(axes.bert_init, ('vocab', 'embed')))
    self.position_embeddings = nn.Embed(
        self.max_position, cfg.hidden_dim, name='position_embeddings',
        embedding_init=axes.init(axes.bert_init, ('vocab', 'embed')))
    self.norm = layer_norm(cfg, 'LayerNorm')
    self.dropout = nn.Dropout(cfg.dropout)
    self.encoder = BertEncoder(cfg, name='encoder')
    self.sphere = sphere_projection(cfg)

  def __call__(self, input_ids, text_mask, deterministic):
    """input_ids, text_mask [B, T] -> unit-norm token features [B, T, D]."""
    T = input_ids.shape[1]
    x = self.word_embeddings(input_ids) + self.position_embeddings(
        jnp.arange(T))[None]
    x = self.dropout(self.norm(x.astype(self.cfg.dtype)),
                     deterministic=deterministic)
    x = self.encoder(axes.constrain(x, ('batch', 'length', 'embed')),
                     text_mask, deterministic)
    return l2_normalize(self.sphere(x))

  def attend(self, x):
    """Tied vocabulary logits: [..., D] -> [..., V]."""
    return self.word_embeddings.attend(x)


class VisionEncoder(nn.Module):
  """Linear(feature) + Linear(location), LayerNorm, L_v layers, sphere
  projection."""
  cfg: object

  @nn.compact
  def __call__(self, region_feats, region_boxes, region_mask, deterministic):
    """feats [B, R, F], boxes [B, R, 4], mask [B, R] -> unit [B, R, D]."""
    cfg = self.cfg
    dense = lambda name: nn.Dense(
        cfg.hidden_dim, dtype=cfg.dtype, name=name,
        kernel_init=axes.init(axes.bert_init, ('feature', 'embed')),
        bias_init=axes.init(nn.initializers.zeros, ('embed',)))
    x = dense('feature')(region_feats) + dense('location')(
        location_features(region_boxes))
    x = nn.Dropout(cfg.dropout)(layer_norm(cfg, 'LayerNorm')(x),
                                deterministic=deterministic)
    x = BertEncoder(cfg, name='encoder')(
        axes.constrain(x, ('batch', 'length', 'embed')), region_mask,
        deterministic)
    return l2_normalize(sphere_projection(cfg)(x))
