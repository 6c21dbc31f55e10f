"""AMC, anchor-masked association: what the model predicts at each anchor
after CMAP moved (or masked) its word and its object, and the loss.

At anchor k the text slot p_k and the region slot o_k of the unified
outputs make four predictions (config.loss.amc_targets):
  pairing ('pairing', 'both'): from the word slot, which region slot holds
    its object (t2r, over the image's real regions); from the object slot,
    which text slot holds its word (r2t, over the caption's real tokens).
  label ('label', 'both'): the word itself (the vocabulary head tied to the
    word embeddings, one pass shared with MLM) and the object's tag (the
    region tag head, where the region has one).
Only anchors CMAP acted on (swap, mask or keep) are scored.
"""

import flax.linen as nn
import jax.numpy as jnp

from cmal_jax.model import cmap
from cmal_jax.model.heads import dense
from cmal_jax.model.layers import dot_general_f32
from cmal_jax.model.xent import denominator, weighted_xent


class PairingHead(nn.Module):
  """AMC pairing: scaled dot products between projected slot outputs."""
  cfg: object

  @nn.compact
  def __call__(self, queries, keys, key_mask, query_side, key_side):
    """queries [B, K, D], keys [B, L, D], key_mask [B, L] -> [B, K, L]."""
    proj = {side: dense(self.cfg.hidden_dim, self.cfg, f'{side}_proj')
            for side in ('text', 'region')}
    q, k = proj[query_side](queries), proj[key_side](keys)
    logits = dot_general_f32(q, k, (((2,), (2,)), ((0,), (0,))))
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.where(key_mask[:, None, :] > 0, logits, -1e9)


def anchor_slots(text_out, region_out, inputs):
  """The unified outputs at each anchor: (word slot p_k [B, K, D], region
  slot o_k [B, K, D]) from text_out [B, T, D] and region_out [B, R, D]."""
  return (cmap.gather_slots(text_out, inputs['anchor_text_pos']),
          cmap.gather_slots(region_out, inputs['anchor_region']))


def amc_denominators(targets):
  """What AMC's means divide by: the scored anchors, and those whose tag is
  scored (amc_tag_weights: a tag, and a region slot that was not swapped)."""
  scored = targets['amc_weights']
  return dict(amc=denominator(scored),
              amc_tag=denominator(targets['amc_tag_weights']))


def amc_loss(outputs, targets, amc_targets, denominators):
  """AMC's losses and accuracies -> ({'amc_pair': ..., 'amc_label': ...}
  (those amc_targets asks for), metrics). outputs: the model's amc_*_logits
  (t2r [B, K, R], r2t [B, K, T], word [B, K, V], tag [B, K, C]); targets:
  objectives.prepare_inputs' amc_*; denominators: amc_denominators of the
  whole batch."""
  w, d = targets['amc_weights'], denominators
  losses, metrics = {}, {}
  if amc_targets in ('pairing', 'both'):
    t2r, t2r_acc, n = weighted_xent(outputs['amc_t2r_logits'],
                                    targets['amc_region'], w, d['amc'])
    r2t, r2t_acc, _ = weighted_xent(outputs['amc_r2t_logits'],
                                    targets['amc_text_pos'], w, d['amc'])
    losses['amc_pair'] = (t2r + r2t) / 2
    metrics.update(acc_amc_t2r=t2r_acc, acc_amc_r2t=r2t_acc,
                   acc_amc_pair=(t2r_acc + r2t_acc) / 2, amc_anchors=n)
  if amc_targets in ('label', 'both'):
    word, word_acc, _ = weighted_xent(outputs['amc_word_logits'],
                                      targets['amc_word'], w, d['amc'])
    tag, tag_acc, _ = weighted_xent(outputs['amc_tag_logits'],
                                    targets['amc_tag'],
                                    targets['amc_tag_weights'], d['amc_tag'])
    losses['amc_label'] = (word + tag) / 2
    metrics.update(acc_amc_word=word_acc, acc_amc_tag=tag_acc)
  return losses, metrics
