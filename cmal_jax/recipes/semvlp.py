"""SemVLP (Li et al., 2021): one encoder pre-trained in both modes. Every
unified layer carries a cross-modal attention sub-layer (model/layers.py);
of every `two_stream_every` steps the last runs two-stream (each modality
attends to itself, then to the other through it), the others single-stream.
Objectives: MLM, masked object prediction (MRC) and ITM, masking any word
and object (docs/semvlp.md)."""

import jax
import jax.numpy as jnp

from cmal_jax import objectives

TITLE = 'SemVLP'


def configure_model(config):
  config.model.cross_attention = True


def configure(config):
  # Of every N steps the last runs two-stream (2: alternate); 0: every step
  # runs model.two_stream.
  config.two_stream_every = 2
  config.loss.mrc = 1.0
  config.loss.mask_anchors = True


def check(config):
  every = config.get('two_stream_every', 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f'config.two_stream_every={every!r}: must be an integer '
                     '>= 0')
  if every and not config.model.get('cross_attention', False):
    raise ValueError(
        f'config.two_stream_every={every!r}: alternating modes needs the '
        'cross-attention sub-layer: set model.cross_attention=True')


def two_stream_step(step, every):
  """SemVLP's schedule: whether `step` (0-based) runs two-stream. Of each
  `every` steps the last does (every=2: single, two, single, ...)."""
  return step % every == every - 1


def make_loss(model, config, specials):
  """objectives.pretraining_loss in the mode of the step: one program holds
  both modes and runs only the step's (Loss.branches)."""
  every = config.get('two_stream_every', 0)
  if not every:
    return objectives.pretraining_loss(model, config, specials)
  single, two = (objectives.pretraining_loss(model, config, specials,
                                             two_stream=mode)
                 for mode in (False, True))

  def prepare(batch, rng, state=None):
    prepared = single.prepare(batch, rng, state)
    mode = (jnp.bool_(config.model.two_stream) if state is None
            else two_stream_step(state.step, every))
    # Per row, so micro-batches split it like the rest.
    prepared['two_stream'] = jnp.full(batch['input_ids'].shape[:1], mode)
    return prepared

  def with_share(loss):
    def loss_and_share(params, batch, rng, denominators):
      value, metrics = loss(params, batch, rng, denominators)
      # The share of two-stream steps (a sum over micro-batches, like the
      # metrics, so divided by their number).
      metrics['two_stream'] = jnp.mean(batch['two_stream'].astype(
          jnp.float32)) / config.grad_accum_steps
      return value, metrics
    return loss_and_share

  # One branch per mode and per branch of the mode's own loss (ITM's
  # warm-up): objectives.Loss.branches.
  (single_branches, single_branch), (two_branches, two_branch) = (
      objectives.loss_branches(single), objectives.loss_branches(two))

  def branch(batch):
    return jnp.where(batch['two_stream'][0],
                     len(single_branches) + two_branch(batch),
                     single_branch(batch))

  return objectives.branched_loss(
      prepare, single.denominators,
      [with_share(b) for b in single_branches + two_branches], branch)
