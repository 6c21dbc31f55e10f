"""Pre-training objectives: input corruption (MLM, MRC, CMAP actions), the
MLM, ITM, MRC and ITC losses with AMC's (model/amc.py), and the Loss
contract a job hands the train step (train_step.py). A recipe
(cmal_jax/recipes/) picks among these by its loss weights and may add its
own.

All randomness here runs on device from one key per step, so it is the same
on any mesh and needs no host round trip.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from cmal_jax.model import amc, cmap
from cmal_jax.model.xent import denominator, weighted_xent


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  pad: int
  cls: int
  sep: int
  mask: int
  vocab_size: int

  @classmethod
  def from_tokenizer(cls, tok):
    return cls(tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id,
               tok.vocab_size)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A job's objectives, in the parts gradient accumulation and the recipes'
  hooks need (train_step.loss_and_grads calls them in this order).

  prepare(batch, rng, state) -> batch: the corruption (CMAP's anchor
    actions, MLM masking; a recipe's own, e.g. SemVLP's mode of the step or
    SemMIM's momentum encoder's targets and masks), applied to the whole
    batch so that accumulating micro-batches sees the same corruption as
    one batch. It is not differentiated; `state` is the TrainState (None
    outside a train step).
  loss(params, batch, rng, denominators) -> (loss, metrics): the model's
    losses on a (micro-)batch; rng is for dropout.
  denominators(batch) -> {name: scalar}: what each mean divides by, over
    the whole batch; losses and metrics are then sums over micro-batches.
  after_update(state) -> state: runs after each applied update, inside the
    jitted step (SemMIM: the momentum encoder's step).
  extra_state(params) -> pytree or None: the recipe's own train state
    (TrainState.extra, checkpointed with it) for starting parameters
    `params` (SemMIM: the momentum encoder, a copy of them).
  branches, branch: an objective that changes during the run (ITM's
    warm-up, SemVLP's modes) as a tuple of losses like `loss` and
    branch(batch) -> int32 scalar, the (micro-)batch's branch, which
    prepare writes into the batch; `loss` then runs the batch's branch
    (branched_loss builds all three). The train step differentiates each
    branch apart and switches between the gradients, so that only the
    step's branch runs: a switch inside the differentiated loss would
    still write the other branch's residuals (a whole pass's activations)
    as zeros, forward and backward.
  """
  prepare: Callable
  loss: Callable
  denominators: Callable
  after_update: Callable = lambda state: state
  extra_state: Callable = lambda params: None
  branches: tuple = ()
  branch: Callable | None = None


def branched_loss(prepare, denominators, branches, branch, **hooks) -> Loss:
  """The Loss whose loss is branches[branch(batch)] (lax.switch)."""
  def loss(params, batch, rng, denominators):
    return jax.lax.switch(branch(batch), branches, params, batch, rng,
                          denominators)
  return Loss(prepare=prepare, loss=loss, denominators=denominators,
              branches=tuple(branches), branch=branch, **hooks)


def loss_branches(loss: Loss):
  """(branches, branch) of any Loss; one without branches is one branch."""
  if loss.branches:
    return loss.branches, loss.branch
  return (loss.loss,), lambda batch: jnp.int32(0)


def itm_actions(config):
  """The CMAP actions of ITM's inputs: 'none' when ITM reads its own
  label-blind pass (loss.itm_inputs='label_blind', the default), else those
  of the corrupted pass ('all_swapped' at evaluation). A mismatched pair has
  fewer anchors (they are detected on the pair that is fed), so CMAP's swaps
  on ITM's inputs tell the label (docs/controls.md)."""
  blind = config.loss.get('itm_inputs', 'label_blind') == 'label_blind'
  return 'none' if blind or not config.cmap.enabled else 'all_swapped'


def pretraining_loss(model, config, specials, two_stream=None,
                     extra_losses=None):
  """The Loss of the configured pre-training objectives: prepare_inputs'
  corruption, then compute_losses. two_stream: the model's mode (None: the
  config's; SemVLP's schedule picks one per step). extra_losses(outputs,
  targets, denominators, total) -> (total, metrics): a recipe's own losses,
  added to compute_losses' total and metrics.

  When CMAP is on and ITM label-blind (itm_actions), ITM's logits come from
  a second pass over the uncorrupted pair with CMAP off."""
  itm_pass = (config.cmap.enabled and config.loss.itm > 0
              and itm_actions(config) == 'none')

  # ITM's curriculum: for the first loss.itm_corrupted_warmup of the steps
  # it reads the CMAP pass (whose anchor cues get it off ln 2), then its own
  # label-blind pass, which runs (forward and backward) only from then on.
  warmup_steps = round(config.loss.get('itm_corrupted_warmup', 0.0)
                       * config.total_steps) if itm_pass else 0

  def prepare(batch, rng, state=None):
    inputs, targets = prepare_inputs(batch, rng, config, specials)
    out = dict(inputs=inputs, targets=targets)
    if itm_pass:
      out['itm_inputs'] = prepare_inputs(batch, rng, config, specials,
                                         actions='none', corrupt=False)[0]
      # No state (outside a train step): the label-blind pass, as
      # evaluation reads. [B], not a scalar, so that micro-batches split
      # it like the rest.
      out['itm_reads_corrupted'] = jnp.full(
          batch['itm_label'].shape,
          state is not None and state.step < warmup_steps)
    return out

  def loss_of(itm_reads_corrupted):
    """The loss with ITM on the CMAP pass (the warm-up) or on its own
    label-blind pass."""
    def loss(params, batch, rng, denominators):
      apply = lambda inputs, rng: model.apply(
          {'params': params}, inputs, deterministic=False,
          rngs={'dropout': rng}, two_stream=two_stream)
      if itm_pass:
        rng, itm_rng = jax.random.split(rng)
        outputs = apply(batch['inputs'], rng)
        if not itm_reads_corrupted:
          outputs = dict(outputs, itm_logits=apply(
              batch['itm_inputs'], itm_rng)['itm_logits'])
      else:
        outputs = apply(batch['inputs'], rng)
      total, metrics = compute_losses(outputs, batch['targets'], config,
                                      denominators)
      if extra_losses is not None:
        total, extra = extra_losses(outputs, batch['targets'], denominators,
                                    total)
        metrics.update(extra, loss=total)
      return total, metrics
    return loss

  denominators = lambda batch: loss_denominators(batch['targets'], config)
  if warmup_steps:
    # Branch 1, the warm-up, does not run the label-blind pass (nor its
    # backward pass): Loss.branches.
    return branched_loss(
        prepare, denominators, (loss_of(False), loss_of(True)),
        lambda batch: batch['itm_reads_corrupted'][0].astype(jnp.int32))
  return Loss(prepare=prepare, loss=loss_of(False), denominators=denominators)


def choose_positions(rng, eligible, prob, scores=None):
  """Picks round(prob * #eligible) (at least 1 where any) positions: random
  ones, or those of the highest `scores`.

  Args: eligible [B, L] bool; scores [B, L] float or None (uniform noise
    from rng: a random choice).
  Returns: positions [B, M] int32 (highest score first) and weights [B, M]
    bool, with the static M = ceil(prob * L); unused entries have weight
    False.
  """
  L = eligible.shape[1]
  M = max(1, math.ceil(prob * L))
  if scores is None:
    scores = jax.random.uniform(rng, eligible.shape)
  scores = jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf)
  top, positions = jax.lax.top_k(scores, M)
  count = jnp.sum(eligible, axis=1, keepdims=True)
  wanted = jnp.where(count > 0, jnp.maximum(1, jnp.round(prob * count)), 0)
  weights = (jnp.arange(M)[None] < wanted) & (top > -jnp.inf)
  return positions.astype(jnp.int32), weights


def scatter_where(x, positions, weights, updates):
  """x [B, L, ...]: x[b, positions[b, m]] = updates[b, m] where weights."""
  return cmap.scatter_slots(x, jnp.where(weights, positions, x.shape[1]),
                              updates)


def anchor_modifier_slots(batch):
  """[B, T] bool: the text slot just before each valid anchor's first
  piece (its modifier in 'a red cube'), where that slot is not an anchor's
  own; MLM's eligibility still decides (no [CLS] or special token)."""
  T = batch['input_ids'].shape[1]
  before = jnp.where(batch['anchor_valid'] > 0,
                     batch['anchor_text_pos'] - 1, T)  # T: dropped.
  slots = cmap.scatter_slots(jnp.zeros(batch['input_ids'].shape, bool),
                             before, jnp.ones(before.shape, bool))
  return slots & ~anchor_text_cover(batch)


def anchor_text_cover(batch, which=None):
  """[B, T] bool: text slots inside any of the anchor words `which` [B, K]
  (default the valid ones), all their pieces."""
  which = batch['anchor_valid'] if which is None else which
  t = jnp.arange(batch['input_ids'].shape[1])[None, None]
  inside = ((t >= batch['anchor_text_pos'][..., None])
            & (t < batch['anchor_text_end'][..., None]) & which[..., None])
  return jnp.any(inside, axis=1)


def anchor_region_cover(batch, which=None):
  """[B, R] bool: region slots that are the region of one of the anchors
  `which` [B, K] (default the valid ones)."""
  which = batch['anchor_valid'] if which is None else which
  r = jnp.arange(batch['region_mask'].shape[1])[None, None]
  hit = (r == batch['anchor_region'][..., None]) & which[..., None]
  return jnp.any(hit, axis=1)


def hide_anchor_inputs(inputs, batch, hidden, mask_id):
  """The UMSE inputs without the anchors `hidden` [B, K]: their word pieces
  become mask_id, their regions are zeroed (region_feats; pixels: marked in
  region_masked, which the model zeroes after pooling)."""
  words = anchor_text_cover(batch, hidden)
  regions = anchor_region_cover(batch, hidden)
  out = dict(inputs, input_ids=jnp.where(
      words, jnp.asarray(mask_id, inputs['input_ids'].dtype),
      inputs['input_ids']))
  if 'images' in batch:
    out['region_masked'] = inputs.get('region_masked', False) | regions
  else:
    out['region_feats'] = jnp.where(regions[..., None], 0,
                                    inputs['region_feats'])
  return out


def prepare_inputs(batch, rng, config, specials, *, actions='sampled',
                   corrupt=True):
  """Corrupts a batch for one pre-training step.

  Returns (inputs, targets): the model's input dict (see model.cmal.CMAL) and
  what the losses compare against. CMAP actions (with cmap.enabled) are
  'sampled' as in training, 'all_swapped' (every valid anchor: a
  deterministic stress test of AMC) or 'none' (CMAP off: the inputs do not
  depend on the anchors, what label-blind ITM reads).
  corrupt=False skips MLM and MRC masking (for scoring pairs).

  With cmap.hide_inputs the UMSE pass whose features stay does not read a
  hidden anchor: its word pieces are [MASK] and its region is zeroed, for
  MASK anchors, and for SWAP anchors too when the moved features come from
  their own pass (model.moved_place='none'; inputs['moved'] then holds the
  pair as that pass reads it: MLM and MRC applied, anchors not hidden).
  """
  if actions not in ('sampled', 'all_swapped', 'none'):
    raise ValueError(f"actions={actions!r}: 'sampled', 'all_swapped' or "
                     "'none'")
  cmap_rng, mlm_rng, mlm_sub_rng, mrc_rng = jax.random.split(rng, 4)
  ids = batch['input_ids']
  # MLM/MRC are scored only where the caption fits its image, but positions
  # are corrupted on every pair: masking only positives would tell ITM the
  # label.
  positive = batch['itm_label'] > 0
  valid = batch['anchor_valid']

  if not config.cmap.enabled or actions == 'none':
    action = jnp.zeros_like(valid, jnp.int32)
  elif actions == 'all_swapped':
    action = cmap.all_swapped(valid)
  else:
    action = cmap.sample_anchor_actions(
        cmap_rng, valid, select_prob=config.cmap.select_prob,
        swap_prob=config.cmap.swap_prob, mask_prob=config.cmap.mask_prob)

  # MLM: 15 % of real, non-special, non-anchor tokens; BERT's 80/10/10.
  # With loss.mask_anchors (CMAP off: SemVLP, SemMIM) anchors are eligible
  # too: those recipes' papers mask any word and any object.
  skip_anchors = not config.loss.get('mask_anchors', False)
  special = (ids == specials.cls) | (ids == specials.sep) | (ids == specials.pad)
  eligible = (batch['text_mask'] > 0) & ~special
  if skip_anchors:
    eligible &= ~anchor_text_cover(batch)
  modifier_prob = config.loss.get('mlm_modifier_prob', 0.0)
  scores = None  # Uniform: the default draw, unchanged.
  if modifier_prob > 0:
    mlm_rng, pick_rng = jax.random.split(mlm_rng)
    noise_rng, pick_rng = jax.random.split(pick_rng)
    preferred = anchor_modifier_slots(batch) & (
        jax.random.uniform(pick_rng, ids.shape) < modifier_prob)
    scores = jax.random.uniform(noise_rng, ids.shape) + preferred
  mlm_pos, corrupted = choose_positions(mlm_rng, eligible,
                                        config.loss.mlm_prob, scores)
  mlm_targets = jnp.take_along_axis(ids, mlm_pos, axis=1)
  u_rng, tok_rng = jax.random.split(mlm_sub_rng)
  u = jax.random.uniform(u_rng, mlm_pos.shape)
  random_ids = jax.random.randint(tok_rng, mlm_pos.shape, 0,
                                  specials.vocab_size)
  replaced = jnp.where(u < 0.8, specials.mask,
                       jnp.where(u < 0.9, random_ids, mlm_targets))
  if corrupt and config.loss.mlm > 0:
    ids = scatter_where(ids, mlm_pos, corrupted, replaced.astype(ids.dtype))
  mlm_w = corrupted & positive[:, None]

  # MRC: zero 15 % of tagged, non-anchor regions (UNITER's masking).
  region_tags = batch['region_tags']
  mrc_eligible = (batch['region_mask'] > 0) & (region_tags >= 0)
  if skip_anchors:
    mrc_eligible &= ~anchor_region_cover(batch)
  mrc_pos, mrc_corrupted = choose_positions(mrc_rng, mrc_eligible,
                                            config.loss.mrc_prob)
  mrc_w = mrc_corrupted & positive[:, None]
  mrc_masked = mrc_corrupted if corrupt and config.loss.mrc > 0 else None

  inputs = dict(
      input_ids=ids, text_mask=batch['text_mask'],
      **_masked_regions(batch, mrc_pos, mrc_masked),
      region_boxes=batch['region_boxes'], region_mask=batch['region_mask'],
      anchor_text_pos=batch['anchor_text_pos'],
      anchor_text_end=batch['anchor_text_end'],
      anchor_region=batch['anchor_region'], anchor_action=action,
      mlm_positions=mlm_pos)
  cmap_on = config.cmap.enabled and actions != 'none'
  if not cmap_on:  # Nothing moves: the inputs do not depend on the anchors.
    del inputs['anchor_action']
  own_pass = config.model.get('moved_place', 'none') == 'none'
  moved = None
  if cmap_on and own_pass:
    # The moved features' pass reads the pair as corrupted so far.
    moved = {k: inputs[k] for k in ('input_ids', 'region_feats')
             if k in inputs}
    if 'images' in inputs:  # Its own mask: the main pass hides more.
      moved['region_masked'] = inputs.get(
          'region_masked', jnp.zeros(batch['region_mask'].shape, bool))
  if cmap_on and config.cmap.get('hide_inputs', True):
    masked = action == cmap.MASK
    if moved is not None:  # Its features of SWAP anchors are what moves.
      moved = hide_anchor_inputs(moved, batch, masked, specials.mask)
    hidden = masked | (own_pass & (action == cmap.SWAP))
    inputs = hide_anchor_inputs(inputs, batch, hidden, specials.mask)
  if moved is not None:
    inputs['moved'] = moved
  swapped = action == cmap.SWAP
  tag_at_swapped = config.loss.get('amc_tag_at', 'unswapped') == 'all'
  amc_tag = jnp.take_along_axis(region_tags, batch['anchor_region'], axis=1)
  targets = dict(
      itm_label=batch['itm_label'], positive=positive,
      mlm_targets=mlm_targets, mlm_weights=mlm_w,
      amc_weights=action != cmap.NONE,
      amc_region=batch['anchor_region'], amc_text_pos=batch['anchor_text_pos'],
      amc_word=jnp.take_along_axis(batch['input_ids'],
                                   batch['anchor_text_pos'], axis=1),
      amc_tag=amc_tag,
      # The tag is scored where the region slot still holds its region (or
      # the mask vector): after a swap it holds the anchor word, which names
      # the tag (loss.amc_tag_at='all' scores it there too, the ablation).
      amc_tag_weights=((action != cmap.NONE) & (amc_tag >= 0)
                       & (tag_at_swapped | ~swapped)),
      mrc_positions=mrc_pos, mrc_weights=mrc_w,
      mrc_targets=jnp.take_along_axis(region_tags, mrc_pos, axis=1))
  return inputs, targets


def _masked_regions(batch, positions, masked):
  """The visual inputs, MRC's masked regions zeroed: {region_feats} with the
  features at `positions` (where `masked`) set to 0, or for pixels {images,
  region_masked [B, R] bool}, which the model zeroes after pooling. masked
  None: nothing is masked."""
  if 'images' in batch:
    out = dict(images=batch['images'])
    if masked is not None:
      out['region_masked'] = scatter_where(
          jnp.zeros(batch['region_mask'].shape, bool), positions, masked,
          jnp.ones(positions.shape, bool))
    return out
  feats = batch['region_feats']
  if masked is not None:
    feats = scatter_where(feats, positions, masked,
                           jnp.zeros(positions.shape + feats.shape[2:],
                                     feats.dtype))
  return dict(region_feats=feats)


def itc_logits(sim, log_scale):
  """Cosine similarities -> ITC's float32 logits, sim / tau, with 1 / tau
  = exp(log_scale) capped at 100 (CLIP's cap)."""
  return sim.astype(jnp.float32) * jnp.exp(
      jnp.minimum(log_scale, math.log(100.0)))


def itc_loss(text, image, log_scale, positive, denom=None):
  """InfoNCE both ways over the matched pairs of the global batch.

  text, image [B, D] unit vectors; positive [B] marks pairs whose caption is
  their image's own. Under jit the batch is global, so every shard's pairs
  are negatives for every other shard's (with gradient accumulation, those
  of the same micro-batch). denom: as in weighted_xent.
  """
  logits = itc_logits(jnp.einsum('id,jd->ij', text, image), log_scale)
  pair_ok = positive[:, None] & positive[None, :]
  logits = jnp.where(pair_ok, logits, -1e9)
  labels = jnp.arange(text.shape[0])
  t2i = weighted_xent(logits, labels, positive, denom)
  i2t = weighted_xent(logits.T, labels, positive, denom)
  return (t2i[0] + i2t[0]) / 2, (t2i[1] + i2t[1]) / 2


def mine_hard_negatives(sim, log_scale, same, rng):
  """ALBEF's in-batch hard negatives for ITM: for each caption an image,
  and for each image a caption, drawn with probability softmax(ITC
  similarity / tau) among the pairs that do not match.

  sim [B, B] (caption i, image j; no gradient needed); log_scale: ITC's
  log(1 / tau); same [B, B] bool, the pairs that match (the diagonal, and
  any two rows of one image). -> (image of each caption [B], caption of
  each image [B]), int32 row indices. A row with no other pair draws its
  own, as a batch of one must.
  """
  logits = jnp.where(same, -1e9, itc_logits(sim, log_scale))
  text_rng, image_rng = jax.random.split(rng)
  image_of_text = jax.random.categorical(text_rng, logits, axis=1)
  text_of_image = jax.random.categorical(image_rng, logits, axis=0)
  return image_of_text.astype(jnp.int32), text_of_image.astype(jnp.int32)


def loss_denominators(targets, config):
  """What each objective's mean divides by: its number of entries in the
  batch (at least 1). Computed once over the whole batch, so that with
  gradient accumulation the micro-batches' losses and metrics add up to the
  batch's exactly (ITC aside: its negatives are the micro-batch's)."""
  return dict(**amc.amc_denominators(targets),
              mlm=denominator(targets['mlm_weights']),
              itm=denominator(jnp.ones_like(targets['itm_label'])),
              mrc=denominator(targets['mrc_weights']),
              itc=denominator(targets['positive']))


def compute_losses(outputs, targets, config, denominators=None):
  """Weighted sum of the enabled objectives -> (loss, metrics dict).

  denominators: loss_denominators of the whole batch when `targets` are a
  micro-batch's; None computes them from `targets`.
  """
  lc = config.loss
  metrics, total = {}, 0.0
  d = (loss_denominators(targets, config) if denominators is None
       else denominators)

  def add(name, weight, loss):
    nonlocal total
    metrics[f'loss_{name}'] = loss
    total = total + weight * loss

  if lc.amc > 0:
    losses, amc_metrics = amc.amc_loss(outputs, targets, lc.amc_targets, d)
    for name, loss in losses.items():
      add(name, lc.amc, loss)
    metrics.update(amc_metrics)
  if lc.mlm > 0:
    loss, acc, _ = weighted_xent(outputs['mlm_logits'],
                                 targets['mlm_targets'],
                                 targets['mlm_weights'], d['mlm'])
    add('mlm', lc.mlm, loss)
    metrics['acc_mlm'] = acc
  if lc.itm > 0:
    loss, acc, _ = weighted_xent(outputs['itm_logits'], targets['itm_label'],
                                 jnp.ones_like(targets['itm_label'], bool),
                                 d['itm'])
    add('itm', lc.itm, loss)
    metrics['acc_itm'] = acc
  if lc.mrc > 0:
    logits = jnp.take_along_axis(
        outputs['mrc_logits'], targets['mrc_positions'][..., None], axis=1)
    loss, acc, _ = weighted_xent(logits, targets['mrc_targets'],
                                 targets['mrc_weights'], d['mrc'])
    add('mrc', lc.mrc, loss)
    metrics['acc_mrc'] = acc
  if lc.itc > 0:
    loss, acc = itc_loss(outputs['itc_text'], outputs['itc_image'],
                         outputs['itc_log_scale'], targets['positive'],
                         d['itc'])
    add('itc', lc.itc, loss)
    metrics['acc_itc'] = acc
  metrics['loss'] = total
  return total, metrics
