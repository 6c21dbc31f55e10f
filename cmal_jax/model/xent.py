"""Weighted cross-entropy: the one loss every objective and task head uses."""

import jax
import jax.numpy as jnp


def weighted_xent(logits, labels, weights, denom=None):
  """Mean cross-entropy and accuracy over weighted entries.

  logits [..., C], labels [...] int, weights [...] -> (loss, acc, count).
  denom: what the sums are divided by; default the entries' total weight
  (at least 1). Gradient accumulation passes the whole batch's, so the
  micro-batches' losses add up to the batch's.
  """
  w = weights.astype(jnp.float32)
  labels = jnp.maximum(labels, 0)  # Unweighted entries may hold -1.
  logits = logits.astype(jnp.float32)
  # The label's logit through a one-hot product, not a gather: its gradient
  # is then elementwise and fuses into the softmax's, where a gather's is a
  # scatter into a zero [..., C] buffer (C = 30522 for the vocabulary).
  label_logit = jnp.sum(
      logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
      -1)
  ce = jax.nn.logsumexp(logits, -1) - label_logit
  # Right when the label's logit is the top one: argmax's (value, index)
  # reduction over the vocabulary cost more than the loss. Ties count as
  # right (the only ties are masked -1e9 slots, never labels).
  correct = (label_logit >= jnp.max(logits, -1)).astype(jnp.float32)
  n = jnp.sum(w)
  denom = jnp.maximum(n, 1.0) if denom is None else denom
  return jnp.sum(ce * w) / denom, jnp.sum(correct * w) / denom, n


def denominator(weights):
  """A weighted mean's divisor: the total weight, at least 1."""
  return jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)
