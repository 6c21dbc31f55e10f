"""Cross-modal associative prompt (CMAP): anchor point masking and swap
feature filling.

Anchor actions, one per anchor slot [B, K]:
  NONE (not selected or invalid), SWAP (word and region trade places),
  MASK (both replaced by the learned [MASK] vector), KEEP (left as is).
"""

import jax
import jax.numpy as jnp

NONE, SWAP, MASK, KEEP = 0, 1, 2, 3


def sample_anchor_actions(rng, anchor_valid, *, select_prob, swap_prob,
                          mask_prob):
  """BERT-style 80/10/10 over selected anchors: [B, K] bool -> [B, K] int32."""
  select_rng, action_rng = jax.random.split(rng)
  selected = anchor_valid & jax.random.bernoulli(
      select_rng, select_prob, anchor_valid.shape)
  u = jax.random.uniform(action_rng, anchor_valid.shape)
  action = jnp.where(u < swap_prob, SWAP,
                     jnp.where(u < swap_prob + mask_prob, MASK, KEEP))
  return jnp.where(selected, action, NONE).astype(jnp.int32)


def all_swapped(anchor_valid):
  """Deterministic actions for evaluation: every valid anchor swapped."""
  return jnp.where(anchor_valid, SWAP, NONE).astype(jnp.int32)


def gather_slots(x, idx):
  """x [B, L, D], idx [B, K] -> [B, K, D]: x[b, idx[b, k]]."""
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def scatter_slots(x, idx, updates):
  """x [B, L, ...], idx [B, K], updates [B, K, ...] -> [B, L, ...].

  x[b, idx[b, k]] = updates[b, k]; an index of L or more is dropped, which
  is how callers skip entries while keeping static shapes.
  """
  return jax.vmap(lambda xb, ib, ub: xb.at[ib].set(ub, mode='drop'))(
      x, idx, updates)


def swap_anchor_features(text, regions, anchor_text_pos, anchor_text_end,
                         anchor_region, anchor_action, mask_vector,
                         moved_text=None, moved_regions=None):
  """Builds the hybrid prompt sequences.

  Args:
    text: [B, T, D] token features; regions: [B, R, D] region features.
    anchor_text_pos: [B, K] first WordPiece of each anchor word.
    anchor_text_end: [B, K] one past its last piece.
    anchor_region: [B, K] region slot of each anchor.
    anchor_action: [B, K] NONE / SWAP / MASK / KEEP.
    mask_vector: [D] the learned [MASK] feature.
    moved_text, moved_regions: [B, T, D], [B, R, D] where the moved word and
      region features are taken from (default text and regions): another
      UMSE pass of the same pair, e.g. with its place scrambled.

  Returns:
    (text, regions) of the same shapes. At a SWAP anchor the region's feature
    sits in the word's slot and the word's feature in the region's slot; at
    a MASK anchor both slots hold `mask_vector`. The word's other pieces are
    masked whenever the anchor is swapped or masked (that the encoders do
    not read a hidden word is objectives.prepare_inputs' cmap.hide_inputs).
    One gather and one scatter per side, static shapes: NONE/KEEP anchors
    scatter to an out-of-range index that is dropped.
  """
  T, R = text.shape[1], regions.shape[1]
  swap = (anchor_action == SWAP)[..., None]
  hidden = (anchor_action == SWAP) | (anchor_action == MASK)  # [B, K]
  mask_vector = mask_vector.astype(text.dtype)
  word = gather_slots(text if moved_text is None else moved_text,
                      anchor_text_pos)  # [B, K, D]
  obj = gather_slots(regions if moved_regions is None else moved_regions,
                     anchor_region)  # [B, K, D]
  new_word_slot = jnp.where(swap, obj, mask_vector)
  new_region_slot = jnp.where(swap, word, mask_vector)
  text_idx = jnp.where(hidden, anchor_text_pos, T)
  region_idx = jnp.where(hidden, anchor_region, R)
  # The other pieces of a hidden word, [B, T]; written before the scatter,
  # which only touches first pieces.
  t = jnp.arange(T)[None, None]
  other_pieces = jnp.any(
      hidden[..., None] & (t > anchor_text_pos[..., None])
      & (t < anchor_text_end[..., None]), axis=1)
  text = jnp.where(other_pieces[..., None], mask_vector, text)
  text = scatter_slots(text, text_idx, new_word_slot.astype(text.dtype))
  regions = scatter_slots(regions, region_idx, new_region_slot.astype(regions.dtype))
  return text, regions
