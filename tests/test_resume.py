"""A pre-training run stopped at a step (config.stop_at_step) and resumed
gives bitwise the run that was never stopped: metrics, parameters,
optimizer state, evaluation and data counters. Apart from test_train.py so
that xdist runs the two long fixtures on different workers."""

import os

import orbax.checkpoint as ocp
import pytest

from cmal_jax import checkpoint, jobs
from cmal_testutil import (CMAL_LOSSES, SHARED_STEPS, assert_trees_equal,
                           read_json, read_jsonl, shared_tiny, train_lines)

N = SHARED_STEPS - 10  # Run A stops here, then resumes to N + 10.


def resume_config(world_dir, stop_at_step):
  # The suite's shared runs' program, compiled once through its XLA cache.
  return shared_tiny(world_dir, log_every=1, checkpoint_every=1000,
                     stop_at_step=stop_at_step)


def restore_params(workdir, config, step):
  manager = checkpoint.make_manager(workdir, config)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return restored['state']


@pytest.fixture(scope='module')
def resume_runs(tmp_path_factory, world_dir, compilation_cache):
  a = str(tmp_path_factory.mktemp('resume_a'))
  b = str(tmp_path_factory.mktemp('resume_b'))
  first = jobs.train_and_evaluate(resume_config(world_dir, N), a)
  a_after_stop = dict(
      returned=first, lines=read_jsonl(a),
      checkpoints=sorted(os.listdir(os.path.join(a, 'checkpoints'))),
      has_eval=os.path.exists(os.path.join(a, 'eval.json')))
  results_a = jobs.train_and_evaluate(resume_config(world_dir, 0), a)
  results_b = jobs.train_and_evaluate(resume_config(world_dir, 0), b)
  return a, b, a_after_stop, results_a, results_b


def test_stop_at_step_saves_and_stops(resume_runs):
  _, _, stopped, _, _ = resume_runs
  assert stopped['returned'] is None
  assert not stopped['has_eval']
  assert [int(s) for s in stopped['checkpoints'] if s.isdigit()] == [N]
  assert [m['step'] for m in stopped['lines']] == list(range(1, N + 1))


def test_resume_is_bitwise_identical(resume_runs, world_dir):
  a, b, _, results_a, results_b = resume_runs
  lines_a, lines_b = train_lines(read_jsonl(a)), train_lines(read_jsonl(b))
  # A's file holds both invocations: steps 1..N, then N+1..N+10.
  assert [m['step'] for m in lines_a] == list(range(1, N + 11))
  assert [m['step'] for m in lines_b] == list(range(1, N + 11))
  compared = [k for k in lines_b[0]
              if k.startswith(('loss', 'acc_')) or k in ('grad_norm', 'lr')]
  assert set(CMAL_LOSSES) <= set(compared)
  for la, lb in zip(lines_a, lines_b):
    for k in compared:
      assert la[k] == lb[k], (la['step'], k, la[k], lb[k])  # Bitwise.
  # (Sanity: the compared values do change from step to step.)
  assert len({m['loss_mlm'] for m in lines_b[N:]}) == 10

  # Final parameters and optimizer state, bitwise.
  config = resume_config(world_dir, 0)
  state_a = restore_params(a, config, N + 10)
  state_b = restore_params(b, config, N + 10)
  assert int(state_a['step']) == int(state_b['step']) == N + 10
  assert_trees_equal(state_a, state_b, min_leaves=20)

  # The same final evaluation, data counters included: they are in the
  # checkpoint, so the resumed run counts the first invocation's batches.
  assert results_a == results_b
  assert read_json(a, 'eval.json') == read_json(b, 'eval.json')
  assert results_a['data_stats']['examples'] == (N + 10) * 32
  assert 0 < results_a['data_stats']['itm_negatives'] < (N + 10) * 32
  assert [m['data/examples'] for m in lines_a] == [
      32 * s for s in range(1, N + 11)]
