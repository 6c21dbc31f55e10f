"""Shared fixtures: one small synthetic world, generated once per session.

Every program the suite compiles, here and in the subprocesses it starts
(they inherit XLA_FLAGS), is compiled at XLA's lowest CPU optimisation
level, with XLA's older loop emitters (the fusion emitters take twice as
long to compile the suite's thousands of small programs: docs/design.md):
compiles are most of the suite's time and the tiny programs run fast
either way; comparisons are between programs compiled alike. Set before
JAX starts its backend, which is why it is at the top.
"""

import os

FAST_XLA_FLAGS = ('--xla_backend_optimization_level=0',
                  '--xla_llvm_disable_expensive_passes=true',
                  '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', '')] + [
        f for f in FAST_XLA_FLAGS
        if f not in os.environ.get('XLA_FLAGS', '')]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest

from cmal_jax import jobs
from cmal_jax.world import scenes

NUM_TRAIN, NUM_VAL = 1024, 128

# Test files, longest first (pytest --durations=0, summed per file). xdist
# deals whole files to its workers in collection order (pytest.ini:
# --dist loadfile --no-loadscope-reorder), so the long ones start first and
# the short ones fill in at the end; files not listed follow in their
# collection order.
LONGEST_FIRST = (
    'test_pixel_path.py', 'test_reliability.py', 'test_train.py',
    'test_resume.py', 'test_finetune.py', 'test_sharding.py', 'test_scale.py',
    'test_precision.py', 'test_benchmarks.py', 'test_predict.py',
    'test_export.py', 'test_own_data.py',
    'test_recipes.py', 'test_one_hour_baseline.py', 'test_pair_source.py',
    'test_world_task_examples.py', 'test_controls.py',
    'test_remote_workdir.py', 'test_bad_input.py', 'test_semmim.py',
    'test_task_model.py', 'test_semvlp.py', 'test_tfds_source.py',
    'test_convert.py', 'test_objectives.py', 'test_pixels.py')


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable.


@pytest.fixture(scope='session')
def world_dir(tmp_path_factory):
  """A tiny-config synthetic world (feature_dim 64): pretrain 1024, val 128.

  Read-only for tests: copy it (shutil.copytree) before changing anything.
  """
  d = str(tmp_path_factory.mktemp('world'))
  params = scenes.WorldParams(feature_dim=64)
  scenes.generate_split(d, 'pretrain', NUM_TRAIN, params, seed=0)
  scenes.generate_split(d, 'val', NUM_VAL, params, seed=0)
  return d


@pytest.fixture(scope='session')
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session, returned as its directory.

  Runs whose jitted steps lower to the same program (same config shapes and
  the same total_steps, which the lr schedule bakes in) load them instead of
  compiling again (~20 s each on 2 cores). The xdist workers share one
  directory (their base temps' common parent), and so do subprocesses,
  through the JAX_* variables set here. No size limit: with one, JAX locks
  the cache but also rescans the whole directory on every write, quadratic
  in the thousands of entries a session writes. Unlocked, a worker may read
  an entry another is still writing; JAX then warns and compiles (a
  truncated entry does not decompress). The previous settings are restored
  at the end.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # pytest-of-USER/pytest-N/, common to the workers.
  cache = str(root / 'xla_cache')
  os.makedirs(cache, exist_ok=True)
  settings = {'jax_compilation_cache_dir': cache,
              'jax_persistent_cache_min_compile_time_secs': 0.0}
  old = {n: getattr(jax.config, n) for n in settings}
  with pytest.MonkeyPatch.context() as patch:  # Restores the environment.
    for n, v in settings.items():
      jax.config.update(n, v)
      patch.setenv(n.upper(), str(v))
    cc.reset_cache()
    yield cache
    for n, v in old.items():
      jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope='session')
def pretrained_tiny(world_dir, tmp_path_factory, compilation_cache):
  """A tiny pre-training workdir (on world_dir) saved at step 2 of 30, for
  init_from. Step 2, not 1: the first update has lr 0 (warmup), so a step-1
  checkpoint holds the init parameters, which a fresh seed-0 model has too.
  cmal_testutil.shared_tiny's config, so the compiled step is shared
  through the cache."""
  from cmal_testutil import shared_tiny
  workdir = str(tmp_path_factory.mktemp('pretrained_tiny'))
  c = shared_tiny(world_dir, stop_at_step=2)
  assert jobs.train_and_evaluate(c, workdir) is None
  return workdir
