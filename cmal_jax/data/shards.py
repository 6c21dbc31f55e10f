"""A dataset folder sharded by image, and what one process reads of it
(config.data.read='own_shards').

With data.read='global' (the default) every process reads rows of one
global shuffle, so it may read any record and any image: every host needs
every file. A sharded folder splits the store and the training split by
image, so that a process needs only its own shards:

  meta.json                             + "shards": see below
  regions-00003-of-00008.array_record   store shard 3: its images' region
                                        records (+ .index.json), as
                                        region_store.write_region_store
                                        writes a store
  pretrain-00003-of-00008.array_record  caption shard 3: caption records
                                        naming images of store shard 3 only
  val.array_record, regions.array_record
                                        splits kept whole (evaluation) and
                                        a store of the images they name

meta.json's "shards" = {"count": N, "images": [per shard], "bytes": [per
store shard: its records' encoded bytes], "splits": {split: [caption
records per shard]}, "whole_files": [the files kept whole]}. `python -m cmal_jax.convert shard` writes the layout
(convert/reshard.py); images are assigned to shards in the order of a
stable hash of their id, cut into N blocks of balanced bytes, so every
shard is a uniform sample of the images.

Under own_shards process p of P (N % P == 0) reads shards k with
k % P == p, each caption shard joined with its own store shard only
(pair_source.JoinedPairs); pipeline.make_dataset concatenates them,
shuffles with local_seed(seed, p) and batches p's local batch. A missing
or truncated file of p's shards is named at start.
"""

import argparse
import glob
import hashlib
import os
import re

import numpy as np

from cmal_jax import cli_errors
from cmal_jax.data import image_store
from cmal_jax.data import pair_source
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data.shapes import Shapes, check_feature_dim

READ_MODES = ('global', 'own_shards')
STORE_NAME = 'regions'  # Store shards: regions-0000k-of-0000N.array_record.
_CONVERT = 'python -m cmal_jax.convert shard --in=DIR --out=DIR'
_SHARD_FILE = re.compile(r'^(.+)-(\d{5})-of-(\d{5})\.array_record$')


def reads_own_shards(config) -> bool:
  """Whether config.data.read is 'own_shards' (absent: 'global')."""
  return config.data.get('read', 'global') == 'own_shards'


def shard_path(directory: str, name: str, k: int, n: int) -> str:
  """directory/{name}-{k:05d}-of-{n:05d}.array_record."""
  return os.path.join(directory, f'{name}-{k:05d}-of-{n:05d}.array_record')


def store_shard_path(directory: str, k: int, n: int) -> str:
  return shard_path(directory, STORE_NAME, k, n)


def split_shard_path(directory: str, split: str, k: int, n: int) -> str:
  return shard_path(directory, split, k, n)


def store_shard_of(path: str) -> str | None:
  """The store shard a caption shard's records name images of
  ({split}-0000k-of-0000N -> regions-0000k-of-0000N, same folder); None
  for a file that is not a caption shard."""
  m = _SHARD_FILE.match(os.path.basename(path))
  if m is None or m.group(1) == STORE_NAME:
    return None
  return store_shard_path(os.path.dirname(path), int(m.group(2)),
                          int(m.group(3)))


def shard_order_key(image_id: str) -> tuple[bytes, str]:
  """Where an image goes in the order shards are cut from: a stable hash
  of its id (the same on every machine and Python run), then the id."""
  return hashlib.blake2b(image_id.encode('utf-8'), digest_size=8).digest(), \
      image_id


def shard_info(directory: str, meta: dict) -> dict:
  """meta.json's "shards" entry; ValueError naming the folder when it has
  none (an unsharded folder)."""
  info = meta.get('shards')
  if not isinstance(info, dict) or not isinstance(info.get('count'), int):
    raise ValueError(
        f'{directory}: not a sharded folder (its {records.META_FILE} has no '
        '"shards" entry), so config.data.read=\'own_shards\' cannot read it: '
        f'reshard it with {_CONVERT} --shards=N, or read it with '
        "data.read='global'")
  return info


def own_shards(directory: str, num_shards: int, process_index: int,
               process_count: int) -> list[int]:
  """The shards process p reads: k with k % P == p. Refuses a shard count
  that is not a multiple of the process count (processes would hold
  unequal shares of the data, and the ones with less would repeat theirs
  more often)."""
  if num_shards % process_count:
    raise ValueError(
        f"{directory}: {num_shards} shards cannot be read evenly by "
        f"{process_count} processes: config.data.read='own_shards' needs "
        'the shard count to be a multiple of the process count. Reshard '
        f'with {_CONVERT} --shards=M (M a multiple of {process_count}), or '
        "read it with data.read='global' (every host then needs every file)")
  return list(range(process_index, num_shards, process_count))


def local_seed(seed: int, process_index: int) -> int:
  """The shuffle seed of process p's own pairs: a function of (seed, p),
  so the processes' streams differ and each is the same on every run."""
  return int(np.random.SeedSequence((seed, process_index)).generate_state(
      1, np.uint32)[0])


def check_not_only_sharded(directory: str, split: str):
  """Raises, naming the folder, when it holds `split` only as shards, which
  data.read='global' cannot read (it would otherwise say the split file is
  missing, as if nothing were there)."""
  if os.path.exists(records.split_path(directory, split)):
    return
  first = glob.glob(glob.escape(directory) + f'/{glob.escape(split)}-00000-of-'
                    '*.array_record')
  if first:
    raise ValueError(
        f"{directory}: holds split {split!r} as shards ({first[0]}, ...), "
        "which data.read='global' does not read: set "
        "--config.data.read=own_shards (each process reads its own shards)")


def own_files(directory: str, split: str, shards: list[int], n: int
              ) -> list[str]:
  """The files `shards` need: each store shard, its index, its caption
  shard of `split`."""
  files = []
  for k in shards:
    store = store_shard_path(directory, k, n)
    files += [store, region_store.index_path(store),
              split_shard_path(directory, split, k, n)]
  return files


def process_files(directory: str, process_index: int, process_count: int
                  ) -> list[str]:
  """Every file process p of P needs of a sharded folder, meta.json
  aside: its store shards (+ indexes), its caption shards of each sharded
  split, and the files kept whole (evaluation's). What launch/
  fetch_shards.sh copies to a worker's disk."""
  info = shard_info(directory, records.read_meta(directory))
  mine = own_shards(directory, info['count'], process_index, process_count)
  files = [f for split in info.get('splits', {})
           for f in own_files(directory, split, mine, info['count'])]
  whole = [os.path.join(directory, f) for f in info.get('whole_files', ())]
  return list(dict.fromkeys(files)) + whole


def open_shard_store(path: str, *, pixels: bool, feature_dim: int | None):
  """A store shard: its images (pixels) or its region records."""
  if pixels:
    return image_store.StoredImages(path)
  return region_store.RegionStore(path, feature_dim=feature_dim)


def open_own_shards(config, directory: str, split: str, process_index: int,
                    process_count: int):
  """The pairs process p reads under data.read='own_shards'.

  Returns ([(JoinedPairs, caption shard path)] for p's shards, meta). Every
  file of p's shards is checked before any is read: the missing ones are
  named together; a truncated one, or a caption shard whose record count
  differs from meta.json's, is named too.
  """
  meta = records.read_meta(directory)
  shapes = Shapes.from_config(config)
  check_feature_dim(directory, meta.get('feature_dim'), shapes.feature_dim)
  info = shard_info(directory, meta)
  n = info['count']
  counts = info.get('splits', {}).get(split)
  if counts is None:
    raise ValueError(
        f'{directory}: split {split!r} is not sharded (meta.json shards '
        f'splits: {sorted(info.get("splits", {}))}); reshard with '
        f'{_CONVERT} --splits={split}')
  shards = own_shards(directory, n, process_index, process_count)
  missing = [f for f in own_files(directory, split, shards, n)
             if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(
        f'{directory}: process {process_index} of {process_count} reads '
        f'shards {shards} of {n}, and {len(missing)} of their files are '
        f'missing: {", ".join(missing)}. Copy them there (launch/tpu_pod.sh '
        f'copies each worker\'s own shards) or rewrite the folder with '
        f'{_CONVERT}')
  parts = []
  for k in shards:
    store = open_shard_store(store_shard_path(directory, k, n),
                             pixels=shapes.pixels,
                             feature_dim=None if shapes.pixels
                             else shapes.feature_dim)
    path = split_shard_path(directory, split, k, n)
    source = records.open_source(path)  # Names a truncated file.
    if len(source) != counts[k]:
      raise ValueError(
          f'{path}: holds {len(source)} records, but {directory}/'
          f'{records.META_FILE} says shard {k} of {split} has {counts[k]}: '
          f'a file of another writing? Copy the folder again or rewrite it '
          f'with {_CONVERT}')
    parts.append((pair_source.JoinedPairs(source, store, path=path,
                                          pixels=shapes.pixels), path))
  if not sum(len(source) for source, _ in parts):
    raise ValueError(f'{directory}: shards {shards} of {n} hold no {split} '
                     f'pairs, so process {process_index} has nothing to read')
  return parts, meta


def num_pairs(directory: str, split: str) -> int:
  """The pairs of a sharded split over all shards (meta.json's counts):
  the epoch of the whole run, though no process holds all of them."""
  info = shard_info(directory, records.read_meta(directory))
  return int(sum(info.get('splits', {}).get(split, ())))


def main(argv=None):
  """Prints the files (names in the folder, one a line) that process
  --process_index of --process_count needs of a sharded folder, meta.json
  aside: launch/fetch_shards.sh copies those."""
  ap = argparse.ArgumentParser(description=main.__doc__.split('\n')[0])
  ap.add_argument('directory', help='The folder (its meta.json suffices).')
  ap.add_argument('--process_index', type=int, required=True)
  ap.add_argument('--process_count', type=int, required=True)
  cli_errors.add_verbose_flag(ap)
  a = ap.parse_args(argv)
  files = process_files(a.directory, a.process_index, a.process_count)
  print('\n'.join(os.path.basename(f) for f in files))
  return files


if __name__ == '__main__':
  cli_errors.run_tool('shards', main)
