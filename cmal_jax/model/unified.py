"""The unified encoder's CMAL-specific parts: the slot embeddings that give
every slot of the hybrid [CLS] text [SEP] regions sequence its place, and
SemVLP's two-stream masks over that sequence. The layers are model/layers.py.
"""

import flax.linen as nn
import jax.numpy as jnp

from cmal_jax.model import axes
from cmal_jax.model.layers import (Dropout, EncoderConfig, dense, embed,
                                   layer_norm)
from cmal_jax.model.umse import location_features


def two_stream_masks(text_mask, region_mask):
  """SemVLP's two-stream attention over [text; regions]: (self [B, L, L],
  cross [B, L, L]) with L = T + R. Self lets each slot attend to the real
  slots of its own modality, cross to those of the other one."""
  T = text_mask.shape[1]
  keys = jnp.concatenate([text_mask, region_mask], 1) > 0  # [B, L]
  is_text = jnp.arange(keys.shape[1]) < T
  same = is_text[:, None] == is_text[None, :]  # [L, L]
  return ((same[None] & keys[:, None, :]).astype(jnp.int32),
          (~same[None] & keys[:, None, :]).astype(jnp.int32))


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
    pos = embed(self.max_position, cfg, 'position_embeddings')
    typ = embed(2, cfg, 'token_type_embeddings')
    loc = dense(cfg.hidden_dim, cfg, 'location', ('feature', 'embed'))
    text = text + pos(jnp.arange(T))[None] + typ(jnp.zeros((), jnp.int32))
    regions = (regions + loc(location_features(region_boxes))
               + typ(jnp.ones((), jnp.int32)))
    x = jnp.concatenate([text, regions], axis=1).astype(cfg.dtype)
    x = layer_norm(cfg, 'LayerNorm')(x)
    x = Dropout(cfg.dropout)(x, deterministic=deterministic)
    return axes.constrain(x, ('batch', 'length', 'embed'))
