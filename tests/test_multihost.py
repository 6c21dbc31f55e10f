"""Two processes on 127.0.0.1 (gloo CPU collectives), two fake devices each,
against one process with four devices and the same global batch.

  A: 1 process x 4 devices, steps 1-10 (the reference).
  B: 2 processes x 2 devices, steps 1-5, saved at 5.
  C: 1 process x 4 devices resumes B's checkpoint, steps 6-10.

B's losses equal A's, and C, restoring a 2-process checkpoint in one
process, continues with A's parameters, optimizer state and data.

Fine-tuning (VE, retrieval) likewise: 2 processes x 2 devices train and
evaluate as 1 process x 4 devices (losses, parameters, eval.json).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax
import orbax.checkpoint as ocp

from cmal_jax import checkpoint
from cmal_testutil import read_jsonl, train_lines, xla_flags_with_devices

# Two local processes per run: pytest -m slow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12  # > 10: no run reaches the final evaluation.


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def command(workdir, world_dir, stop):
  return [sys.executable, '-m', 'cmal_jax.main',
          '--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
          f'--config.data.dir={world_dir}', f'--config.total_steps={TOTAL}',
          f'--config.stop_at_step={stop}', '--config.log_every=1',
          '--config.checkpoint_every=100']


def environment(devices, cache, **extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **extra)
  # The suite's flags: every run here compiles with the same flags, so they
  # compare like with like.
  env['XLA_FLAGS'] = xla_flags_with_devices(devices)
  return env


def run_processes(commands_and_envs, timeout=600):
  procs = [subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for c, e in commands_and_envs]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


@pytest.fixture(scope='module')
def runs(world_dir, compilation_cache, tmp_path_factory):
  d = tmp_path_factory.mktemp('multihost')
  a, b = str(d / 'one_process'), str(d / 'two_processes')
  one = environment(4, compilation_cache)
  run_processes([(command(a, world_dir, 10), one)])
  port = free_port()
  outputs = run_processes([
      (command(b, world_dir, 5),
       environment(2, compilation_cache, JAX_CPU_COLLECTIVES_IMPLEMENTATION=
                   'gloo', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                   JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in (0, 1)])
  b_lines = read_jsonl(b)  # Before C appends to it.
  resumed = run_processes([(command(b, world_dir, 10), one)])[0]
  return dict(a=a, b=b, b_lines=b_lines, b_outputs=outputs, resumed=resumed)


def saved_state(workdir, step):
  """A train state saved on 4 devices, restored on this process's first."""
  path = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), 'state')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ckpt.metadata(path).item_metadata)
    return jax.tree.map(np.asarray, ckpt.restore(path, target))


def losses(lines):
  return {l['step']: l['loss'] for l in lines}


def test_two_processes_give_the_one_process_losses(runs):
  assert 'Mesh {\'data\': 4, \'fsdp\': 1, \'tensor\': 1} over 4 cpu devices, '\
      '2 process(es)' in runs['b_outputs'][0]
  # Only process 0 logs.
  assert 'step 5/12' in runs['b_outputs'][0]
  assert 'step 5/12' not in runs['b_outputs'][1]
  want, got = losses(read_jsonl(runs['a'])), losses(runs['b_lines'])
  assert sorted(got) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got],
                             rtol=1e-5)
  # The same examples: the data counters agree exactly.
  a_stats = {l['step']: l['data/itm_negatives'] for l in read_jsonl(runs['a'])}
  assert [l['data/itm_negatives'] for l in runs['b_lines']] == [
      a_stats[s] for s in range(1, 6)]


def test_two_process_checkpoint_continues_in_one_process(runs):
  assert 'Resumed from' in runs['resumed'] and 'at step 5' in runs['resumed']
  lines = read_jsonl(runs['b'])
  got, want = losses(lines), losses(read_jsonl(runs['a']))
  assert sorted(got) == list(range(1, 11))
  # Steps 6-10 in one process from the 2-process checkpoint: the same
  # parameters, optimizer state and data position as the 1-process run.
  np.testing.assert_allclose([got[s] for s in range(6, 11)],
                             [want[s] for s in range(6, 11)], rtol=1e-5)
  assert [l['data/examples'] for l in lines][5:] == [
      l['data/examples'] for l in read_jsonl(runs['a'])][5:]
  a_state, b_state = saved_state(runs['a'], 10), saved_state(runs['b'], 10)
  assert int(b_state['step']) == 10
  a_leaves, b_leaves = jax.tree.leaves(a_state), jax.tree.leaves(b_state)
  assert len(a_leaves) == len(b_leaves) > 20
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_both_processes_data_state(runs):
  data = os.path.join(runs['b'], 'checkpoints', '5', 'data')
  files = sorted(f for f in os.listdir(data) if f.endswith('.json'))
  assert files == ['process_0-of-2.json', 'process_1-of-2.json']
  states = [json.load(open(os.path.join(data, f))) for f in files]
  assert states[0] == states[1]  # Local batch k is global batch k.


# ------------------------------------------------------------- fine-tuning

FT_TOTAL = 6


def finetune_command(task, workdir, data_dir=''):
  """A tiny fine-tuning run from random init, evaluated at its end (val and
  test, predictions written); data generated by the first run, read by the
  others."""
  return [sys.executable, '-m', 'cmal_jax.main',
          f'--config=configs/finetune.py:{task},tiny', f'--workdir={workdir}',
          f'--config.total_steps={FT_TOTAL}', '--config.log_every=1',
          '--config.checkpoint_every=100', '--config.model.dropout=0.0',
          '--config.world.num_train=32', '--config.world.num_eval=16',
          '--config.world.num_test=16'] + (
              [f'--config.data.dir={data_dir}'] if data_dir else [])


@pytest.fixture(scope='module', params=['ve', 'retrieval'])
def finetune_runs(request, compilation_cache, tmp_path_factory):
  task = request.param
  d = tmp_path_factory.mktemp(f'multihost_{task}')
  a, b = str(d / 'one_process'), str(d / 'two_processes')
  run_processes([(finetune_command(task, a), environment(4, compilation_cache))])
  port = free_port()
  outputs = run_processes([
      (finetune_command(task, b, data_dir=os.path.join(a, 'data')),
       environment(2, compilation_cache, JAX_CPU_COLLECTIVES_IMPLEMENTATION=
                   'gloo', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                   JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in (0, 1)])
  return dict(task=task, a=a, b=b, b_outputs=outputs)


def numbers(tree, prefix=''):
  """{'a.b': number} of a JSON tree's numbers."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items()
            for k, v in numbers(sub, f'{prefix}{key}.').items()}
  return {prefix.rstrip('.'): tree} if isinstance(tree, (int, float)) else {}


def test_two_process_finetuning_equals_one_process(finetune_runs):
  a, b = finetune_runs['a'], finetune_runs['b']
  assert '2 process(es)' in finetune_runs['b_outputs'][0]
  want = losses(train_lines(read_jsonl(a)))
  got = losses(train_lines(read_jsonl(b)))
  assert sorted(got) == list(range(1, FT_TOTAL + 1)) == sorted(want)
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got],
                             rtol=1e-5)
  a_state = saved_state(a, FT_TOTAL)
  b_state = saved_state(b, FT_TOTAL)
  for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
  # The final evaluation (best checkpoint on val and test) and its
  # predictions: the same in both.
  with open(os.path.join(a, 'eval.json')) as f:
    a_eval = json.load(f)
  with open(os.path.join(b, 'eval.json')) as f:
    b_eval = json.load(f)
  for split in ('val', 'test'):
    # Every number but the evaluation's wall time.
    want, got = numbers(a_eval[split]), numbers(b_eval[split])
    want.pop('seconds', None), got.pop('seconds', None)
    assert want.keys() == got.keys() and want
    for k, v in want.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5, err_msg=k)
  assert a_eval['best_step'] == b_eval['best_step']
  a_pred = sorted(os.listdir(os.path.join(a, 'predictions')))
  assert a_pred == sorted(os.listdir(os.path.join(b, 'predictions')))
  assert a_pred
