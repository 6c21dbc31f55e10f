"""Where the synthetic world goes and who writes it.

A local workdir keeps it in {workdir}/data, written by process 0 while the
others wait. A remote workdir (gs://...) cannot hold it (ArrayRecord reads
local files), so every process writes it to a folder on its own disk, named
by everything the data depends on.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import jax
from jax.experimental import multihost_utils

from cmal_jax import storage
from cmal_jax.data import records
from cmal_jax.world import scenes
from cmal_jax.logs import log
from cmal_jax.model.pixels import reads_pixels


def data_dir(config, workdir):
  """config.data.dir, else where the synthetic data goes: workdir/data, or
  for a remote workdir (gs://...) local_world_dir (ArrayRecord reads local
  files only)."""
  if config.data.dir:
    return config.data.dir
  if storage.is_remote(workdir):
    return local_world_dir(config)
  return os.path.join(workdir, 'data')


def synthetic_splits(config):
  """{split: examples} of the synthetic data config.task reads."""
  sizes = {config.data.train_split: config.world.num_train,
           config.data.eval_split: config.world.num_eval}
  if config.task != 'pretrain':
    sizes.update({s: config.world.num_test
                  for s in config.finetune.test_splits})
  return sizes


def local_world_dir(config):
  """A folder on this host's disk named by everything the synthetic data
  depends on (task, world, seed, splits), so runs that need the same data
  share it and any other change gets a folder of its own."""
  what = dict(task=config.task, seed=config.seed,
              world=dataclasses.asdict(scenes.WorldParams.from_config(config)),
              splits=synthetic_splits(config))
  digest = hashlib.sha256(
      json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), 'cmal_world',
                      f'{config.task}-{digest}')


def generate_once(directory, generate):
  """Runs generate(folder) into a private folder and renames it to
  `directory` unless that exists. Several processes of one host may do this
  at once: the first rename wins, the others drop their copy; `directory`
  only ever appears complete. Returns True if this call made it."""
  if os.path.isdir(directory):
    return False
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + '.tmp-',
                         dir=parent)
  try:
    generate(tmp)
    try:
      os.rename(tmp, directory)  # Atomic; fails if another made it first.
      return True
    except OSError:
      if not os.path.isdir(directory):
        raise
      return False
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_splits(directory, sizes, exists, generate, every_process=False,
                  barrier='synthetic_data'):
  """Makes the synthetic splits {split: examples} that `directory` lacks.

  exists(split) -> bool; generate(folder, {split: examples}) writes them.
  By default process 0 writes the missing ones and the others wait (a
  shared workdir); every_process: each process makes them all in
  `directory` on its own disk (a remote workdir's local_world_dir), see
  generate_once.
  """
  if every_process:
    generate_once(directory, lambda folder: generate(folder, sizes))
    return
  missing = {s: n for s, n in sizes.items() if not exists(s)}
  if missing and jax.process_index() == 0:
    generate(directory, missing)
  if jax.process_count() > 1:  # Others wait until process 0 has written.
    multihost_utils.sync_global_devices(barrier)


def check_images(config, directory):
  """Refuses a synthetic folder without images for a config that reads
  pixels: the generators only add missing splits, so they would take the
  folder as it is and the run would fail on its first batch."""
  if not reads_pixels(config) or not os.path.exists(
      os.path.join(directory, records.META_FILE)):
    return
  if not records.read_meta(directory).get('generator', {}).get('images'):
    raise ValueError(
        f'{directory} holds synthetic data without images, and this '
        f'{config.task} run reads pixels (model.visual.input=pixels): delete '
        'the folder (it is generated again, with images) or point '
        'data.dir elsewhere.')


def ensure_world_data(config, directory, every_process=False):
  """Generates the synthetic world's pre-training splits where they are
  missing (ensure_splits), after check_images."""
  check_images(config, directory)
  params = scenes.WorldParams.from_config(config)

  def generate(folder, sizes):
    t = time.time()
    scenes.generate_splits(folder, sizes, params, seed=config.seed,
                           workers=min(4, os.cpu_count() or 1))
    what = ', '.join(f'{num} {split}' for split, num in sizes.items())
    log(f'Generated synthetic pairs ({what}) in {directory} '
        f'({time.time() - t:.0f}s)')

  ensure_splits(
      directory, synthetic_splits(config),
      lambda split: os.path.exists(records.split_path(directory, split)),
      generate, every_process, barrier='world_data')
