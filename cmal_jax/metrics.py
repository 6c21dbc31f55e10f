"""Metrics to workdir/metrics.jsonl (machine-readable) and TensorBoard event
files (workdir/tensorboard); only process 0 writes. The workdir may be
local or gs://."""

import json

from etils import epath
import jax

from cmal_jax import storage


class MetricWriter:
  """Appends to a run's metrics; on a resume from `resume_step` it first
  drops the lines of steps after it (written after the last checkpoint by
  the interrupted run, and about to be written again)."""

  def __init__(self, workdir, resume_step=0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # Imported lazily: heavy.
    path = epath.Path(workdir) / 'metrics.jsonl'
    # A GCS object cannot be appended to: for a remote workdir keep every
    # line in memory and rewrite the whole object on each write (the file
    # is small). Simpler than a local copy to upload, and each rewrite is
    # a whole object, never a torn line.
    self.remote_lines = None
    if storage.is_remote(workdir):
      self.remote_lines = (kept_lines(path.read_text(), resume_step)
                           if path.exists() else [])
      self.path = path
    else:
      if path.exists():
        drop_lines_after(path, resume_step)
      self.jsonl = open(path, 'a')
    # tensorboardX 2.6.5 writes gs:// itself (record_writer.GCSRecordWriter)
    # but only with google-cloud-storage installed (gcsfs, which epath needs
    # for gs://, pulls it in); each flush uploads the whole event file.
    self.tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step, scalars):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({'step': int(step), **scalars}) + '\n'
    if self.remote_lines is not None:
      self.remote_lines.append(line)
      storage.write_text_atomic(self.path, ''.join(self.remote_lines))
    else:
      self.jsonl.write(line)
      self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, int(step))
    self.tb.flush()

  def close(self):
    if self.active:
      if self.remote_lines is None:
        self.jsonl.close()
      self.tb.close()


def kept_lines(text, step):
  """The lines of a metrics.jsonl text of steps <= `step` (an incomplete
  line, from a killed writer, goes too)."""
  kept = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get('step', 0) <= step:
      kept.append(json.dumps(record) + '\n')
  return kept


def drop_lines_after(path, step):
  """Rewrites a metrics.jsonl keeping the lines of steps <= `step` (an
  incomplete last line, from a killed writer, goes too); atomic."""
  with open(path) as f:
    text = f.read()
  storage.write_text_atomic(path, ''.join(kept_lines(text, step)))
