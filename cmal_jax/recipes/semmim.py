"""SemMIM (Liu et al., LREC-COLING 2024): masked image modelling whose
targets carry high-level semantics, on the pixel path's patch regions.

Per step, inside the jitted train step (docs/semmim.md has the reasoning):
  1. The momentum encoder (an EMA of the parameters, kept in
     TrainState.extra['ema_params'], never differentiated) reads the whole
     image and the clean caption.
  2. Text-guided masking: the attention its last unified layer pays from the
     caption's tokens to each patch ranks the patches; the mask_ratio most
     related to the caption are masked (static shapes: top-k).
  3. Targets: the momentum encoder's patch encodings and its global image
     feature, in the K-prototype space both share (model.prototypes), made
     into assignments by Sinkhorn-Knopp over the batch.
  4. The student reads the masked image (mask token in place of each masked
     patch's embedding) and the MLM-corrupted caption; the MIM and
     agreement losses (semmim_losses) compare its encodings with the
     targets, beside MLM, ITM and ITC.
  5. After the update the momentum encoder moves: θ' = m·θ' + (1 − m)·θ.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from cmal_jax import objectives
from cmal_jax.model import xent
from cmal_jax.model.cmal import masked_mean

TITLE = 'SemMIM'

# Per size: the patch side in pixels (its regions are the backbone's
# patches, a grid of image_size / patch cells per side, each pooled exactly
# by a 1 x 1 RoIAlign bin), K prototypes and the EMA momentum. 16-pixel
# patches keep `small`'s sequence at 32 + 16 slots.
SIZES = {
    'tiny': dict(patch_size=16, prototypes=64, ema_momentum=0.99),
    'small': dict(patch_size=16, prototypes=256, ema_momentum=0.995),
    'base': dict(patch_size=16, prototypes=4096, ema_momentum=0.999),
    'minilm': dict(patch_size=16, prototypes=256, ema_momentum=0.995),
}


def configure_model(config):
  """The pixel path with a ViT-style patch embedding, and the K-prototype
  space; the regions are the patches, so the data holds G * G of them."""
  size = SIZES[config.size]
  v = config.model.visual
  v.input, v.kind, v.patch_size = 'pixels', 'patch', size['patch_size']
  config.data.max_regions = (v.image_size // v.patch_size) ** 2
  config.model.prototypes = size['prototypes']


def configure(config):
  v = config.model.visual
  # Pre-training's regions are exactly the patches: the grid of cells, one
  # sample at each cell's centre.
  v.boxes, v.grid_size = 'grid', v.image_size // v.patch_size
  v.roi_size = v.sampling_ratio = 1
  config.semmim = ml_collections.ConfigDict(dict(
      mask_ratio=0.4,  # Of each image's patches, the most text-related.
      # 0: mask exactly the top-relevance patches; > 0: sample them with
      # probability ~ relevance^(1 / mask_noise) (Gumbel top-k).
      mask_noise=0.0,
      # m in θ' = m·θ' + (1 − m)·θ.
      ema_momentum=SIZES[config.size]['ema_momentum'],
      teacher_temp=0.07,  # Sinkhorn-Knopp on the momentum encoder's logits.
      student_temp=0.1,
      sinkhorn_iterations=3,
  ))
  # Masked image modelling on the masked patches, and the global/local
  # agreement in the prototype space; ITC, MLM and ITM beside them, masking
  # any word.
  config.loss.mim = 1.0
  config.loss.agreement = 1.0
  config.loss.itc = 1.0
  config.loss.mask_anchors = True


def check(config):
  """SemMIM masks the backbone's patches: the regions must be exactly them."""
  def fail(field, value, why):
    raise ValueError(f'config.{field}={value!r}: {why}')

  if not uses_target_encoder(config):
    return
  v, s = config.model.visual, config.semmim
  needs = (('model.visual.input', v.input, 'pixels'),
           ('model.visual.kind', v.kind, 'patch'),
           ('model.visual.boxes', v.boxes, 'grid'),
           ('model.visual.grid_size', v.grid_size,
            v.image_size // v.patch_size))
  for field, value, wanted in needs:
    if value != wanted:
      fail(field, value, f'SemMIM (loss.mim / loss.agreement) masks the '
           f'pixel backbone\'s patches, one region each: needs {wanted!r}')
  if not isinstance(config.model.prototypes, int) or (
      config.model.prototypes < 2):
    fail('model.prototypes', config.model.prototypes,
         'SemMIM needs K >= 2 prototypes')
  if config.model.unified_layers < 1:
    fail('model.unified_layers', config.model.unified_layers,
         "SemMIM's text-guided masking reads the last unified layer")
  if not 0 < s.mask_ratio < 1:
    fail('semmim.mask_ratio', s.mask_ratio, 'must be in (0, 1)')
  if not 0 <= s.ema_momentum <= 1:
    fail('semmim.ema_momentum', s.ema_momentum, 'must be in [0, 1]')
  for field in ('teacher_temp', 'student_temp'):
    if not s[field] > 0:
      fail(f'semmim.{field}', s[field], 'must be > 0')
  if s.mask_noise < 0:
    fail('semmim.mask_noise', s.mask_noise, 'must be >= 0')
  if not isinstance(s.sinkhorn_iterations, int) or s.sinkhorn_iterations < 1:
    fail('semmim.sinkhorn_iterations', s.sinkhorn_iterations,
         'must be an integer >= 1 (the last one makes each row a '
         'distribution)')


def uses_target_encoder(config):
  """Whether a config trains with SemMIM's momentum encoder (the MIM or the
  agreement loss is on)."""
  loss = config.get('loss')
  return (config.task == 'pretrain' and loss is not None
          and (loss.get('mim', 0) > 0 or loss.get('agreement', 0) > 0))


def init_inputs(inputs, config):
  """Init sees the patch mask input, which creates the mask token."""
  if not uses_target_encoder(config):
    return inputs
  return dict(inputs, patch_masked=jnp.zeros_like(inputs['region_mask'],
                                                  bool))


def make_loss(model, config, specials):
  """MLM / ITM / ITC (objectives.pretraining_loss) on the student's view,
  plus the MIM and agreement losses against the momentum encoder's
  targets; the momentum encoder is the recipe's extra state."""
  if not uses_target_encoder(config):
    return objectives.pretraining_loss(model, config, specials)
  base = objectives.pretraining_loss(
      model, config, specials,
      extra_losses=functools.partial(semmim_losses, config))

  def prepare_batch(batch, rng, state=None):
    inputs, targets = prepare(model, config, specials, batch, rng, state)
    return dict(inputs=inputs, targets=targets)

  def denominators(batch):
    return dict(base.denominators(batch),
                mim=xent.denominator(batch['targets']['mim_weights']))

  def after_update(state):
    ema = ema_update(state.extra['ema_params'], state.params,
                     config.semmim.ema_momentum)
    return state.replace(extra=dict(state.extra, ema_params=ema))

  return dataclasses.replace(
      base, prepare=prepare_batch, denominators=denominators,
      after_update=after_update,
      extra_state=lambda params: {'ema_params': params})


def semmim_losses(config, outputs, targets, denominators, total):
  """The MIM and agreement losses -> (total + their weighted sum, their
  metrics), added to `total` in that order."""
  lc, d, metrics = config.loss, denominators, {}
  student = lambda name: outputs[name] / config.semmim.student_temp
  if lc.get('mim', 0) > 0:
    # Each masked patch's prototype distribution (the student sees the
    # masked image) matches the momentum encoder's on the whole image.
    loss, acc = soft_xent(student('proto_patch_logits'),
                          targets['mim_targets'], targets['mim_weights'],
                          d['mim'])
    metrics.update(loss_mim=loss, acc_mim=acc)
    total = total + lc.mim * loss
  if lc.get('agreement', 0) > 0:
    # Local semantics enhancing: the momentum encoder's global image
    # encoding is the target of the student's global encoding and of its
    # patch encodings taken together (their mean distribution), in the one
    # prototype space both share.
    target, positive = targets['image_targets'], targets['positive']
    global_loss, acc = soft_xent(student('proto_image_logits'), target,
                                 positive, d['itc'])
    mean_probs = masked_mean(jax.nn.softmax(student('proto_patch_logits')),
                             targets['region_mask'])  # [B, K]
    local_loss, _ = soft_xent(jnp.log(mean_probs + 1e-9), target, positive,
                              d['itc'])
    loss = (global_loss + local_loss) / 2
    metrics.update(loss_agreement=loss, acc_agreement=acc)
    total = total + lc.agreement * loss
  return total, metrics


def soft_xent(logits, target_probs, weights, denom):
  """Cross-entropy against soft targets (self-distillation) and how often
  the argmaxes agree: logits, target_probs [..., K], weights [...] ->
  (sum of weighted entries / denom, agreement likewise)."""
  w = weights.astype(jnp.float32)
  ce = -jnp.sum(target_probs * jax.nn.log_softmax(logits.astype(jnp.float32)),
                -1)
  agree = (jnp.argmax(logits, -1) == jnp.argmax(target_probs, -1)).astype(
      jnp.float32)
  return jnp.sum(ce * w) / denom, jnp.sum(agree * w) / denom




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
  if state is None or not state.extra:
    raise ValueError('SemMIM needs the momentum encoder: call the loss '
                     'with the TrainState (train_step.loss_and_grads(state=...)).')
  corrupt_rng, mask_rng = jax.random.split(rng)
  inputs, targets = objectives.prepare_inputs(batch, corrupt_rng, config,
                                              specials)
  clean, _ = objectives.prepare_inputs(batch, corrupt_rng, config, specials,
                                       corrupt=False)
  ema = jax.lax.stop_gradient(state.extra['ema_params'])
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
