"""A gs:// workdir (TPU pods), tested without GCS.

epath sends gs:// to fsspec's 'gcs' filesystem (gcsfs on a pod); here an
in-memory stand-in takes its place, which like GCS refuses appends. Orbax's
array writes (tensorstore's own GCS driver) cannot be faked: the whole run
below keeps its two Orbax folders on local disk, and the checkpoint paths
are tested on their own. The synthetic world of a remote workdir goes to a
local folder that every process generates: two processes generate the same
one at once here.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading

from etils.epath import backend as epath_backend
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import pytest

from cmal_jax import checkpoint, finetune, jobs, metrics, storage, train
from cmal_jax.data import records, tasks
from cmal_jax.world import synthetic
from configs import finetune as finetune_configs
from configs import pretrain as pretrain_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGCS(MemoryFileSystem):
  """gcsfs's paths ('bucket/key') over memory; no appends, like GCS."""
  protocol = ('gs', 'gcs')
  store = {}  # Its own, not MemoryFileSystem's.
  pseudo_dirs = ['']
  renames = 0

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ('gs://', 'gcs://'):
      path = path.removeprefix(prefix)
    return path.strip('/')

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      raise NotImplementedError(f'{path}: GCS objects cannot be appended to')
    return super()._open(path, mode, **kwargs)

  def mv(self, *args, **kwargs):
    FakeGCS.renames += 1
    return super().mv(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
  registry = sys.modules['fsspec.registry']._registry
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(registry, name, FakeGCS)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = ['']
  FakeGCS.renames = 0
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


# ------------------------------------------------------------------- paths

def test_remote_paths_are_not_made_absolute():
  assert checkpoint.checkpoint_dir('gs://b/runs/x') == (
      'gs://b/runs/x/checkpoints')
  assert checkpoint.best_dir('gs://b/runs/x/') == 'gs://b/runs/x/best'
  assert checkpoint.checkpoint_dir('runs/x') == os.path.abspath(
      'runs/x/checkpoints')  # Local: absolute, as Orbax wants.
  assert storage.is_remote('gs://b/x') and not storage.is_remote('/tmp/x')


def test_load_pretrained_names_the_remote_path(fake_gcs):
  with pytest.raises(FileNotFoundError, match='init_from: gs://b/none is '):
    checkpoint.load_pretrained_params('gs://b/none')


# ----------------------------------------------------------- atomic writes

def test_write_text_atomic_local(tmp_path):
  path = tmp_path / 'best.json'
  storage.write_text_atomic(path, '{"step": 1}')
  storage.write_text_atomic(str(path), '{"step": 2}')
  assert path.read_text() == '{"step": 2}'
  with pytest.raises(TypeError):  # Fails while writing: the old file stays.
    storage.write_text_atomic(path, None)
  assert path.read_text() == '{"step": 2}'


def test_write_text_atomic_remote_writes_the_object(fake_gcs):
  storage.write_text_atomic('gs://b/r/eval.json', '{"a": 1}')
  storage.write_text_atomic('gs://b/r/eval.json', '{"a": 2}')
  assert sorted(fake_gcs) == ['b/r/eval.json']  # No temporary object.
  assert fake_gcs['b/r/eval.json'].getvalue() == b'{"a": 2}'
  assert FakeGCS.renames == 0  # A rename is copy + delete on GCS.


def test_move_aside_remote(fake_gcs):
  storage.write_text_atomic('gs://b/r/checkpoints/3/x', 'state')
  target = storage.move_aside('gs://b/r/checkpoints')
  assert target.startswith('gs://b/r/checkpoints.replaced-')
  assert sorted(fake_gcs) == [target[5:] + '/3/x']


# ----------------------------------------------------------------- metrics

class StubSummaryWriter:
  logdirs = []

  def __init__(self, logdir):
    self.logdirs.append(logdir)

  def add_scalar(self, *args):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def test_metric_writer_remote_rewrites_and_resumes(fake_gcs, monkeypatch):
  # tensorboardX writes gs:// itself with google-cloud-storage, absent here.
  import tensorboardX
  monkeypatch.setattr(tensorboardX, 'SummaryWriter', StubSummaryWriter)
  lines = lambda: fake_gcs['b/r/metrics.jsonl'].getvalue().decode()
  writer = metrics.MetricWriter('gs://b/r')
  for step in (1, 2, 3):
    writer.write(step, {'loss': step / 10})
  writer.close()
  assert StubSummaryWriter.logdirs[-1] == 'gs://b/r/tensorboard'
  assert [l[:10] for l in lines().splitlines()] == [
      '{"step": 1', '{"step": 2', '{"step": 3']
  # A killed writer's torn line, then a resume from the step-2 checkpoint.
  storage.write_text_atomic('gs://b/r/metrics.jsonl', lines() + '{"ste')
  writer = metrics.MetricWriter('gs://b/r', resume_step=2)
  writer.write(3, {'loss': 0.5})
  writer.close()
  assert lines().splitlines() == ['{"step": 1, "loss": 0.1}',
                                  '{"step": 2, "loss": 0.2}',
                                  '{"step": 3, "loss": 0.5}']


# ------------------------------------------------ synthetic data, locally

def _tiny(task='pretrain', **world):
  if task == 'pretrain':
    config = pretrain_configs.get_config('tiny')
  else:
    config = finetune_configs.get_config(f'{task},tiny')
  config.world.update(world)
  return config


def test_remote_workdir_world_goes_to_a_local_folder(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  config = _tiny()
  folder = synthetic.data_dir(config, 'gs://b/runs/x')
  assert os.path.dirname(folder) == str(tmp_path / 'cmal_world')
  assert synthetic.data_dir(config, 'gs://b/runs/other') == folder  # Shared.
  for other in (_tiny(num_train=512), _tiny(image_size=32)):
    assert synthetic.data_dir(other, 'gs://b/runs/x') != folder
  seeded = _tiny()
  seeded.seed += 1
  assert synthetic.data_dir(seeded, 'gs://b/runs/x') != folder
  assert synthetic.data_dir(_tiny('ve'), 'gs://b/runs/x') != folder
  # Local workdirs and data.dir: as before.
  assert synthetic.data_dir(config, 'runs/x') == os.path.join('runs/x', 'data')
  config.data.dir = '/data/records'
  assert synthetic.data_dir(config, 'gs://b/runs/x') == '/data/records'


def test_generate_once_race_has_one_winner(tmp_path):
  target = str(tmp_path / 'world' / 'w')
  both_generating = threading.Barrier(2, timeout=30)
  won = []

  def generate(folder):
    with open(os.path.join(folder, 'data'), 'w') as f:
      f.write(threading.current_thread().name)
    both_generating.wait()  # Both have a private copy before either renames.

  threads = [threading.Thread(
      target=lambda: won.append(synthetic.generate_once(target, generate)),
      name=f't{i}') for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(won) == [False, True]
  assert os.listdir(tmp_path / 'world') == ['w']  # No private copy left.
  assert open(os.path.join(target, 'data')).read() in ('t0', 't1')
  assert synthetic.generate_once(target, None) is False  # Complete: skipped.


GENERATE = '''
import os, sys, time
from cmal_jax.world import synthetic
from configs import pretrain
config = pretrain.get_config('tiny')
config.world.num_train, config.world.num_eval = 96, 16
directory, me, other = sys.argv[1:]
open(me, 'w').close()
deadline = time.time() + 60
while not os.path.exists(other) and time.time() < deadline:
  time.sleep(0.01)  # Start together.
synthetic.ensure_world_data(config, directory, every_process=True)
'''


def test_two_processes_generate_one_world(tmp_path):
  directory = str(tmp_path / 'cmal_world' / 'pretrain-abc')
  ready = [str(tmp_path / f'ready{i}') for i in range(2)]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [ROOT, os.environ.get('PYTHONPATH', '')]))
  procs = [subprocess.Popen(
      [sys.executable, '-c', GENERATE, directory, ready[i], ready[1 - i]],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
  assert os.listdir(tmp_path / 'cmal_world') == ['pretrain-abc']
  assert records.read_meta(directory)['splits'] == {'pretrain': 96, 'val': 16}
  for split, num in (('pretrain', 96), ('val', 16)):
    source = records.open_source(records.split_path(directory, split))
    assert len(source) == num
    assert records.decode_record(source[num - 1])['caption']


def test_finetune_task_data_of_a_remote_workdir(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  config = _tiny('ve', num_train=32, num_eval=16, num_test=16)
  directory = synthetic.data_dir(config, 'gs://b/runs/ve')
  finetune.ensure_task_data(config, directory, every_process=True)
  for split, num in (('train', 32), ('val', 16), ('test', 16)):
    path = tasks.task_path(directory, 've', split)
    assert len(records.open_source(path)) == num
  assert os.listdir(os.path.dirname(directory)) == [
      os.path.basename(directory)]


# ------------------------------------------------------- a whole tiny run

# Slow (a whole run): the tests above cover the project's own remote writes
# (atomic text, metrics, moving aside) in the default run; Orbax's gs://
# checkpoint writes are exercised only here.
@pytest.mark.slow
def test_tiny_run_with_a_gs_workdir(fake_gcs, monkeypatch, tmp_path):
  import tensorboardX
  monkeypatch.setattr(tensorboardX, 'SummaryWriter', StubSummaryWriter)
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  monkeypatch.setattr(checkpoint, 'checkpoint_dir',
                      lambda workdir: str(tmp_path / 'orbax' / 'checkpoints'))
  for module in (train, checkpoint):  # train imports it by name.
    monkeypatch.setattr(module, 'best_dir',
                        lambda workdir: str(tmp_path / 'orbax' / 'best'))
  config = _tiny(num_train=64, num_eval=64)
  config.total_steps, config.log_every, config.eval.every_steps = 1, 1, 0
  results = jobs.train_and_evaluate(config, 'gs://b/runs/x')
  assert sorted(fake_gcs) == [f'b/runs/x/{name}' for name in (
      'best.json', 'config.json', 'eval.json', 'metrics.jsonl',
      'run_info.json')]
  assert FakeGCS.renames == 0
  text = lambda name: fake_gcs[f'b/runs/x/{name}'].getvalue().decode()
  assert json.loads(text('eval.json'))['step'] == results['step'] == 1
  assert json.loads(text('best.json'))['step'] == 1
  assert [json.loads(l)['step'] for l in text('metrics.jsonl').splitlines()
          ] == [1, 1]  # The train and the final eval line.
  assert len(text('run_info.json').splitlines()) == 1
  assert StubSummaryWriter.logdirs[-1] == 'gs://b/runs/x/tensorboard'
  world_dirs = os.listdir(tmp_path / 'cmal_world')  # Local, not in gs://.
  assert world_dirs == [os.path.basename(synthetic.data_dir(config, 'gs://b/x'))]
  assert os.listdir(tmp_path / 'orbax' / 'checkpoints') == ['1']
