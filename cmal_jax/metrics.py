"""Metrics to workdir/metrics.jsonl (machine-readable) and TensorBoard event
files (workdir/tensorboard); only process 0 writes."""

import json
import os

import jax


class MetricWriter:
  """Appends to a run's metrics; on a resume from `resume_step` it first
  drops the lines of steps after it (written after the last checkpoint by
  the interrupted run, and about to be written again)."""

  def __init__(self, workdir, resume_step=0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # Imported lazily: heavy.
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path):
      drop_lines_after(path, resume_step)
    self.jsonl = open(path, 'a')
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, scalars):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, int(step))
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def drop_lines_after(path, step):
  """Rewrites a metrics.jsonl keeping the lines of steps <= `step` (an
  incomplete last line, from a killed writer, goes too); atomic."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('step', 0) <= step:
        kept.append(json.dumps(record) + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)
