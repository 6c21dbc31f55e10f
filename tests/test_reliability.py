"""Crash safety, preemption, non-finite guards, compatible resumes and the
run's records, on the tiny config.

The crash tests run `python -m cmal_jax.main` in subprocesses that are
killed (SIGKILL) or preempted (SIGTERM) mid-run, then run again; the final
parameters must equal, bit for bit, those of a run never interrupted. The
subprocesses share a persistent XLA cache so only the first one compiles.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmal_jax import (checkpoint, jobs, logs, metrics, objectives,
                      pretraining, run_identity, sharding, train, train_step,
                      workdir_lock)
from cmal_jax.data import pipeline
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_testutil import (SHARED_STEPS, assert_trees_equal, good_pair,
                           random_batch, read_json, read_jsonl, saved_state,
                           shared_tiny, train_lines, write_dataset)
from configs import finetune as finetune_config
from configs import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Steps of every run here: cmal_testutil.shared_tiny's (whose runs share one
# compile through the session's XLA cache), and the CLI runs' flags.
TOTAL = SHARED_STEPS


def assert_same_state(a, b):
  assert_trees_equal(a, b, min_leaves=20)


# ------------------------------------------------------ crash safety (CLI)

@pytest.fixture(scope='module')
def cli(world_dir, compilation_cache):
  """Starts `python -m cmal_jax.main` on tiny with the crash-test flags."""
  cache = compilation_cache
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'JAX_COMPILATION_CACHE_DIR': cache,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}

  def start(workdir, *extra, prelude='', job=None):
    args = [*(job or [
        '--config=configs/pretrain.py:tiny', f'--config.data.dir={world_dir}',
        f'--config.total_steps={TOTAL}', '--config.checkpoint_every=4',
        '--config.eval.retrieval_images=8']),
            f'--workdir={workdir}', '--config.log_every=1', *extra]
    if prelude:  # Code run before main, e.g. to plant a crash.
      code = (f'{prelude}\nimport sys\nfrom absl import app\n'
              'from cmal_jax import main\n'
              'sys.argv = ["cmal_jax.main"] + sys.argv[1:]\n'
              'app.run(main.main, flags_parser=main.parse_flags)')
      cmd = [sys.executable, '-c', code, *args]
    else:
      cmd = [sys.executable, '-m', 'cmal_jax.main', *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  def run(workdir, *extra, **kw):
    proc = start(workdir, *extra, **kw)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err

  return start, run


def wait_for_step(proc, workdir, step, timeout=300):
  """Polls metrics.jsonl until it shows `step` (the process still runs)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l).get('step', 0) for l in f if l.endswith('\n')]
      if steps and max(steps) >= step:
        return max(steps)
    time.sleep(0.05)
  raise TimeoutError(f'{workdir} did not reach step {step}')


@pytest.fixture(scope='module')
def reference(cli, tmp_path_factory):
  """A run never interrupted."""
  _, run = cli
  workdir = str(tmp_path_factory.mktemp('reference'))
  code, out, err = run(workdir)
  assert code == 0, err[-3000:]
  return workdir


def assert_metrics_once_per_step(workdir):
  """After a resume, metrics.jsonl holds each step once (the interrupted
  run's lines after its last checkpoint were dropped and written again)."""
  steps = [m['step'] for m in train_lines(read_jsonl(workdir))]
  assert steps == list(range(1, TOTAL + 1))


@pytest.mark.slow
def test_kill_9_mid_run_resumes_bitwise(cli, reference, tmp_path):
  start, run = cli
  workdir = str(tmp_path)
  proc = start(workdir)
  reached = wait_for_step(proc, workdir, 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  saved = checkpoint.make_manager(workdir, pretrain.get_config('tiny'))
  assert 8 <= saved.latest_step() < TOTAL, (reached, saved.latest_step())
  saved.close()
  code, out, err = run(workdir)
  assert code == 0, err[-3000:]
  assert 'Resumed from' in out
  assert_same_state(saved_state(workdir, TOTAL), saved_state(reference, TOTAL))
  assert_metrics_once_per_step(workdir)
  assert read_json(workdir, 'eval.json') == read_json(reference, 'eval.json')


@pytest.mark.slow
def test_a_second_start_on_a_running_workdir_fails_and_changes_nothing(
    cli, reference, tmp_path):
  """Two starts on one workdir (a re-submitted job): the second fails at
  once naming the first; the first ends exactly as a lone run."""
  start, run = cli
  workdir = str(tmp_path)
  first = start(workdir)
  wait_for_step(first, workdir, 2)
  code, out, err = run(workdir)
  assert code != 0
  assert 'is in use by another run' in err and f'pid {first.pid}' in err, (
      err[-3000:])
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert_same_state(saved_state(workdir, TOTAL), saved_state(reference, TOTAL))
  assert_metrics_once_per_step(workdir)
  assert read_json(workdir, 'eval.json') == read_json(reference, 'eval.json')
  assert len(read_jsonl(workdir, 'run_info.json')) == 1
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))


# Runs inside the child: SIGKILL itself when Orbax is about to rename the
# finished temporary folder of step {step} into place (all files written).
KILL_IN_SAVE_AT = '''
import os, signal
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  if os.path.basename(str(self.get_final())) == '{step}':
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
'''
KILL_IN_SAVE = KILL_IN_SAVE_AT.format(step=12)


@pytest.mark.slow
def test_kill_during_checkpoint_save(cli, reference, tmp_path):
  start, run = cli
  workdir = str(tmp_path)
  code, _, _ = run(workdir, prelude=KILL_IN_SAVE)
  assert code == -signal.SIGKILL
  ckpt = checkpoint.checkpoint_dir(workdir)
  names = os.listdir(ckpt)
  # The interrupted save left only a temporary folder; the previous
  # checkpoint is intact and is what a restore finds.
  assert '12' not in names and any(n.startswith('12.') for n in names), names
  manager = checkpoint.make_manager(workdir, pretrain.get_config('tiny'))
  assert manager.latest_step() == 8
  manager.close()
  code, out, err = run(workdir)
  assert code == 0, err[-3000:]
  assert 'Resumed from' in out and 'at step 8' in out
  assert_same_state(saved_state(workdir, TOTAL), saved_state(reference, TOTAL))
  assert_metrics_once_per_step(workdir)


# Runs inside the child: SIGKILL itself right after step {step}'s metrics
# line is written.
KILL_AFTER_STEP = '''
import os, signal
from cmal_jax import metrics
_write = metrics.MetricWriter.write
def write(self, step, *args, **kwargs):
  _write(self, step, *args, **kwargs)
  if step == {step}:
    os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricWriter.write = write
'''


def kill_at_five_moments(cli, workdir, job, total, saves, seed):
  """Kills a run with SIGKILL at five moments drawn with `seed`, resuming
  after each, then runs it to the end: three right after a random step,
  two in the middle of a checkpoint save (of a step in `saves`), all at
  different steps, in increasing order. Returns the moments."""
  _, run = cli
  rng = np.random.default_rng(seed)
  save_steps = rng.choice(saves, 2, replace=False).tolist()
  free = [s for s in range(1, total) if s not in saves]
  kill_steps = rng.choice(free, 3, replace=False).tolist()
  moments = sorted([('step', s) for s in kill_steps]
                   + [('save', s) for s in save_steps], key=lambda m: m[1])
  for kind, step in moments:
    prelude = (KILL_IN_SAVE_AT if kind == 'save' else KILL_AFTER_STEP).format(
        step=step)
    code, out, err = run(workdir, prelude=prelude, job=job)
    assert code == -signal.SIGKILL, (moments, kind, step, err[-3000:])
  code, out, err = run(workdir, job=job)
  assert code == 0, (moments, err[-3000:])
  return moments


@pytest.mark.slow
def test_five_kills_pretraining_ends_bitwise_as_uninterrupted(
    cli, reference, tmp_path):
  workdir = str(tmp_path)
  moments = kill_at_five_moments(cli, workdir, None, TOTAL,
                                 saves=list(range(4, TOTAL, 4)), seed=0)
  assert len(moments) == 5
  assert_same_state(saved_state(workdir, TOTAL), saved_state(reference, TOTAL))
  assert_metrics_once_per_step(workdir)
  assert read_json(workdir, 'eval.json') == read_json(reference, 'eval.json')


FT_TOTAL = 16


def finetune_job(data_dir):
  """Tiny VE from random init: checkpoints every 2 steps, evaluated (and
  the best checkpoint saved) every 4."""
  return ['--config=configs/finetune.py:ve,tiny',
          f'--config.total_steps={FT_TOTAL}', '--config.checkpoint_every=2',
          '--config.eval.every_steps=4', '--config.world.num_train=32',
          '--config.world.num_eval=16', '--config.world.num_test=16'] + (
              [f'--config.data.dir={data_dir}'] if data_dir else [])


@pytest.mark.slow
def test_five_kills_finetuning_ends_bitwise_as_uninterrupted(cli, tmp_path):
  _, run = cli
  reference = str(tmp_path / 'reference')
  code, out, err = run(reference, job=finetune_job(''))
  assert code == 0, err[-3000:]
  workdir = str(tmp_path / 'killed')
  data = os.path.join(reference, 'data')
  moments = kill_at_five_moments(cli, workdir, finetune_job(data), FT_TOTAL,
                                 saves=list(range(2, FT_TOTAL, 2)), seed=1)
  assert len(moments) == 5
  assert_trees_equal(saved_state(workdir, FT_TOTAL),
                     saved_state(reference, FT_TOTAL), min_leaves=20)
  want = read_json(reference, 'eval.json')
  got = read_json(workdir, 'eval.json')
  assert {k: got[k] for k in ('val', 'test', 'best_step')} == {
      k: want[k] for k in ('val', 'test', 'best_step')}


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(cli, reference, tmp_path):
  start, run = cli
  workdir = str(tmp_path)
  proc = start(workdir)
  wait_for_step(proc, workdir, 10)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Preempted (SIGTERM): saved step' in out
  stopped = int(out.split('saved step ')[1].split(';')[0])
  assert 10 <= stopped < TOTAL
  # Saved exactly where it stopped, even off the checkpoint_every grid.
  manager = checkpoint.make_manager(workdir, pretrain.get_config('tiny'))
  assert manager.latest_step() == stopped
  manager.close()
  assert not os.path.exists(os.path.join(workdir, 'eval.json'))
  code, out, err = run(workdir)
  assert code == 0, err[-3000:]
  assert f'at step {stopped}' in out
  assert_same_state(saved_state(workdir, TOTAL), saved_state(reference, TOTAL))
  assert_metrics_once_per_step(workdir)


# ----------------------------------------------------- resume compatibility

def test_a_checkpoint_older_than_a_model_field_takes_its_old_behaviour():
  """A checkpoint written before model.hypersphere existed was made with the
  hypersphere on: it resumes under the default, and not with it off; remat
  may change on resume."""
  config = pretrain.get_config('tiny')
  old = run_identity.signature(config)
  del old['model']['hypersphere']
  old['model']['remat'] = 'none'  # Signed before remat was free.
  assert run_identity.signature_mismatches(old, run_identity.signature(config)) == []
  config.model.hypersphere = False
  config.model.remat = 'full'
  assert run_identity.signature_mismatches(old, run_identity.signature(config)) == [
      'model.hypersphere: checkpoint True, config False']


# One config per identity field group, each with the field it changes
# (test_resume_refuses_a_changed_identity).
IDENTITY_CHANGES = {
    'schedule': ('total_steps', 60),
    'optimizer': ('optim.lr', 3e-3),
    'batch': ('batch_size', 16),
    'seed': ('seed', 7),
    'data': ('data.dir', '/elsewhere'),
    'cmap': ('cmap.select_prob', 0.25),
    'loss': ('loss.mlm_prob', 0.3),
    'model noise': ('model.dropout', 0.0),
    'init': ('init.bert', '/some/bert'),
}


def save_records(directory, config, step=1):
  """A checkpoint folder holding only `config`'s signature and identity: all
  check_resume reads."""
  manager = checkpoint.make_manager(directory, config)
  manager.save(step, args=ocp.args.Composite(
      signature=ocp.args.JsonSave(run_identity.signature(config)),
      identity=ocp.args.JsonSave(run_identity.identity(config))))
  manager.wait_until_finished()
  return manager


@pytest.mark.parametrize('group', sorted(IDENTITY_CHANGES))
def test_resume_refuses_a_changed_identity(group, tmp_path):
  config = pretrain.get_config('tiny')
  manager = save_records(str(tmp_path), config)
  field, value = IDENTITY_CHANGES[group]
  changed = pretrain.get_config('tiny')
  changed.update_from_flattened_dict({field: value})
  old = run_identity.identity(config)[field]
  with pytest.raises(ValueError) as e:
    checkpoint.check_resume(manager, 1, changed)
  message = str(e.value)
  assert f'{field}: checkpoint {old!r}, config {value!r}' in message
  assert message.count(': checkpoint ') == 1  # Only that field.
  assert '--config.resume=allow_changes' in message
  # Accepted and returned when asked for.
  changed.resume = 'allow_changes'
  assert checkpoint.check_resume(manager, 1, changed) == {field: (old, value)}


def test_resume_free_fields_are_not_the_identity(tmp_path):
  """Logging, evaluation, saving and the device layout may change."""
  config = pretrain.get_config('tiny')
  manager = save_records(str(tmp_path), config)
  free = pretrain.get_config('tiny')
  free.update_from_flattened_dict({
      'log_every': 3, 'checkpoint_every': 7, 'keep_checkpoints': 1,
      'stop_at_step': 5, 'eval.every_steps': 4, 'eval.retrieval_images': 8,
      'mesh.shape': (1, 1, 1), 'grad_accum_steps': 2, 'model.remat': 'full',
      'data.num_threads': 1, 'max_nonfinite_steps': 3})
  assert checkpoint.check_resume(manager, 1, free) == {}


def test_a_checkpoint_older_than_the_identity_is_checked_for_its_model(
    tmp_path, capsys):
  config = pretrain.get_config('tiny')
  manager = save_records(str(tmp_path), config)
  shutil.rmtree(tmp_path / 'checkpoints' / '1' / 'identity')
  changed = pretrain.get_config('tiny')
  changed.seed = 3  # Not checkable without the identity.
  assert checkpoint.check_resume(manager, 1, changed) == {}
  assert 'checkpoints/1 predates the run identity: only its model was ' \
      'checked.' in capsys.readouterr().out
  changed.model.hidden_dim = 32
  with pytest.raises(ValueError, match='model.hidden_dim: checkpoint 64, '
                     'config 32'):
    checkpoint.check_resume(manager, 1, changed)


def test_a_checkpoint_older_than_a_field_of_this_wave_resumes():
  """model.head_input, finetune.itm_negatives and loss.mlm_modifier_prob
  came after checkpoints recorded their signature and identity: one
  without them was made with today's defaults, and one with another value
  is another run."""
  config = finetune_config.get_config('retrieval,tiny')
  old_sig = run_identity.signature(config)
  del old_sig['model']['head_input']
  assert run_identity.signature_mismatches(
      old_sig, run_identity.signature(config)) == []
  old = run_identity.identity(config)
  del old['model.head_input'], old['finetune.itm_negatives']
  assert run_identity.identity_changes(old, run_identity.identity(config)) == {}
  pre = pretrain.get_config('tiny')
  old_pre = run_identity.identity(pre)
  del old_pre['loss.mlm_modifier_prob']
  assert run_identity.identity_changes(old_pre, run_identity.identity(pre)) == {}
  config.model.head_input = 'cls_and_regions'
  config.finetune.itm_negatives = 'hard'
  assert run_identity.signature_mismatches(
      old_sig, run_identity.signature(config)) == [
          "model.head_input: checkpoint 'cls', config 'cls_and_regions'"]
  assert run_identity.identity_changes(old, run_identity.identity(config)) == {
      'finetune.itm_negatives': ('random', 'hard'),
      'model.head_input': ('cls', 'cls_and_regions')}


def test_every_resume_free_field_names_a_config_field():
  """A misspelt entry would free nothing and go unnoticed."""
  names = set()
  for c in (pretrain.get_config('tiny'), finetune_config.get_config('vqa')):
    flat = c.to_dict()
    names |= set(flat) | {f'{k}.{j}' for k, v in flat.items()
                          if isinstance(v, dict) for j in v}
  assert set(run_identity.RESUME_FREE_FIELDS) - names == set()


def test_resume_refuses_a_different_model(world_dir, tmp_path, pretrained_tiny,
                                          compilation_cache):
  # The suite's shared run stopped at step 2 (conftest.pretrained_tiny).
  workdir = str(tmp_path / 'run')
  shutil.copytree(pretrained_tiny, workdir)
  other = shared_tiny(world_dir)
  other.model.hidden_dim = 32
  other.model.mlp_dim = 128
  with pytest.raises(ValueError) as e:
    jobs.train_and_evaluate(other, workdir)
  message = str(e.value)
  assert 'checkpoints/2 holds a checkpoint of a different run' in message
  assert 'model.hidden_dim: checkpoint 64, config 32' in message
  assert 'model.mlp_dim: checkpoint 256, config 128' in message
  assert '--config.resume=fresh' in message
  # The model is never resumable, even when changes are allowed.
  other.resume = 'allow_changes'
  with pytest.raises(ValueError, match='holds a checkpoint of a different'):
    jobs.train_and_evaluate(other, workdir)

  # Another seed and steps are another run: refused, naming both, before
  # anything is written.
  before = os.listdir(workdir), read_json(workdir, 'config.json')
  changed = shared_tiny(world_dir, stop_at_step=3, seed=5, total_steps=40)
  with pytest.raises(ValueError) as e:
    jobs.train_and_evaluate(changed, workdir)
  assert ('seed: checkpoint 0, config 5; total_steps: checkpoint 30, '
          'config 40') in str(e.value)
  assert (os.listdir(workdir), read_json(workdir, 'config.json')) == before
  # Allowed, a change is recorded with its step; the previous config.json
  # is kept. (A host-side field: the seed is compiled into the step, and a
  # second compile would double this test's time.)
  allowed = shared_tiny(world_dir, stop_at_step=3, resume='allow_changes')
  allowed.data.max_skip_fraction = 0.5
  assert jobs.train_and_evaluate(allowed, workdir) is None
  starts = read_jsonl(workdir, 'run_info.json')
  assert [s['start_step'] for s in starts] == [0, 2]
  assert 'identity_changes' not in starts[0]
  assert starts[1]['identity_changes'] == {
      'data.max_skip_fraction': {'checkpoint': 0.01, 'config': 0.5}}
  assert read_json(workdir, 'config.until_step_2.json')['data'][
      'max_skip_fraction'] == 0.01
  assert read_json(workdir, 'config.json')['data']['max_skip_fraction'] == 0.5
  # The checkpoint it saved carries the new identity: the same run goes on.
  same = shared_tiny(world_dir)
  same.data.max_skip_fraction = 0.5
  manager = checkpoint.make_manager(workdir, same)
  assert manager.latest_step() == 3
  assert checkpoint.check_resume(manager, 3, same) == {}
  manager.close()

  # resume=fresh moves the old checkpoints aside and starts over (the same
  # program: no new compile).
  fresh = shared_tiny(world_dir, stop_at_step=1, resume='fresh')
  assert jobs.train_and_evaluate(fresh, workdir) is None
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['1']
  aside = [n for n in os.listdir(workdir)
           if n.startswith('checkpoints.replaced-')]
  assert len(aside) == 1
  assert sorted(os.listdir(os.path.join(workdir, aside[0]))) == ['2', '3']


# ---------------------------------------------------- one writer per workdir

def plant_lock(workdir, **holder):
  now = time.time()
  content = dict(dict(host=socket.gethostname(), pid=os.getpid(),
                      started=now, heartbeat=now, token='planted'), **holder)
  with open(os.path.join(workdir, 'lock.json'), 'w') as f:
    json.dump(content, f)


def workdir_bytes(workdir):
  """Every file of the workdir, path -> bytes."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def test_a_held_workdir_refuses_a_start_and_a_dead_holder_is_taken_over(
    world_dir, tmp_path, pretrained_tiny, compilation_cache, capsys):
  # The suite's shared run stopped at step 2 (conftest.pretrained_tiny).
  workdir = str(tmp_path / 'run')
  shutil.copytree(pretrained_tiny, workdir)
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # Released.
  holder = subprocess.Popen([sys.executable, '-c',
                             'import time; time.sleep(600)'])
  try:
    plant_lock(workdir, pid=holder.pid, started=1.7e9)
    before = workdir_bytes(workdir)
    with pytest.raises(workdir_lock.WorkdirInUse) as e:
      jobs.train_and_evaluate(shared_tiny(world_dir, stop_at_step=3), workdir)
    message = str(e.value)
    assert f'host {socket.gethostname()}, pid {holder.pid}, started ' in message
    assert time.strftime('%Y-%m-%d %H:%M:%S',
                         time.localtime(1.7e9)) in message
    assert workdir_bytes(workdir) == before  # Nothing written, nothing moved.
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (same host): its lock is taken over and the run goes
  # on; its own lock is released at the end.
  capsys.readouterr()
  assert jobs.train_and_evaluate(
      shared_tiny(world_dir, stop_at_step=3), workdir) is None
  assert f'taking over the lock of host {socket.gethostname()}, pid ' \
      f'{holder.pid}: its process {holder.pid} on this host is gone' in (
          capsys.readouterr().out)
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))
  assert [s['start_step'] for s in read_jsonl(workdir, 'run_info.json')] == [
      0, 2]


def test_a_lock_of_another_host_is_stale_only_without_heartbeat():
  now = time.time()
  elsewhere = dict(host='other-host', pid=os.getpid(), started=now - 7200)
  assert workdir_lock.stale_reason(dict(elsewhere, heartbeat=now - 30)) == ''
  old = now - workdir_lock.STALE_AFTER_SECONDS - 1
  assert workdir_lock.stale_reason(dict(elsewhere, heartbeat=old)) == (
      f'its heartbeat is {workdir_lock.STALE_AFTER_SECONDS + 1} s old '
      f'(stale after {workdir_lock.STALE_AFTER_SECONDS} s)')
  # This host, a live process: live.
  here = dict(host=socket.gethostname(), pid=os.getpid(), started=now)
  assert workdir_lock.stale_reason(dict(here, heartbeat=now)) == ''


def test_the_lock_heartbeat_is_refreshed_and_release_removes_it(
    tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  with workdir_lock.hold(str(tmp_path)) as lock:
    path = tmp_path / 'lock.json'
    first = json.loads(path.read_text())
    assert first['pid'] == os.getpid() and first['token'] == lock.content[
        'token']
    deadline = time.time() + 10
    while json.loads(path.read_text())['heartbeat'] == first['heartbeat']:
      assert time.time() < deadline, 'no heartbeat'
      time.sleep(0.02)
    with pytest.raises(workdir_lock.WorkdirInUse, match='in use by another'):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not path.exists()


# --------------------------------------------------------- non-finite values

@pytest.fixture(scope='module')
def step_setup():
  config = pretrain.get_config('tiny')
  specials = objectives.SpecialTokens.from_tokenizer(load_tokenizer(None))
  model = CMAL(ModelConfig.from_config(config.model, 10))
  init_inputs, loss_fn = pretraining.pretrain_objectives(model, config,
                                                        specials)
  tx, schedule = train_step.make_optimizer(config)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.rules(config)
  state, _ = train_step.create_train_state(
      model, init_inputs, pipeline.STAT_KEYS, tx, config, mesh, rules)
  step = jax.jit(train_step.make_train_step(loss_fn, config, schedule))
  c = config.data
  batch = random_batch(0, 8, c.max_text_len, c.max_regions, c.max_anchors,
                       config.model.region_feat_dim)
  return step, state, batch, mesh


def test_nonfinite_batch_skips_the_update(step_setup):
  step, state, batch, mesh = step_setup
  good_batch = jax.tree.map(jnp.asarray, batch)
  bad_batch = dict(good_batch, region_feats=jnp.full_like(
      good_batch['region_feats'], jnp.nan))
  with jax.set_mesh(mesh):
    state, _ = step(state, good_batch)  # Past step 0, where the lr is 0.
    good_state, good = step(state, good_batch)
    new, m = step(state, bad_batch)
  m, good = jax.device_get((m, good))
  assert not good['update_skipped'] and m['update_skipped']
  assert not np.isfinite(m['loss'])
  # Parameters and optimizer state exactly as they were; counters advance.
  assert_same_state((new.params, new.opt_state),
                    (state.params, state.opt_state))
  assert int(new.step) == int(state.step) + 1 == 2
  assert int(new.nonfinite_skips) == 1
  assert int(new.data_stats['examples']) == 16
  # The control: a finite batch does change the parameters.
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(good_state.params), jax.tree.leaves(state.params))]
  assert sum(changed) > 0.9 * len(changed)
  assert int(good_state.nonfinite_skips) == 0


@pytest.fixture(scope='module')
def nan_and_eval_run(world_dir, tmp_path_factory, compilation_cache):
  """(workdir, results) of one 30-step run for the next two tests (each
  checks its own part of it): NaN batches at steps 3 and 7, logged every
  step, checkpointed every 6, evaluated every 10 steps."""
  workdir = str(tmp_path_factory.mktemp('nan_and_eval'))
  config = shared_tiny(world_dir, log_every=1, checkpoint_every=6,
                       debug_nan_steps=(3, 7))
  config.eval.every_steps = 10
  return workdir, jobs.train_and_evaluate(config, workdir)


def test_isolated_nonfinite_steps_are_skipped_and_counted(nan_and_eval_run):
  workdir, results = nan_and_eval_run
  assert results['nonfinite_skips'] == 2
  lines = train_lines(read_jsonl(workdir))
  assert [m['update_skipped'] for m in lines] == [
      float(s in (3, 7)) for s in range(1, TOTAL + 1)]
  assert [m['nonfinite_skips'] for m in lines[:8]] == [0, 0, 1, 1, 1, 1, 2, 2]
  assert lines[-1]['nonfinite_skips'] == 2
  assert all(np.isfinite(m['loss']) for m in lines if not m['update_skipped'])
  state = saved_state(workdir, TOTAL)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_consecutive_nonfinite_steps_stop_the_run(world_dir, tmp_path,
                                                  compilation_cache):
  config = shared_tiny(world_dir, log_every=5, checkpoint_every=4,
                       debug_nan_steps=(5, 6, 7, 8), max_nonfinite_steps=3)
  with pytest.raises(FloatingPointError) as e:
    jobs.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert '3 consecutive non-finite updates, steps 5..7' in message
  # NaN features reach every objective through the unified encoder.
  assert 'objective(s) amc_label, amc_pair, itm, mlm went non-finite' in (
      message)
  assert 'config.max_nonfinite_steps=3' in message
  # Stopped before the step-8 save; the step-4 checkpoint is clean.
  manager = checkpoint.make_manager(str(tmp_path), config)
  assert manager.all_steps() == [4]
  manager.close()
  state = saved_state(str(tmp_path), 4)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


# --------------------------------------------------- periodic eval and best

def test_periodic_eval_keeps_the_best_checkpoint(nan_and_eval_run):
  workdir, results = nan_and_eval_run  # Evaluated every 10 steps.
  evals = [m for m in read_jsonl(workdir) if 'eval/amc_pair_acc' in m]
  assert [m['step'] for m in evals] == [10, 20, 30]
  # Periodic evaluations skip retrieval; the final one has it.
  assert ['eval/retrieval_t2i_r1' in m for m in evals] == [False, False, True]
  values = [m['eval/amc_pair_acc'] for m in evals]
  with open(os.path.join(workdir, 'best.json')) as f:
    best = json.load(f)
  assert best['metric'] == 'amc_pair_acc'
  assert best['value'] == max(values)
  assert best['step'] == [10, 20, 30][int(np.argmax(values))]
  assert results['amc_pair_acc'] == values[-1]
  # workdir/best holds that step's parameters, and only those.
  best_dir = os.path.join(workdir, 'best')
  assert [n for n in os.listdir(best_dir) if n.isdigit()] == [
      str(best['step'])]
  manager = ocp.CheckpointManager(best_dir, item_names=('params',))
  params = manager.restore(best['step'], args=ocp.args.Composite(
      params=ocp.args.StandardRestore()))['params']
  manager.close()
  if best['step'] == TOTAL:
    assert_same_state(params, saved_state(workdir, TOTAL)['params'])
  assert len(jax.tree.leaves(params)) > 20


def test_best_checkpoint_takes_a_higher_score_of_the_step_it_keeps(tmp_path):
  """A finished run evaluated again with another evaluation field (e.g.
  finetune.rerank_score) may score its kept step higher: the value is
  updated, the parameters stay; a lower score changes nothing, a higher
  one at another step replaces them."""
  params = {'w': jnp.arange(4.0, dtype=jnp.float32)}
  best = checkpoint.BestCheckpoint(str(tmp_path), 'acc')
  best.update(300, {'acc': 0.3}, params)
  best.close()
  best = checkpoint.BestCheckpoint(str(tmp_path), 'acc')  # The re-evaluation.
  best.update(300, {'acc': 0.5}, params)
  best.update(300, {'acc': 0.4}, params)
  assert read_json(str(tmp_path), 'best.json') == dict(metric='acc',
                                                       value=0.5, step=300)
  best.update(400, {'acc': 0.6}, {'w': -params['w']})
  np.testing.assert_array_equal(best.restore(params)['w'], -params['w'])
  best.close()
  assert os.listdir(tmp_path / 'best') == ['400']


def test_unknown_best_metric_fails_at_start(world_dir, tmp_path):
  config = shared_tiny(world_dir)
  config.eval.best_metric = 'retrieval_itc_t2i_r1'  # cmal trains no ITC.
  with pytest.raises(ValueError, match=r"config.eval.best_metric="
                     r"'retrieval_itc_t2i_r1': not a metric this recipe "
                     r"evaluates; one of \[.*'amc_pair_acc'"):
    jobs.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------ observability

def test_log_line_and_progress_bar(monkeypatch, capsys):
  mean = dict(loss=2.5, loss_mlm=2.0, loss_itm=0.5, acc_mlm=0.25, acc_itm=0.5,
              lr=3e-4, grad_norm=1.25, steps_per_sec=2.0,
              examples_per_sec=128.0, epoch=1.5, nonfinite_skips=0)
  line = logs.format_log_line(100, 300, mean)
  assert line == ('step 100/300 epoch 1.50 loss=2.500 [itm=0.500 mlm=2.000] '
                  '[itm=0.50 mlm=0.25] lr=3.00e-04 grad_norm=1.25 '
                  '2.00 steps/s 128 ex/s ETA 1.7 min')
  assert 'skipped=2' in logs.format_log_line(
      100, 300, dict(mean, nonfinite_skips=2))

  bar = logs.ProgressBar(10)  # pytest's stdout is not a terminal.
  bar.update(1)
  bar.update(5)
  assert capsys.readouterr().out == ''
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
  bar = logs.ProgressBar(10, width=10)
  bar.update(1)
  bar.update(5)
  out = capsys.readouterr().out
  assert out.startswith('\r[#####.....] 5/10 ')
  assert 'steps/s' in out and 'ETA' in out


def test_run_info_records_versions_and_topology():
  mesh = sharding.make_mesh((-1, 1, 1))
  info = logs.run_info(mesh)
  assert info['packages']['jax'] == jax.__version__
  assert info['packages']['flax'] is not None
  assert info['device_count'] == jax.device_count()
  assert info['backend'] == jax.default_backend()
  assert info['mesh'] == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}
  json.dumps(info)  # Serialisable as it is.


def test_metric_lines_after_the_resume_step_are_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': s}) + '\n'
                          for s in range(1, 8)) + '{"step": 8, "lo')
  metrics.drop_lines_after(str(path), 5)
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [
      1, 2, 3, 4, 5]


# ---------------------------------------------------------------- bad data

def test_skipped_records_are_counted_and_limited(tmp_path, compilation_cache,
                                                 monkeypatch):
  """data.on_error=skip through the training loop: 4 % bad records train
  with a 5 % limit (counted in metrics and eval.json) and stop the run with
  a 1 % limit, mid-run."""
  data = tmp_path / 'data'
  pairs = [good_pair(i) for i in range(200)]
  for i in range(5, 200, 25):  # 8 of 200 records have NaN features.
    pairs[i]['region_feats'][0, 0] = np.nan
  write_dataset(data, pairs)
  write_dataset(data, [good_pair(i, 'val') for i in range(64)], split='val')

  def config(limit):
    c = shared_tiny(str(data), log_every=6, checkpoint_every=TOTAL)
    c.data.on_error = 'skip'
    c.data.max_skip_fraction = limit
    return c

  # (An eval split smaller than one eval batch fails at start.)
  too_big = config(0.05)
  too_big.eval.batch_size = 128
  with pytest.raises(ValueError, match=r'val.array_record holds 64 pairs, '
                     r'fewer than config.eval.batch_size=128'):
    jobs.train_and_evaluate(too_big, str(tmp_path / 'too_big'))

  results = jobs.train_and_evaluate(config(0.05), str(tmp_path / 'ok'))
  # 30 steps x 32 = 960 examples = 5 epochs of 192 good records, 8 bad each.
  stats = results['data_stats']
  assert stats['examples'] == TOTAL * 32
  assert 4 * 8 <= stats['skipped_region_feats'] <= 6 * 8
  assert sum(v for k, v in stats.items() if k.startswith('skipped_')) == (
      stats['skipped_region_feats'])
  lines = train_lines(read_jsonl(str(tmp_path / 'ok')))
  assert lines[-1]['data/skipped_region_feats'] == stats['skipped_region_feats']

  # The check runs at every log line once enough examples were seen (lowered
  # here from 1000): the strict run stops at its first log, before any save.
  monkeypatch.setattr(train, 'MIN_EXAMPLES_FOR_SKIP_CHECK', 100)
  with pytest.raises(ValueError, match=r'for 192 examples .* more than '
                     r'config.data.max_skip_fraction=0.01 allows; by field: '
                     r'region_feats \d+'):
    jobs.train_and_evaluate(config(0.01), str(tmp_path / 'strict'))
  assert not os.listdir(checkpoint.checkpoint_dir(str(tmp_path / 'strict')))
