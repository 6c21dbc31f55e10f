"""BERT Transformer layers (post-LN, GELU) and the unified semantic encoder.

Each `BertLayer` maps one-to-one onto Hugging Face `BertLayer`:
  attention.{query,key,value}_{kernel,bias}
                               <-> attention.self.{query,key,value}
  attention.out_{kernel,bias}  <-> attention.output.dense
  attention_norm               <-> attention.output.LayerNorm
  intermediate                 <-> intermediate.dense
  output                       <-> output.dense
  output_norm                  <-> output.LayerNorm
Attention kernels are stored per head, [D, heads, head_dim], so heads can be
sharded on the `tensor` mesh axis; export reshapes them to [D, D].
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmal_jax.model import axes


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  hidden_dim: int
  num_heads: int
  mlp_dim: int
  num_layers: int
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  layer_norm_eps: float = 1e-12  # BERT's value.


def layer_norm(cfg, name):
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name,
      scale_init=axes.init(nn.initializers.ones, ('embed',)),
      bias_init=axes.init(nn.initializers.zeros, ('embed',)))


class SelfAttention(nn.Module):
  """Multi-head self-attention with per-head kernels [D, heads, head_dim]."""
  cfg: EncoderConfig

  def projection(self, name, x, kernel_shape, kernel_axes, bias_axes,
                 equation):
    kernel = self.param(f'{name}_kernel', axes.init(axes.bert_init,
                                                    kernel_axes), kernel_shape)
    bias = self.param(f'{name}_bias', axes.init(nn.initializers.zeros,
                                                bias_axes),
                      kernel_shape[-len(bias_axes):])
    dt = self.cfg.dtype
    return jnp.einsum(equation, x.astype(dt), kernel.astype(dt)) + bias.astype(
        dt)

  @nn.compact
  def __call__(self, x, mask, deterministic):
    """x [B, L, D], mask [B, L] (1 = real) -> [B, L, D]."""
    cfg = self.cfg
    D, H = cfg.hidden_dim, cfg.num_heads
    head_dim = D // H
    qkv = lambda name: self.projection(
        name, x, (D, H, head_dim), ('embed', 'heads', 'kv'), ('heads', 'kv'),
        'bld,dhk->blhk')
    q, k, v = qkv('query'), qkv('key'), qkv('value')
    q = axes.constrain(q, ('batch', 'length', 'heads', 'kv'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(
        jnp.float32(head_dim)).astype(cfg.dtype)
    # Finite fill: a row with no real key (an image with zero regions) gives a
    # uniform average instead of NaN; padding outputs are never read.
    big_neg = jnp.finfo(logits.dtype).min
    logits = jnp.where(mask[:, None, None, :] > 0, logits, big_neg)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(
        cfg.dtype)
    probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return self.projection('out', out, (H, head_dim, D),
                           ('heads', 'kv', 'embed'), ('embed',),
                           'blhk,hkd->bld')


class BertLayer(nn.Module):
  """Post-LN Transformer layer, exactly BERT's."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    attn = SelfAttention(cfg, name='attention')(x, mask, deterministic)
    x = layer_norm(cfg, 'attention_norm')(x + drop(attn))
    h = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, name='intermediate',
                 kernel_init=axes.init(axes.bert_init, ('embed', 'mlp')),
                 bias_init=axes.init(nn.initializers.zeros, ('mlp',)))(x)
    h = nn.gelu(h, approximate=False)  # BERT's exact erf GELU.
    h = axes.constrain(h, ('batch', 'length', 'mlp'))
    h = nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, name='output',
                 kernel_init=axes.init(axes.bert_init, ('mlp', 'embed')),
                 bias_init=axes.init(nn.initializers.zeros, ('embed',)))(h)
    x = layer_norm(cfg, 'output_norm')(x + drop(h))
    return axes.constrain(x, ('batch', 'length', 'embed'))


class BertEncoder(nn.Module):
  """A stack of `BertLayer`s named layer_0 ... layer_{L-1}."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    """x [B, L, D], mask [B, L] -> [B, L, D]."""
    for i in range(self.cfg.num_layers):
      x = BertLayer(self.cfg, name=f'layer_{i}')(x, mask, deterministic)
    return x


def location_features(boxes):
  """UNITER's 7-d location: [B, R, 4] (x1, y1, x2, y2) -> [B, R, 7]."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  w, h = x2 - x1, y2 - y1
  return jnp.stack([x1, y1, x2, y2, w, h, w * h], axis=-1)


class SlotEmbeddings(nn.Module):
  """Adds each slot's place to its content: text slots their position plus
  type 0, region slots their location plus type 1, then LayerNorm.

  A feature moved by CMAP keeps its content and takes the place of the slot
  it moved into. Maps onto BertEmbeddings (position_embeddings,
  token_type_embeddings, LayerNorm); word embeddings live in the text UMSE.
  """
  cfg: EncoderConfig
  max_position: int

  @nn.compact
  def __call__(self, text, regions, region_boxes, deterministic):
    """text [B, T, D], regions [B, R, D], boxes [B, R, 4] -> [B, T+R, D]."""
    cfg = self.cfg
    T = text.shape[1]
    pos = nn.Embed(self.max_position, cfg.hidden_dim, name='position_embeddings',
                   embedding_init=axes.init(axes.bert_init, ('vocab', 'embed')))
    typ = nn.Embed(2, cfg.hidden_dim, name='token_type_embeddings',
                   embedding_init=axes.init(axes.bert_init, ('vocab', 'embed')))
    loc = nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, name='location',
                   kernel_init=axes.init(axes.bert_init, ('feature', 'embed')),
                   bias_init=axes.init(nn.initializers.zeros, ('embed',)))
    text = text + pos(jnp.arange(T))[None] + typ(jnp.zeros((), jnp.int32))
    regions = (regions + loc(location_features(region_boxes))
               + typ(jnp.ones((), jnp.int32)))
    x = jnp.concatenate([text, regions], axis=1).astype(cfg.dtype)
    x = layer_norm(cfg, 'LayerNorm')(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    return axes.constrain(x, ('batch', 'length', 'embed'))
