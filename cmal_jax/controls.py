"""Controls: evaluation inputs that take one kind of evidence away, so that a
metric shows what it measures (docs/controls.md).

AMC pairing can be earned by place rather than content: UMSE adds each
token's position and each region's box before its encoder, so a feature
CMAP moves still carries where it came from, and the slot it lands in adds
where it now is; both halves of a pair then share (text position, box).
ITM can be earned from the anchors: they are detected on the pair that is
fed, and a mismatched pair has fewer, so CMAP's swaps tell the label.

Each function maps the inputs objectives.prepare_inputs built (every anchor
swapped, uncorrupted: the `_all_swapped` evaluation) to the control's:
  place_scrambled  the moved features come from a UMSE pass whose places are
                   permuted (text positions among the caption's real
                   tokens, boxes among the image's real regions); content
                   is kept. A model that pairs by content keeps its score.
  place_only       the moved words are another anchor's of the same
                   example, in their own place (the moved regions are
                   unchanged); scored against the partner the place points
                   to. A model that pairs by content falls below chance
                   (it picks the partner of the content); chance is 1 / the
                   anchors moved in the example (pairing_chance).
ITM's controls: label-blind ITM is objectives.prepare_inputs with
actions='none' (CMAP off): nothing in those inputs depends on the anchors;
same_anchor_negatives picks, for each caption, a mismatched image that gives
it as many anchors as its own, so the anchor count tells nothing.

Fine-tuning's control (finetune.py, every test split of vqa, ve, nlvr2):
  images_shuffled  each example is scored with another example's image (its
                   region features or pixels, boxes and mask) and its own
                   text. A model that reads the image falls towards the
                   blind baseline; one that answers from the text keeps
                   its score.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cmal_jax.model import cmap
from cmal_jax.model.cmal import IMAGE_INPUTS


def shuffled_real_slots(rng, mask):
  """[B, L] int32: for each example a random permutation of its real slots
  (mask > 0, which come first) followed by its padding slots in order."""
  scores = jax.random.uniform(rng, mask.shape)
  scores = jnp.where(mask > 0, scores, 2.0 + jnp.arange(mask.shape[1]))
  return jnp.argsort(scores, axis=1).astype(jnp.int32)


def place_scrambled(inputs, rng):
  """CMAP moves features of a UMSE pass whose text positions and UMSE boxes
  are permuted among the real slots (inputs['moved'], see CMAL.encode)."""
  text_rng, region_rng = jax.random.split(rng)
  positions = shuffled_real_slots(text_rng, inputs['text_mask'])
  order = shuffled_real_slots(region_rng, inputs['region_mask'])
  boxes = jnp.take_along_axis(inputs['region_boxes'], order[..., None], 1)
  return dict(inputs, moved=dict(inputs.get('moved', {}),
                                 text_positions=positions, umse_boxes=boxes))


def next_anchor(valid):
  """[B, K] bool -> [B, K] int32: each valid anchor's successor among its
  example's valid anchors, cyclically (itself when it is the only one)."""
  rank = jnp.cumsum(valid, axis=1) - 1
  count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
  wanted = (rank + 1) % count  # [B, K]
  hit = valid[:, None, :] & (rank[:, None, :] == wanted[..., None])
  return jnp.argmax(hit, axis=-1).astype(jnp.int32)


def place_only(inputs, targets):
  """CMAP moves, at anchor k, the word of anchor s(k) (next_anchor) in k's
  own place (its id at k's position); the moved regions are unchanged.
  Returns (inputs, weights [B, K]): the anchors whose word was exchanged
  for a different word, from a different position and region; the targets
  stay k's partners.

  One side only: were both k's moved word and moved region s(k)'s, the
  slots p_k and o_k would again hold two halves of one anchor and a model
  pairing by content would pick the place's partner too. With the word
  exchanged, content points elsewhere in both directions: o_k's word is
  s(k)'s, whose region is at p_{s(k)}; p_k's region is k's, whose word now
  sits at o_{s^-1(k)}."""
  valid = targets['amc_weights']
  source = next_anchor(valid)
  take = lambda x: jnp.take_along_axis(x, source, axis=1)
  pos, region = inputs['anchor_text_pos'], inputs['anchor_region']
  word = targets['amc_word']
  weights = (valid & (take(pos) != pos) & (take(region) != region)
             & (take(word) != word))
  base = {**inputs, **inputs.get('moved', {})}  # What the moved pass reads.
  ids = base['input_ids']
  # Slot index T (out of range) leaves the anchors not exchanged as they are.
  input_ids = cmap.scatter_slots(ids, jnp.where(weights, pos, ids.shape[1]),
                                 take(word))
  moved = dict(inputs.get('moved', {}), input_ids=input_ids)
  return dict(inputs, moved=moved), weights


def pairing_chance(moved, weights):
  """(sum, count) of the chance accuracy of AMC pairing over the anchors
  `weights` [B, K]: 1 / the number of anchors moved in the example (moved
  [B, K]). A model that sees which slots hold moved features, but neither
  their content nor their place, guesses among those."""
  count = jnp.sum(moved, axis=1, keepdims=True)
  w = weights.astype(jnp.float32)
  return jnp.sum(w / jnp.maximum(count, 1)), jnp.sum(w)


def same_anchor_negatives(anchor_counts, seed):
  """anchor_counts [N, N]: anchors detected for (caption i, image j). For
  each caption i, the first image j != i (in a seeded random order) with
  anchor_counts[i, j] == anchor_counts[i, i] and at least one anchor: a
  hard negative that shares tags with the caption and whose anchor count
  is the positive's. Returns [N] int, -1 where no image qualifies."""
  n = anchor_counts.shape[0]
  order = np.random.default_rng(seed).permutation(n)
  own = np.diagonal(anchor_counts)
  picks = np.full(n, -1)
  for i in range(n):
    for j in order:
      if j != i and anchor_counts[i, j] == own[i] and own[i] > 0:
        picks[i] = j
        break
  return picks


def same_anchor_itm(scores, anchor_counts, seed):
  """ITM accuracy on each caption's own image and its same_anchor_negatives
  image, balanced (as many negatives as positives), from the retrieval
  scores [N, N] (log p(match) of caption i with image j; a match is
  predicted above log 1/2). Returns {itm_acc_same_anchors,
  itm_pairs_same_anchors: the captions scored (those with a negative)}."""
  picks = same_anchor_negatives(anchor_counts, seed)
  rows = np.nonzero(picks >= 0)[0]
  threshold = np.log(0.5)
  hits = (np.sum(scores[rows, rows] > threshold)
          + np.sum(scores[rows, picks[rows]] <= threshold))
  return dict(itm_acc_same_anchors=float(hits / max(2 * len(rows), 1)),
              itm_pairs_same_anchors=float(len(rows)))


def next_valid_row(valid):
  """[B] bool -> [B] int32: for each valid row the next valid row of the
  batch, cyclically (itself when it is the only one); padding rows map to
  themselves, so no example is scored with a padding row's empty image."""
  rows = jnp.arange(valid.shape[0])
  order = jnp.argsort(jnp.where(valid, rows, valid.shape[0] + rows))
  count = jnp.maximum(jnp.sum(valid), 1)
  source = jnp.where(rows < count, order[(rows + 1) % count], order)
  return rows.at[order].set(source).astype(jnp.int32)


def images_shuffled(batch):
  """A task batch whose examples each carry the next valid example's image
  (IMAGE_INPUTS: all the model reads of it; NLVR2's [B, 2, ...] pairs move together) and their own text
  and labels."""
  source = next_valid_row(batch['valid'])
  return dict(batch, **{k: jnp.take(batch[k], source, axis=0)
                        for k in IMAGE_INPUTS if k in batch})
