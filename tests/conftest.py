"""Shared fixtures: one small synthetic world, generated once per session."""

import jax
import pytest

from cmal_jax.data import world

NUM_TRAIN, NUM_VAL = 1024, 128


@pytest.fixture(scope='session')
def world_dir(tmp_path_factory):
  """A tiny-config synthetic world (feature_dim 64): pretrain 1024, val 128.

  Read-only for tests: copy it (shutil.copytree) before changing anything.
  """
  d = str(tmp_path_factory.mktemp('world'))
  params = world.WorldParams(feature_dim=64)
  world.generate_split(d, 'pretrain', NUM_TRAIN, params, seed=0)
  world.generate_split(d, 'val', NUM_VAL, params, seed=0)
  return d


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for one module's runs: runs with the same shapes
  load the train and eval steps instead of compiling them again (~25 s each
  on 2 busy cores). The previous settings are restored afterwards."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update(names[1], 0.0)
  cc.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()
