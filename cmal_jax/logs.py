"""What a run reports: one log line per interval and, on a terminal, a live
progress bar between them; and run_info, where and with what it ran."""

import platform
import socket
import sys
import time
from importlib import metadata

import jax


def log(*args):
  """print on process 0 only (every process runs the same code)."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def format_log_line(step, total_steps, mean):
  """One line: step, epoch, losses, accuracies, lr, grad norm, speed, ETA."""
  losses = ' '.join(f'{k[5:]}={mean[k]:.3f}' for k in sorted(mean)
                    if k.startswith('loss_'))
  accs = ' '.join(f'{k[4:]}={mean[k]:.2f}' for k in sorted(mean)
                  if k.startswith('acc_'))
  eta = (total_steps - step) / mean['steps_per_sec']
  skipped = (f' skipped={mean["nonfinite_skips"]}'
             if mean['nonfinite_skips'] else '')
  if 'float16_loss_scale' in mean:  # float16 (train_step.LossScale).
    skipped += f' loss_scale={mean["float16_loss_scale"]:g}' + (
        f' overflows={mean["float16_overflow_skips"]}'
        if mean.get('float16_overflow_skips') else '')
  return (f'step {step}/{total_steps} epoch {mean["epoch"]:.2f} '
          f'loss={mean["loss"]:.3f} [{losses}] [{accs}] lr={mean["lr"]:.2e} '
          f'grad_norm={mean["grad_norm"]:.2f}{skipped} '
          f'{mean["steps_per_sec"]:.2f} steps/s '
          f'{mean["examples_per_sec"]:.0f} ex/s ETA {eta / 60:.1f} min')


class ProgressBar:
  """A live one-line bar on a terminal (process 0); nothing otherwise, so
  CI and SLURM logs get only the plain log lines."""

  def __init__(self, total, width=30):
    self.total, self.width = total, width
    self.active = jax.process_index() == 0 and sys.stdout.isatty()
    self.start, self.first = time.time(), None

  def update(self, step):
    if not self.active:
      return
    if self.first is None:
      self.first, self.start = step, time.time()
      return
    done = int(self.width * step / self.total)
    rate = (step - self.first) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    sys.stdout.write(f'\r[{"#" * done}{"." * (self.width - done)}] '
                     f'{step}/{self.total} {rate:.2f} steps/s '
                     f'ETA {eta / 60:.1f} min ')
    sys.stdout.flush()

  def clear(self):
    if self.active:
      sys.stdout.write('\r' + ' ' * (self.width + 50) + '\r')
      sys.stdout.flush()


def run_info(mesh):
  """Where and with what this run runs: versions and device topology."""
  packages = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
              'numpy', 'tokenizers', 'ml_collections', 'cmal-jax')
  versions = {}
  for name in packages:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return dict(
      time=time.strftime('%Y-%m-%dT%H:%M:%S%z'), host=socket.gethostname(),
      argv=sys.argv, python=platform.python_version(), packages=versions,
      backend=jax.default_backend(), process_index=jax.process_index(),
      process_count=jax.process_count(), device_count=len(devices),
      local_device_count=jax.local_device_count(),
      device_kinds=sorted({d.device_kind for d in devices}),
      mesh=dict(mesh.shape))
