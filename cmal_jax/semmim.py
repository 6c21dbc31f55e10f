"""SemMIM (Liu et al., LREC-COLING 2024): masked image modelling whose
targets carry high-level semantics, on the pixel path's patch regions.

Per step, inside the jitted train step (docs/semmim.md has the reasoning):
  1. The momentum encoder (an EMA of the parameters, TrainState.ema_params,
     never differentiated) reads the whole image and the clean caption.
  2. Text-guided masking: the attention its last unified layer pays from the
     caption's tokens to each patch ranks the patches; the mask_ratio most
     related to the caption are masked (static shapes: top-k).
  3. Targets: the momentum encoder's patch encodings and its global image
     feature, in the K-prototype space both share (model.prototypes), made
     into assignments by Sinkhorn-Knopp over the batch.
  4. The student reads the masked image (mask token in place of each masked
     patch's embedding) and the MLM-corrupted caption; objectives.py's MIM
     and agreement losses compare its encodings with the targets.
  5. After the update the momentum encoder moves: θ' = m·θ' + (1 − m)·θ.
"""

import jax
import jax.numpy as jnp

from cmal_jax import objectives


def uses_target_encoder(config):
  """Whether a config trains with SemMIM's momentum encoder (the MIM or the
  agreement loss is on)."""
  loss = config.get('loss')
  return (config.task == 'pretrain' and loss is not None
          and (loss.get('mim', 0) > 0 or loss.get('agreement', 0) > 0))


def ema_update(ema_params, params, momentum):
  """The momentum encoder's step: θ' = m·θ' + (1 − m)·θ for every leaf."""
  return jax.tree.map(lambda e, p: momentum * e + (1 - momentum) * p,
                      ema_params, params)


def text_relevance(attention, text_mask, region_mask):
  """How much the caption attends to each region (patch).

  attention [B, H, L, L]: attention probabilities (query, key) over
  [text; regions], L = T + R; text_mask [B, T]; region_mask [B, R]
  -> relevance [B, R]: the probability mass the real text slots give each
  region slot, averaged over heads and text slots; -inf on padding.
  """
  T = text_mask.shape[1]
  to_regions = jnp.mean(attention[:, :, :T, T:].astype(jnp.float32), 1)
  w = text_mask.astype(jnp.float32)
  relevance = jnp.einsum('btr,bt->br', to_regions, w) / jnp.maximum(
      jnp.sum(w, 1, keepdims=True), 1.0)
  return jnp.where(region_mask > 0, relevance, -jnp.inf)


def text_guided_mask(relevance, region_mask, ratio, rng=None, noise=0.0):
  """The patches to mask: [B, R] bool, round(ratio * real patches) per row
  (at least one), those of the highest text relevance.

  noise > 0 adds noise * Gumbel noise to log relevance, which samples the
  masked set without replacement with probabilities ∝ relevance^(1/noise)
  (Gumbel top-k); noise 0 is the plain top-k. Shapes are static: at most
  ceil(ratio * R) positions are chosen (objectives.choose_positions).
  """
  scores = jnp.log(jnp.maximum(relevance, 1e-30))
  if noise:
    scores = scores + noise * jax.random.gumbel(rng, scores.shape)
  positions, weights = objectives.choose_positions(
      None, region_mask > 0, ratio, scores=scores)
  return objectives.scatter_where(jnp.zeros(region_mask.shape, bool),
                                  positions, weights,
                                  jnp.ones(positions.shape, bool))


def sinkhorn_knopp(logits, weights, temperature, iterations):
  """Balanced soft assignments of the weighted rows to K prototypes (as
  DINOv2's teacher): logits [..., K], weights [...] -> [..., K] rows
  summing to 1 where weighted (zero elsewhere), for iterations >= 1. Under
  jit the sums run over the global batch, whatever the mesh."""
  K = logits.shape[-1]
  flat = logits.reshape(-1, K).astype(jnp.float32) / temperature
  w = weights.reshape(-1).astype(jnp.float32)
  flat = flat - jnp.max(jnp.where(w[:, None] > 0, flat, -jnp.inf))
  q = jnp.where(w[:, None] > 0, jnp.exp(flat), 0.0) * w[:, None]  # [N, K]
  n = jnp.maximum(jnp.sum(w), 1.0)
  q = q / jnp.maximum(jnp.sum(q), 1e-30)
  for _ in range(iterations):
    q = q / jnp.maximum(jnp.sum(q, 0, keepdims=True), 1e-30) / K
    q = q / jnp.maximum(jnp.sum(q, 1, keepdims=True), 1e-30) / n
  return (q * n).reshape(logits.shape)


def last_unified_attention(intermediates, num_layers):
  """The attention probabilities [B, H, L, L] the last unified layer sowed."""
  return intermediates['unified'][f'layer_{num_layers - 1}']['attention'][
      'attention_probs'][0]


def prepare(model, config, specials, batch, rng, state):
  """SemMIM's corruption and targets of a batch -> (inputs, targets):
  objectives.prepare_inputs' (MLM), plus inputs['patch_masked'] [B, R] and
  the targets mim_targets [B, R, K], mim_weights [B, R] (masked patches of
  matched pairs), image_targets [B, K] and region_mask [B, R]."""
  if state is None or state.ema_params is None:
    raise ValueError('SemMIM needs the momentum encoder: call the loss '
                     'with the TrainState (train_step.loss_and_grads(state=...)).')
  corrupt_rng, mask_rng = jax.random.split(rng)
  inputs, targets = objectives.prepare_inputs(batch, corrupt_rng, config,
                                              specials)
  clean, _ = objectives.prepare_inputs(batch, corrupt_rng, config, specials,
                                       corrupt=False)
  ema = jax.lax.stop_gradient(state.ema_params)
  out, state_vars = model.apply({'params': ema}, clean, deterministic=True,
                                mutable=['intermediates'])
  attention = last_unified_attention(state_vars['intermediates'],
                                     config.model.unified_layers)
  s = config.semmim
  patch_masked = text_guided_mask(
      text_relevance(attention, batch['text_mask'], batch['region_mask']),
      batch['region_mask'], s.mask_ratio, mask_rng, s.mask_noise)
  inputs['patch_masked'] = patch_masked
  positive = targets['positive']
  mim_weights = patch_masked & positive[:, None]
  targets.update(
      mim_weights=mim_weights,
      mim_targets=sinkhorn_knopp(out['proto_patch_logits'], mim_weights,
                                 s.teacher_temp, s.sinkhorn_iterations),
      image_targets=sinkhorn_knopp(out['proto_image_logits'], positive,
                                   s.teacher_temp, s.sinkhorn_iterations),
      region_mask=batch['region_mask'])
  return inputs, targets
