"""Metrics to workdir/metrics.jsonl (machine-readable) and TensorBoard event
files (workdir/tensorboard); only process 0 writes."""

import json
import os

import jax


class MetricWriter:

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # Imported lazily: heavy.
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
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
