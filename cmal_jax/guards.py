"""What keeps a long run trustworthy: preemption (SIGTERM) and non-finite
updates (resuming only the same run: run_identity.py)."""

import signal

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp


class Preemption:
  """Turns SIGTERM (what preemptible machines send) into a flag the loop
  polls once per step, so it can finish the step, save and exit cleanly.

  With several processes, jax.distributed's preemption service receives the
  signal and all processes agree on the step to stop at.
  """

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    self._previous = None
    if not self.multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step):
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def all_finite(tree):
  """True (a device scalar) when every float leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class NonFiniteGuard:
  """Counts consecutive skipped updates on the host; raises after `limit`.

  Reads each step's `update_skipped` flag one step late (after the next step
  is dispatched), so checking does not stall the device queue. A float16
  step skipped because its scaled gradients overflowed
  (`float16_overflow_skipped`: the loss scale halves, train_step.LossScale)
  is expected and neither counts nor breaks a streak. The scale stops
  halving at 1, so at most log2(scale) of them come in a row (15 from the
  initial 2**15); from then on every overflow counts.
  """

  def __init__(self, limit):
    self.limit = limit
    self.streak = 0
    self.first_step = None
    self._pending = None

  def observe(self, step, metrics):
    """Queues this step's metrics and checks the previous step's."""
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self):
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step, metrics):
    host = jax.device_get(metrics)
    if host.get('float16_overflow_skipped', False):
      return
    if not host['update_skipped']:
      self.streak, self.first_step = 0, None
      return
    self.streak += 1
    self.first_step = self.first_step or step
    if self.streak >= self.limit:
      bad = [k[5:] for k, v in sorted(host.items())
             if k.startswith('loss_') and not _finite(v)]
      what = ('objective(s) ' + ', '.join(bad) if bad else
              'the gradient norm (every loss was finite)')
      if not bad and 'float16_overflow_skipped' in host:
        what += (' at float16 loss scale 1 (no scaling left to take back; '
                 "if float16's range is too small, bfloat16 has float32's)")
      raise FloatingPointError(
          f'{self.streak} consecutive non-finite updates, steps '
          f'{self.first_step}..{step}: {what} went non-finite '
          f'(loss={host["loss"]}, grad_norm={host["grad_norm"]}). The '
          f'updates were skipped, so the last checkpoint is clean; limit: '
          f'config.max_nonfinite_steps={self.limit}.')


def _finite(x):
  return bool(jnp.isfinite(x))
