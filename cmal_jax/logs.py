"""What a run prints: one log line per interval and, on a terminal, a live
progress bar between them."""

import sys
import time

import jax


def format_log_line(step, total_steps, mean):
  """One line: step, epoch, losses, accuracies, lr, grad norm, speed, ETA."""
  losses = ' '.join(f'{k[5:]}={mean[k]:.3f}' for k in sorted(mean)
                    if k.startswith('loss_'))
  accs = ' '.join(f'{k[4:]}={mean[k]:.2f}' for k in sorted(mean)
                  if k.startswith('acc_'))
  eta = (total_steps - step) / mean['steps_per_sec']
  skipped = (f' skipped={mean["nonfinite_skips"]}'
             if mean['nonfinite_skips'] else '')
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
