"""Shared fixtures: one small synthetic world, generated once per session."""

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
