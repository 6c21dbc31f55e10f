"""A folder sharded by image (convert shard, convert/reshard.py) and
config.data.read='own_shards' (data/shards.py): resharding keeps every
pair, each caption shard names images of its own store shard only, store
shards keep within --shard_bytes; process p of P opens only its shards'
files and the processes' local epochs together feed every pair once; a
shard count that P does not divide, a missing or truncated shard file,
a resume with another process count and bad config values are refused,
named."""

import collections
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from cmal_jax import checkpoint, configlib, run_identity
from configs import finetune
from cmal_jax.convert import cli as convert
from cmal_jax.convert import inspect, reshard
from cmal_jax.data import (image_store, pair_source, pipeline, records,
                           region_store, shards)
from cmal_jax.world import scenes
from cmal_testutil import WORLD_PARAMS, read_jsonl, tiny_with_data, train_lines
from test_multihost import command, environment, free_port, run_processes

NUM_TRAIN, NUM_VAL, N = 48, 8, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `gcloud storage cp SRC... DEST` with gs://X read from $FAKE_GCS/X.
FAKE_GCLOUD = """#!/usr/bin/env bash
[ "$1 $2" = "storage cp" ] || exit 64
shift 2
args=("$@"); dest=${args[-1]}; unset 'args[-1]'
for a in "${args[@]}"; do cp "$FAKE_GCS/${a#gs://}" "$dest"; done
"""


def pair_key(pair):
  """A joined pair record as comparable bytes."""
  return (pair['image_id'], pair['caption'],
          np.asarray(pair['region_feats']).tobytes(),
          np.asarray(pair['region_boxes']).tobytes(),
          tuple(pair['region_tags']), np.asarray(pair['region_conf']).tobytes())


def folder_pairs(directory, split):
  source, _ = pair_source.open_split(directory, split, pixels=False,
                                     feature_dim=WORLD_PARAMS.feature_dim)
  return collections.Counter(pair_key(source[i]) for i in range(len(source)))


def sharded_pairs(directory, split):
  """Every shard's captions joined with its own store shard only."""
  n = records.read_meta(directory)['shards']['count']
  pairs = collections.Counter()
  for k in range(n):
    store = region_store.RegionStore(shards.store_shard_path(directory, k, n))
    path = shards.split_shard_path(directory, split, k, n)
    joined = pair_source.JoinedPairs(records.open_source(path), store,
                                     path=path, pixels=False)
    pairs.update(pair_key(joined[i]) for i in range(len(joined)))
  return pairs


def raw_records(path):
  source = records.open_source(path)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """48 world images, a second caption for every third one (64 pairs), and
  8 val pairs."""
  d = str(tmp_path_factory.mktemp('unsharded'))
  scenes.generate_split(d, 'pretrain', NUM_TRAIN, WORLD_PARAMS, seed=0)
  scenes.generate_split(d, 'val', NUM_VAL, WORLD_PARAMS, seed=0)
  path = records.split_path(d, 'pretrain')
  captions = [records.decode_record(r) for r in raw_records(path)]
  captions += [dict(c, caption=f'another look at {c["caption"]}')
               for c in captions[::3]]
  records.write_records(path, captions)
  records.write_meta(d, {**records.read_meta(d),
                         'splits': {'pretrain': len(captions),
                                    'val': NUM_VAL}})
  return d


@pytest.fixture(scope='module')
def sharded(world, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sharded') / 'out')
  convert.main(['shard', f'--in={world}', f'--out={out}', f'--shards={N}'])
  return out


def own_config(directory, **data):
  return tiny_with_data(read='own_shards', dir=directory, **data)


def test_resharding_keeps_every_pair(world, sharded):
  assert sharded_pairs(sharded, 'pretrain') == folder_pairs(world, 'pretrain')
  assert sum(folder_pairs(world, 'pretrain').values()) == 64
  # val is kept whole, with a store of its images: read as today.
  assert folder_pairs(sharded, 'val') == folder_pairs(world, 'val')
  whole = region_store.RegionStore(region_store.store_path(sharded))
  assert sorted(whole.image_ids()) == sorted(
      f'val-0-{i:07d}' for i in range(NUM_VAL))
  meta = records.read_meta(sharded)
  assert meta['splits'] == {'pretrain': 64, 'val': NUM_VAL}
  assert meta['shards']['count'] == N
  assert sum(meta['shards']['images']) == NUM_TRAIN
  assert meta['tags'] == records.read_meta(world)['tags']


def test_each_caption_shard_names_its_store_shard_only(sharded):
  meta = records.read_meta(sharded)['shards']
  seen = set()
  for k in range(N):
    store = region_store.RegionStore(shards.store_shard_path(sharded, k, N))
    path = shards.split_shard_path(sharded, 'pretrain', k, N)
    named = {records.decode_record(r)['image_id'] for r in raw_records(path)}
    assert named == set(store.image_ids())  # Its images, and all of them.
    assert not seen & named
    seen |= named
    assert len(store) == meta['images'][k]
    assert len(raw_records(path)) == meta['splits']['pretrain'][k]
  assert len(seen) == NUM_TRAIN
  # Balanced: the hash order spreads the 48 images over the 4 shards.
  assert min(meta['images']) >= 6 and max(meta['bytes']) < 2 * min(
      meta['bytes'])


def test_shard_bytes_bound_picks_the_shard_count(world, tmp_path, capsys):
  sizes = [len(r) for r in raw_records(region_store.store_path(world))]
  bound = sum(sizes[:NUM_TRAIN]) // 5  # The train images' records: 5+.
  out = str(tmp_path / 'bounded')
  convert.main(['shard', f'--in={world}', f'--out={out}',
                f'--shard_bytes={bound}', '--multiple_of=2'])
  n = records.read_meta(out)['shards']['count']
  assert n >= 6 and n % 2 == 0
  written = [sum(map(len, raw_records(shards.store_shard_path(out, k, n))))
             for k in range(n)]
  assert max(written) <= bound
  assert written == records.read_meta(out)['shards']['bytes']
  assert capsys.readouterr().out.startswith(
      f'Wrote {NUM_TRAIN} images into {n} shards of {out} (store shards '
      f'{min(written)}-{max(written)} bytes of records; pretrain: 64 caption '
      f'records; val kept whole: {NUM_VAL} records); skipped none')
  assert sharded_pairs(out, 'pretrain') == folder_pairs(world, 'pretrain')
  with pytest.raises(ValueError, match=r"--shard_bytes=100: image '.*' alone "
                     r'takes \d+ bytes'):
    convert.main(['shard', f'--in={world}', f'--out={tmp_path / "x"}',
                  '--shard_bytes=100'])


def test_each_process_opens_only_its_own_files(sharded, monkeypatch):
  opened = []
  open_source = records.open_source
  monkeypatch.setattr(records, 'open_source',
                      lambda path: opened.append(path) or open_source(path))
  config = own_config(sharded)
  for p in range(2):
    opened.clear()
    ds, _, _ = pipeline.make_dataset(config, sharded, 'pretrain',
                                     batch_size=8, train=True, seed=0,
                                     process_index=p, process_count=2)
    assert ds[3]['input_ids'].shape == (8, config.data.max_text_len)
    assert sorted(opened) == sorted(
        f(sharded, *args) for k in (p, p + 2)
        for f, args in ((shards.store_shard_path, (k, N)),
                        (shards.split_shard_path, ('pretrain', k, N))))


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_local_epochs_feed_every_pair_once(world, sharded, process_count):
  """Each process's first local epoch is a permutation of its shards'
  pairs; over the processes, every pair of the folder once."""
  config = own_config(sharded)
  counts = records.read_meta(sharded)['shards']['splits']['pretrain']
  fed, orders = collections.Counter(), []
  for p in range(process_count):
    ds, _, own = pipeline.read_pairs(config, sharded, 'pretrain', train=True,
                                     seed=0, process_index=p,
                                     process_count=process_count)
    assert own
    epoch = sum(counts[k] for k in range(p, N, process_count))
    keys = [(e['image_id'], e['caption']) for e in (ds[i]
                                                    for i in range(epoch))]
    assert len(set(keys)) == epoch
    fed.update(keys)
    orders.append(keys)
  expected = collections.Counter((k[0], k[1]) for k in folder_pairs(
      world, 'pretrain').elements())
  assert fed == expected
  if process_count == 2:  # Each process shuffles with its own seed.
    assert shards.local_seed(0, 0) != shards.local_seed(0, 1)


def test_shard_count_process_count_mismatch_is_refused(sharded):
  with pytest.raises(ValueError, match=re.escape(
      f'{sharded}: 4 shards cannot be read evenly by 3 processes')):
    pipeline.make_dataset(own_config(sharded), sharded, 'pretrain',
                          batch_size=8, train=True, seed=0, process_index=0,
                          process_count=3)


@pytest.mark.parametrize('damage', ['caption_missing', 'store_missing',
                                    'store_truncated', 'count'])
def test_a_missing_or_bad_shard_is_named_at_start(world, tmp_path, damage):
  out = str(tmp_path / 'out')
  reshard.reshard_folder(world, out, shards_wanted=N)
  caption = shards.split_shard_path(out, 'pretrain', 3, N)
  store = shards.store_shard_path(out, 3, N)
  if damage == 'caption_missing':
    os.remove(caption)
    error, what = FileNotFoundError, (
        f'{out}: process 1 of 2 reads shards [1, 3] of 4, and 1 of their '
        f'files are missing: {caption}.')
  elif damage == 'store_missing':
    os.remove(store)
    os.remove(region_store.index_path(store))
    error, what = FileNotFoundError, (
        f'2 of their files are missing: {store}, '
        f'{region_store.index_path(store)}.')
  elif damage == 'store_truncated':
    with open(store, 'r+b') as f:
      f.truncate(os.path.getsize(store) // 2)
    error, what = records.RecordError, f'{store}: record'
  else:
    records.write_records(caption, raw_records(caption)[1:])
    error, what = ValueError, f'{caption}: holds '
  with pytest.raises(error, match=re.escape(what)):
    pipeline.make_dataset(own_config(out), out, 'pretrain', batch_size=8,
                          train=True, seed=0, process_index=1,
                          process_count=2)
  # Process 0's shards are intact: it starts.
  pipeline.make_dataset(own_config(out), out, 'pretrain', batch_size=8,
                        train=True, seed=0, process_index=0, process_count=2)


def test_global_read_of_a_sharded_folder_is_named(sharded):
  with pytest.raises(ValueError, match=re.escape(
      f"{sharded}: holds split 'pretrain' as shards")):
    pipeline.make_dataset(tiny_with_data(), sharded, 'pretrain',
                          batch_size=8, train=True, seed=0)
  # Evaluation reads the whole val split globally, under either mode.
  ds, _, dropped = pipeline.make_dataset(own_config(sharded), sharded, 'val',
                                         batch_size=4, train=False, seed=0)
  assert len(ds) == 2 and dropped == 0


def test_resume_with_another_process_count_is_refused():
  config = own_config('/data/sharded')
  two = run_identity.identity(config, process_count=2)
  assert two[run_identity.READ_PROCESSES] == 2
  changes = run_identity.identity_changes(
      two, run_identity.identity(config, process_count=4))
  assert run_identity.describe_changes(changes) == (
      'data.read_processes: checkpoint 2, config 4')
  # A global run records no process count, and a checkpoint made before
  # data.read existed resumes as a global one.
  old = run_identity.identity(tiny_with_data(), process_count=2)
  assert run_identity.READ_PROCESSES not in old
  old.pop('data.read')
  assert run_identity.identity_changes(
      old, run_identity.identity(tiny_with_data(), process_count=4)) == {}


def test_config_values_are_checked():
  with pytest.raises(ValueError, match=re.escape(
      "config.data.read='shards': must be one of ('global', 'own_shards')")):
    configlib.validate(tiny_with_data(read='shards'))
  with pytest.raises(ValueError, match=re.escape(
      "config.data.read='own_shards': reads the shards of a sharded "
      "data.dir, not data.source='tfds:coco'")):
    configlib.validate(own_config('/d', source='tfds:coco'))
  with pytest.raises(ValueError, match=re.escape(
      "config.data.read='own_shards': needs data.dir")):
    configlib.validate(own_config(''))
  configlib.validate(own_config('/d'))
  tune = finetune.get_config('ve')
  tune.data.read = 'own_shards'
  with pytest.raises(ValueError, match=re.escape(
      "config.data.read='own_shards': only pre-training reads it")):
    configlib.validate(tune)


def _rewrite(path, index, record):
  raws = raw_records(path)
  raws[index] = records.encode_record(record)
  records.write_records(path, raws)


@pytest.mark.parametrize('bad', ['unknown_image', 'pair_record',
                                 'store_nan'])
def test_bad_input_is_named_or_counted(world, tmp_path, bad):
  d = str(tmp_path / 'in')
  os.makedirs(d)
  for name in os.listdir(world):
    with open(os.path.join(world, name), 'rb') as src, open(
        os.path.join(d, name), 'wb') as dst:
      dst.write(src.read())
  captions = records.split_path(d, 'pretrain')
  store = region_store.store_path(d)
  if bad == 'unknown_image':
    _rewrite(captions, 5, {'image_id': 'nowhere', 'caption': 'a cat'})
    what, field, lost = (f"{captions}: record 5: field 'image_id': image "
                         f"'nowhere' is not in {store}"), 'image_id', 1
  elif bad == 'pair_record':
    joined = pair_source.open_split(d, 'pretrain', pixels=False,
                                    feature_dim=64)[0]
    _rewrite(captions, 7, joined[7])
    what, field, lost = (f"{captions}: record 7: field 'region_feats': a "
                         'pair record'), 'region_feats', 1
  else:
    with open(region_store.index_path(store)) as f:
      index = json.load(f)['pretrain-0-0000002']
    record = records.decode_record(raw_records(store)[index])
    record['region_feats'] = np.full_like(record['region_feats'], np.nan)
    _rewrite(store, index, record)
    # The image is left out; then its caption names an unknown image.
    what, field, lost = (f"{store}: record {index}: field 'region_feats': "
                         'contains NaN or Inf'), 'region_feats', 1
  with pytest.raises(records.RecordError, match=re.escape(what)):
    reshard.reshard_folder(d, str(tmp_path / 'out'), shards_wanted=N)
  assert not os.path.exists(tmp_path / 'out' / records.META_FILE)
  result = reshard.reshard_folder(d, str(tmp_path / 'skipped'),
                                  shards_wanted=N, skip_bad=True)
  expected = {field: 1} if bad != 'store_nan' else {'region_feats': 1,
                                                    'image_id': 1}
  assert result.skipped == expected
  assert sum(result.pairs['pretrain']) == 64 - lost
  with pytest.raises(FileExistsError, match='not empty'):
    reshard.reshard_folder(d, str(tmp_path / 'skipped'), shards_wanted=N)


def fetch_shards(tmp_path, folder, worker, workers):
  """launch/fetch_shards.sh on a fake worker, gcloud faked over a local
  copy of `folder` as gs://bucket/coco; returns (process, local dir)."""
  gcs, bin_dir = tmp_path / 'gcs', tmp_path / 'bin'
  if not gcs.exists():
    shutil.copytree(folder, gcs / 'bucket' / 'coco')
    bin_dir.mkdir()
    (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
    (bin_dir / 'gcloud').chmod(0o755)
  local = tmp_path / f'local{worker}'
  env = dict(os.environ, FAKE_GCS=str(gcs), TPU_WORKER_ID=str(worker),
             TPU_WORKER_HOSTNAMES=','.join(f'h{i}' for i in range(workers)),
             PATH=f'{bin_dir}:{os.environ["PATH"]}', PYTHONPATH=REPO)
  done = subprocess.run(['bash', 'launch/fetch_shards.sh', 'gs://bucket/coco',
                         str(local)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  return done, str(local)


def test_fetch_shards_copies_a_workers_own_files(sharded, tmp_path):
  done, local = fetch_shards(tmp_path, sharded, worker=1, workers=2)
  assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(local)) == sorted(
      ['meta.json', 'val.array_record', 'regions.array_record',
       'regions.array_record.index.json']
      + [os.path.basename(f) for k in (1, 3) for f in (
          shards.store_shard_path(local, k, N),
          region_store.index_path(shards.store_shard_path(local, k, N)),
          shards.split_shard_path(local, 'pretrain', k, N))])
  assert done.stdout.strip().endswith(
      f'Worker 1 of 2: 9 files of gs://bucket/coco in {local}.')
  # Worker 1 reads its local copy as it reads the whole folder.
  config = own_config(local)
  here, there = (pipeline.read_pairs(config, d, 'pretrain', train=True,
                                     seed=0, process_index=1,
                                     process_count=2)[0]
                 for d in (local, sharded))
  assert [here[i]['caption'] for i in range(40)] == [
      there[i]['caption'] for i in range(40)]
  done, _ = fetch_shards(tmp_path, sharded, worker=0, workers=3)
  assert done.returncode == 1
  assert '4 shards cannot be read evenly by 3 processes' in done.stderr


def test_inspect_joins_each_caption_shard_with_its_store_shard(sharded,
                                                               capsys):
  assert inspect.main([sharded]) == 0
  out = capsys.readouterr().out
  assert f'{shards.split_shard_path(sharded, "pretrain", 3, N)}: pair file' in (
      out)
  assert 'errors: 0' in out.splitlines()[-1]


def test_an_image_folder_is_packed_into_the_shards(tmp_path):
  """images.json + image files: each shard a store of records carrying
  the encoded image, read by a pixel model as the files were."""
  d = str(tmp_path / 'photos')
  os.makedirs(d)
  rng = np.random.default_rng(0)
  entries = []
  for i in range(12):
    pixels = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    with open(os.path.join(d, f'{i}.png'), 'wb') as f:
      f.write(image_store.encode_png(pixels))
    entries.append((f'p{i}', {'file': f'{i}.png', 'boxes': [[0, 0, 8, 8]],
                              'tags': ['dog']}))
  image_store.write_image_store(d, entries)
  captions = [{'image_id': f'p{i % 12}', 'caption': f'a dog, take {i}'}
              for i in range(30)]
  records.write_records(records.split_path(d, 'pretrain'), captions)
  records.write_meta(d, {'tags': ['dog'], 'synonyms': {}, 'feature_dim': None,
                         'splits': {'pretrain': 30}})
  out = str(tmp_path / 'out')
  result = reshard.reshard_folder(d, out, shards_wanted=2)
  assert sum(result.images) == 12 and sum(result.pairs['pretrain']) == 30
  config = own_config(out)
  config.model.visual.input = 'pixels'
  files = image_store.ImageStore(image_store.store_file(d))
  fed = collections.Counter()
  for p in range(2):
    ds = pipeline.read_pairs(config, out, 'pretrain', train=True, seed=0,
                             process_index=p, process_count=2)[0]
    for i in range(result.pairs['pretrain'][p]):
      example = ds[i]
      fed[(example['image_id'], example['caption'])] += 1
      assert np.array_equal(example['image'], image_store.resize_image(
          files[example['image_id']]['image'],
          config.model.visual.image_size))
  assert fed == collections.Counter((c['image_id'], c['caption'])
                                    for c in captions)


@pytest.mark.slow  # Two local processes compile and train: ~60 s.
def test_two_processes_train_and_another_count_is_refused(
    world_dir, compilation_cache, tmp_path):
  """2 processes x 2 devices train 2 steps on their own shards of the
  suite's world; resuming that checkpoint in one process is refused,
  naming data.read_processes."""
  sharded_dir, workdir = str(tmp_path / 'sharded'), str(tmp_path / 'run')
  reshard.reshard_folder(world_dir, sharded_dir, shards_wanted=2)
  own = ['--config.data.read=own_shards', '--config.checkpoint_every=2']
  port = free_port()
  outputs = run_processes([
      (command(workdir, sharded_dir, 2) + own,
       environment(2, compilation_cache, JAX_CPU_COLLECTIVES_IMPLEMENTATION=
                   'gloo', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                   JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in (0, 1)])
  assert '2 process(es)' in outputs[0]
  lines = read_jsonl(workdir)
  assert [l['step'] for l in train_lines(lines)] == [1, 2]
  assert all(np.isfinite(l['loss']) for l in train_lines(lines))
  with open(os.path.join(checkpoint.checkpoint_dir(workdir), '2', 'identity',
                         'metadata')) as f:
    assert json.load(f)[run_identity.READ_PROCESSES] == 2
  resumed = subprocess.run(command(workdir, sharded_dir, 4) + own, cwd=REPO,
                           env=environment(4, compilation_cache),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 1, resumed.stderr[-2000:]
  assert 'data.read_processes: checkpoint 2, config 1' in resumed.stderr
