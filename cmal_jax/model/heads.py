"""Output heads on the unified encoder.

The heads compute in the compute dtype (cfg.dtype); the layer that makes
logits takes its operands in it but accumulates into and returns float32
(`logits=True`), so no logit a loss reads was rounded to bfloat16.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmal_jax.model import axes, layers
from cmal_jax.model.umse import l2_normalize
from cmal_jax.model.layers import layer_norm


def dense(features, cfg, name, in_axis='embed', out_axis='mlp', bias=0.0,
          logits=False):
  return layers.dense(features, cfg, name, (in_axis, out_axis),
                       bias_init=nn.initializers.constant(bias),
                       float32_out=logits)


class Transform(nn.Module):
  """BERT's prediction transform: Dense, GELU, LayerNorm ([..., D])."""
  cfg: object

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(dense(self.cfg.hidden_dim, self.cfg, 'dense')(x),
                approximate=False)
    return layer_norm(self.cfg, 'LayerNorm')(x)


class VocabHead(nn.Module):
  """Word prediction tied to the text word embeddings (MLM, AMC label)."""
  cfg: object
  vocab_size: int

  @nn.compact
  def __call__(self, x, attend):
    """x [..., D], attend: TextEncoder.attend (float32 logits, see there)
    -> logits [..., V] (float32)."""
    bias = self.param('bias', axes.init(nn.initializers.zeros, ('vocab',)),
                      (self.vocab_size,), layers.PARAM_DTYPE)
    return attend(Transform(self.cfg, name='transform')(x)).astype(
        jnp.float32) + bias


class TagHead(nn.Module):
  """Region tag classes (AMC label on the region side, MRC): [..., C]."""
  cfg: object
  num_tags: int

  @nn.compact
  def __call__(self, x):
    x = Transform(self.cfg, name='transform')(x)
    return dense(self.num_tags, self.cfg, 'classifier', out_axis='tags',
                 logits=True)(x).astype(jnp.float32)


class ITMHead(nn.Module):
  """BERT pooler (Dense + tanh on [CLS]) then a binary classifier."""
  cfg: object

  @nn.compact
  def __call__(self, cls):
    pooled = jnp.tanh(dense(self.cfg.hidden_dim, self.cfg, 'pooler')(cls))
    return dense(2, self.cfg, 'classifier', out_axis=None,
                 logits=True)(pooled).astype(jnp.float32)


class PrototypeHead(nn.Module):
  """SemMIM's shared encoding space: [..., D] -> cosine similarities
  [..., K] (float32, in [-1, 1]) to K learnable prototypes, after BERT's
  prediction transform and L2 normalisation (as iBOT's weight-normalised
  last layer). Patch encodings and the global image feature both go through
  this one head, which is how global semantics reach the patch targets."""
  cfg: object
  num_prototypes: int

  @nn.compact
  def __call__(self, x):
    x = Transform(self.cfg, name='transform')(x).astype(jnp.float32)
    prototypes = self.param(
        'prototypes', axes.init(nn.initializers.normal(1.0), ('embed', None)),
        (self.cfg.hidden_dim, self.num_prototypes), layers.PARAM_DTYPE)
    return l2_normalize(x) @ l2_normalize(prototypes.T).T


# ---------------------------------------------------------- downstream heads

# What a ClsClassifier reads (ModelConfig.head_input).
HEAD_INPUTS = ('cls', 'cls_and_regions')


class ClsClassifier(nn.Module):
  """UNITER's task head on [CLS]: Dense(2D), GELU, LayerNorm, Dense(C).

  VQA (C answers), SNLI-VE (C = 3), NLVR2 (num_images = 2: the [CLS]
  outputs of the two passes are concatenated first). reads_regions: each
  pass gives [CLS] beside its region slots pooled by a learned score
  (`pool_regions`), so an answer can read the regions directly rather than
  only what the encoder gathered into [CLS] (docs/finetuning.md).
  """
  cfg: object
  num_classes: int
  num_images: int = 1
  # Initial logit of every class. VQA's BCE sets it to the log-odds of a
  # rare answer, so the first steps need not push 100 logits down through
  # the pre-trained encoder (RetinaNet's prior initialisation).
  initial_logit: float = 0.0
  reads_regions: bool = False

  @nn.compact
  def __call__(self, x, inputs):
    """x [B * num_images, L, D] (example-major: the images of example b
    at b * num_images + i, so an example stays on one data shard) ->
    logits [B, C] (float32)."""
    cls = x[:, 0]
    if self.reads_regions:
      cls = jnp.concatenate([cls, pool_regions(self.cfg, x, inputs)], -1)
    cls = cls.reshape(-1, self.num_images * cls.shape[-1])
    h = nn.gelu(dense(2 * self.cfg.hidden_dim, self.cfg, 'dense')(cls),
                approximate=False)
    h = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.cfg.dtype,
                     param_dtype=layers.PARAM_DTYPE, name='LayerNorm',
                     scale_init=axes.init(nn.initializers.ones, ('mlp',)),
                     bias_init=axes.init(nn.initializers.zeros, ('mlp',)))(h)
    return dense(self.num_classes, self.cfg, 'classifier', in_axis='mlp',
                 out_axis=None, bias=self.initial_logit, logits=True)(h).astype(
                     jnp.float32)


def pool_regions(cfg, x, inputs):
  """The region slots of x [B, T + R, D] averaged with softmax weights of
  a learned score over the real regions (region_mask [B, R]) -> [B, D].
  Called inside a compact module: the score layer is its 'region_score'."""
  regions = x[:, inputs['input_ids'].shape[1]:]
  score = dense(1, cfg, 'region_score', out_axis=None, logits=True)(
      regions)[..., 0]
  score = jnp.where(inputs['region_mask'] > 0, score, -1e9)
  weights = jax.nn.softmax(score, -1).astype(regions.dtype)
  return jnp.einsum('br,brd->bd', weights, regions)


class RegionScorer(nn.Module):
  """REC: one score per region slot, for a softmax over the regions."""
  cfg: object

  @nn.compact
  def __call__(self, x, inputs):
    """x [B, T + R, D] -> logits [B, R] (float32; -1e9 on padded slots)."""
    regions = x[:, inputs['input_ids'].shape[1]:]
    h = Transform(self.cfg, name='transform')(regions)
    logits = dense(1, self.cfg, 'score', out_axis=None, logits=True)(h)[..., 0]
    return jnp.where(inputs['region_mask'] > 0, logits.astype(jnp.float32),
                     -1e9)
