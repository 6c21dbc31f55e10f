"""Generic BERT Transformer layers (post-LN, GELU): dense, embeddings,
LayerNorm, self-attention, the layer and the stack. Nothing CMAL-specific
(that is model/unified.py, model/umse.py, model/cmap.py).

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

Mixed precision (EncoderConfig.dtype = the compute dtype): parameters are
always float32 (PARAM_DTYPE) and cast to the compute dtype where they are
used, so matmuls and activations run in it; attention logits and softmax,
LayerNorm statistics (Flax promotes them to at least float32), the
hypersphere L2 normalisation and every logit a loss reads are float32.
With dtype float32 every cast is a no-op.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import random as jax_random

from cmal_jax.model import axes


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  hidden_dim: int
  num_heads: int
  mlp_dim: int
  num_layers: int
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32  # Compute dtype; parameters stay float32.
  layer_norm_eps: float = 1e-12  # BERT's value.
  # Rematerialise each BertLayer in the backward pass: 'none' or a key of
  # REMAT_POLICIES.
  remat: str = 'none'
  # Each layer carries SemVLP's cross-modal attention sub-layer (used only
  # when the layer is given a cross mask: the two-stream mode).
  cross_attention: bool = False


# Parameters are float32 whatever the compute dtype (optimizer state too).
PARAM_DTYPE = jnp.float32


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None):
  """lax.dot_general with float32 output from float32 accumulation, for
  operands in the compute dtype (for logits; a drop-in Dense.dot_general).

  With float32 operands it is plain lax.dot_general. Otherwise the backward
  pass casts the float32 cotangent to the operands' dtype, so its two
  matmuls run in the compute dtype too (as after a bfloat16 matmul and a
  cast), not as mixed bfloat16 x float32 products.
  """
  del preferred_element_type  # Always float32.
  if lhs.dtype == rhs.dtype == jnp.float32:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision)
  return _low_precision_dot_f32(lhs, rhs, dimension_numbers, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_dot_f32(lhs, rhs, dimension_numbers, precision):
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                             preferred_element_type=jnp.float32)


def _low_precision_dot_f32_fwd(lhs, rhs, dimension_numbers, precision):
  return (_low_precision_dot_f32(lhs, rhs, dimension_numbers, precision),
          (lhs, rhs))


def _low_precision_dot_f32_bwd(dimension_numbers, precision, operands, g):
  lhs, rhs = operands
  _, vjp = jax.vjp(
      lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, precision),
      lhs, rhs)  # The recomputed product is unused (XLA drops it).
  return vjp(g.astype(jnp.result_type(lhs, rhs)))


_low_precision_dot_f32.defvjp(_low_precision_dot_f32_fwd,
                              _low_precision_dot_f32_bwd)


def _cast_operands(inputs, kernel, bias, dtype=None):
  """Dense's promote_dtype for float32 outputs: input and kernel in the
  compute dtype, the bias left float32 (it is added to a float32 result)."""
  return (jnp.asarray(inputs, dtype), jnp.asarray(kernel, dtype),
          None if bias is None else jnp.asarray(bias, jnp.float32))


def keep_mask(rng, rate, shape):
  """[*shape] bool: True with probability 1 - rate (to 1/65536).

  Four 16-bit draws per Threefry hash: jax.random.bernoulli draws a 32-bit
  float per element, one hash each (the hash computes 64 bits), and the
  masks were ~7 % of a `base` step on CPU (docs/benchmarks.md). Keys of
  another PRNG implementation take jax.random.bernoulli.
  """
  if str(jax.random.key_impl(rng)) != 'threefry2x32':
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  n = math.prod(shape)
  # threefry_2x32 hashes pairs of counters into pairs of 32-bit words.
  words = jax_random.threefry_2x32(jax.random.key_data(rng),
                                   jnp.arange(2 * -(-n // 4), dtype=jnp.uint32))
  bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
  return bits.reshape(shape) >= jnp.uint16(round(rate * 65536))


class Dropout(nn.Module):
  """Inverted dropout (nn.Dropout's contract, rng collection 'dropout')
  with keep_mask's cheaper random bits."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng('dropout'), self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def dense(features, cfg, name, kernel_axes, bias_init=nn.initializers.zeros,
          float32_out=False):
  """nn.Dense in the compute dtype with float32 parameters.

  float32_out: operands in the compute dtype but accumulated into and
  returned as float32 (for logits and the hypersphere projection; the
  accumulator is float32 anyway, so this costs only the wider output).
  """
  extra = dict(dot_general=dot_general_f32,
               promote_dtype=_cast_operands) if float32_out else {}
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=PARAM_DTYPE,
                  name=name,
                  kernel_init=axes.init(axes.bert_init, kernel_axes),
                  bias_init=axes.init(bias_init, kernel_axes[-1:]), **extra)


def embed(num_embeddings, cfg, name):
  """nn.Embed with a float32 table whose lookups are in the compute dtype."""
  return nn.Embed(num_embeddings, cfg.hidden_dim, dtype=cfg.dtype,
                  param_dtype=PARAM_DTYPE, name=name,
                  embedding_init=axes.init(axes.bert_init, ('vocab', 'embed')))


def layer_norm(cfg, name):
  """LayerNorm returning the compute dtype; its mean and variance, the
  normalisation, scale and bias are float32 (flax.linen.normalization
  _compute_stats promotes its input to at least float32, and _normalize
  works on those float32 statistics before casting the result)."""
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=PARAM_DTYPE,
      name=name,
      scale_init=axes.init(nn.initializers.ones, ('embed',)),
      bias_init=axes.init(nn.initializers.zeros, ('embed',)))


class SelfAttention(nn.Module):
  """Multi-head self-attention with per-head kernels [D, heads, head_dim]."""
  cfg: EncoderConfig

  def projection(self, name, x, kernel_shape, kernel_axes, bias_axes,
                 equation):
    kernel = self.param(f'{name}_kernel', axes.init(axes.bert_init,
                                                    kernel_axes), kernel_shape,
                        PARAM_DTYPE)
    bias = self.param(f'{name}_bias', axes.init(nn.initializers.zeros,
                                                bias_axes),
                      kernel_shape[-len(bias_axes):], PARAM_DTYPE)
    dt = self.cfg.dtype
    return jnp.einsum(equation, x.astype(dt), kernel.astype(dt)) + bias.astype(
        dt)

  @nn.compact
  def __call__(self, x, mask, deterministic):
    """x [B, L, D], mask [B, L] (1 = a real key) or [B, L, L] (query,
    key: 1 = may attend) -> [B, L, D]."""
    cfg = self.cfg
    D, H = cfg.hidden_dim, cfg.num_heads
    head_dim = D // H
    qkv = lambda name: self.projection(
        name, x, (D, H, head_dim), ('embed', 'heads', 'kv'), ('heads', 'kv'),
        'bld,dhk->blhk')
    q, k, v = qkv('query'), qkv('key'), qkv('value')
    q = axes.constrain(q, ('batch', 'length', 'heads', 'kv'))
    # Logits and softmax in float32: q . k accumulates into float32 (free on
    # a matrix unit), so logits of tens are not rounded to bfloat16's 8 bits.
    # A plain dot (not dot_general_f32), so that remat policies see it; its
    # backward multiplies the float32 cotangent with bfloat16 q and k.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(
                            jnp.float32(head_dim))
    # Finite fill: a row with no real key (an image with zero regions) gives a
    # uniform average instead of NaN; padding outputs are never read.
    big_neg = jnp.finfo(logits.dtype).min
    allowed = (mask[:, None, None, :] if mask.ndim == 2
               else mask[:, None, :, :])
    logits = jnp.where(allowed > 0, logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    if mask.ndim == 3:
      # Pairwise masks (the two-stream mode) leave real queries without any
      # key, e.g. a caption's cross-attention to an image with no regions:
      # they read nothing (zero), not the padding (whose zero-variance
      # LayerNorm inputs would send it gradients of ~1e20).
      probs = jnp.where(jnp.any(allowed > 0, -1, keepdims=True), probs, 0)
    # Kept only when a caller asks (apply(..., mutable=['intermediates'])):
    # SemMIM's text-guided masking reads them.
    self.sow('intermediates', 'attention_probs', probs)
    probs = Dropout(cfg.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return self.projection('out', out, (H, head_dim, D),
                           ('heads', 'kv', 'embed'), ('embed',),
                           'blhk,hkd->bld')


class BertLayer(nn.Module):
  """Post-LN Transformer layer, exactly BERT's; with cfg.cross_attention
  and a cross mask, SemVLP's two-stream layer: self-attention within each
  modality (mask), then cross-attention to the other (cross_mask), each
  with its residual and LayerNorm, then the shared FFN."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic, cross_mask=None):
    cfg = self.cfg
    drop = lambda y: Dropout(cfg.dropout)(y, deterministic=deterministic)
    attn = SelfAttention(cfg, name='attention')(x, mask, deterministic)
    x = layer_norm(cfg, 'attention_norm')(x + drop(attn))
    if cross_mask is not None:
      if not cfg.cross_attention:
        raise ValueError('a cross mask was given to a layer without the '
                         'cross-attention sub-layer (cross_attention=False)')
      attn = SelfAttention(cfg, name='cross_attention')(x, cross_mask,
                                                        deterministic)
      x = layer_norm(cfg, 'cross_attention_norm')(x + drop(attn))
    h = dense(cfg.mlp_dim, cfg, 'intermediate', ('embed', 'mlp'))(x)
    h = nn.gelu(h, approximate=False)  # BERT's exact erf GELU.
    h = axes.constrain(h, ('batch', 'length', 'mlp'))
    h = dense(cfg.hidden_dim, cfg, 'output', ('mlp', 'embed'))(h)
    x = layer_norm(cfg, 'output_norm')(x + drop(h))
    return axes.constrain(x, ('batch', 'length', 'embed'))


# EncoderConfig.remat -> what a rematerialised layer keeps for the backward
# pass (jax.checkpoint policy): 'full' nothing but its input, 'dots' every
# matmul output, 'dots_no_batch' the matmuls without batch dimensions (the
# weight matmuls, not attention's q.k and probs.v).
REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# nn.remat counts the module as argument 0: BertLayer.__call__(self, x, mask,
# deterministic) has `deterministic` at 3, static so Dropout sees a bool.
_REMAT_LAYERS = {
    name: nn.remat(BertLayer, policy=policy, static_argnums=(3,))
    for name, policy in REMAT_POLICIES.items()}


class BertEncoder(nn.Module):
  """A stack of `BertLayer`s named layer_0 ... layer_{L-1}, each
  rematerialised in the backward pass unless cfg.remat is 'none' (the
  parameters are the same either way)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic, cross_mask=None):
    """x [B, L, D], mask [B, L] or [B, L, L] -> [B, L, D]; cross_mask
    [B, L, L]: the two-stream mode (see BertLayer)."""
    remat = self.cfg.remat
    if remat != 'none' and remat not in _REMAT_LAYERS:
      raise ValueError(f'remat={remat!r}: expected one of '
                       f"{['none'] + list(_REMAT_LAYERS)}")
    layer = BertLayer if remat == 'none' else _REMAT_LAYERS[remat]
    for i in range(self.cfg.num_layers):
      # `deterministic` positional: nn.remat's static_argnums are positions.
      x = layer(self.cfg, name=f'layer_{i}')(x, mask, deterministic,
                                             cross_mask)
    return x
