"""Pre-training pairs by reference (data/pair_source.py): caption records
joined with the folder's store give the batches and the training of copied
pair records, bitwise; an image the store lacks, a store that is missing
or truncated, and caption records without a store are named."""

import os
import re
import shutil

import numpy as np
import pytest

from cmal_jax import jobs
from cmal_jax.convert.formats import captions
from cmal_jax.data import pair_source, pipeline, records, region_store
from cmal_jax.world import scenes
from cmal_testutil import (assert_trees_equal, read_all, saved_state,
                           shared_tiny, tiny_with_data)

P = scenes.WorldParams(feature_dim=64)


def copied_layout(src, dst):
  """The folder `src` (caption records + store) rewritten as pair records
  that carry their image (the layout before references), without a store."""
  os.makedirs(dst)
  meta = records.read_meta(src)
  for split in meta['splits']:
    source, path = pair_source.open_split(src, split, pixels=False,
                                          feature_dim=meta['feature_dim'])
    assert isinstance(source, pair_source.JoinedPairs)
    records.write_records(records.split_path(dst, split),
                          [source[i] for i in range(len(source))])
  shutil.copy(os.path.join(src, records.META_FILE), dst)
  return dst


@pytest.fixture
def small_world(tmp_path):
  d = str(tmp_path / 'world')
  scenes.generate_split(d, 'pretrain', 16, P, seed=0)
  return d


def test_world_writes_caption_records_and_one_store(small_world):
  source = records.open_source(records.split_path(small_world, 'pretrain'))
  stored = [records.decode_record(source[i]) for i in range(len(source))]
  assert all(set(r) == {'image_id', 'caption'} for r in stored)
  store = region_store.RegionStore(region_store.store_path(small_world))
  assert store.image_ids() == [r['image_id'] for r in stored]
  # A second split adds its images; the first's stay.
  scenes.generate_split(small_world, 'val', 4, P, seed=0)
  store = region_store.RegionStore(region_store.store_path(small_world))
  assert len(store) == 20 and 'val-0-0000003' in store
  assert records.read_meta(small_world)['splits'] == {'pretrain': 16,
                                                      'val': 4}


def test_batches_equal_those_of_copied_pair_records(small_world, tmp_path):
  copied = copied_layout(small_world, str(tmp_path / 'copied'))
  config = tiny_with_data(itm_group=8)
  by_reference = read_all(config, small_world, 8)
  by_copy = read_all(config, copied, 8)
  assert len(by_reference) == len(by_copy) == 2
  for directory in (small_world, copied):  # Shuffled, ITM negatives drawn.
    ds = pipeline.make_dataset(config, directory, 'pretrain', batch_size=8,
                               train=True, seed=3)[0]
    (by_reference if directory == small_world else by_copy).extend(
        ds[k] for k in range(5))
  for a, b in zip(by_reference, by_copy, strict=True):
    assert_trees_equal(a, b, min_leaves=10)


def test_pretraining_equals_pretraining_on_copied_records(
    world_dir, pretrained_tiny, tmp_path, compilation_cache):
  """The suite's shared run on world_dir (caption records) and the same run
  on its pairs copied into each record: the same state at step 2, bitwise
  (parameters, optimizer moments, counters and the iterator position)."""
  copied = copied_layout(world_dir, str(tmp_path / 'copied'))
  workdir = str(tmp_path / 'run')
  assert jobs.train_and_evaluate(
      shared_tiny(copied, stop_at_step=2), workdir) is None
  assert_trees_equal(saved_state(workdir, 2), saved_state(pretrained_tiny, 2),
                     min_leaves=20)


def _rewrite_caption(directory, index, **fields):
  path = records.split_path(directory, 'pretrain')
  source = records.open_source(path)
  recs = [records.decode_record(source[i]) for i in range(len(source))]
  recs[index].update(fields)
  records.write_records(path, recs)
  return path


def test_missing_image_is_named_or_counted(small_world):
  path = _rewrite_caption(small_world, 3, image_id='no-such-image')
  store = region_store.store_path(small_world)
  with pytest.raises(records.RecordError, match=re.escape(
      f"{path}: record 3: field 'image_id': {store}: no regions for image id "
      "'no-such-image' (16 images in the store)")):
    read_all(tiny_with_data(), small_world, 8)
  skipping = tiny_with_data(on_error='skip', max_skip_fraction=0.5)
  batches = read_all(skipping, small_world, 8)
  stats = {k: sum(int(b['stats'][k].sum()) for b in batches)
           for k in batches[0]['stats']}
  assert stats['skipped_image_id'] == 1 and stats['examples'] == 16
  assert sum(v for k, v in stats.items() if k.startswith('skipped_')) == 1


def test_bad_caption_record_names_its_field(small_world):
  path = _rewrite_caption(small_world, 5, caption=7)
  with pytest.raises(records.RecordError, match=re.escape(
      f"{path}: record 5: field 'caption': expected str, got int")):
    read_all(tiny_with_data(), small_world, 8)
  path = _rewrite_caption(small_world, 5, caption='ok', extra=1)
  with pytest.raises(records.RecordError, match=re.escape(
      f"{path}: record 5: field 'extra': unexpected field in a caption")):
    read_all(tiny_with_data(), small_world, 8)


@pytest.mark.parametrize('damage', ['store_missing', 'store_truncated',
                                    'index_missing'])
def test_store_problems_are_named_at_start(small_world, damage):
  """Before any batch: make_dataset itself raises, naming the file."""
  store = region_store.store_path(small_world)
  index = region_store.index_path(store)
  if damage == 'store_missing':
    os.remove(store)
    os.remove(index)
    error, what = FileNotFoundError, (
        f"{records.split_path(small_world, 'pretrain')}: holds caption "
        f"records (image_id + caption) but {small_world} has no store")
  elif damage == 'store_truncated':
    with open(store, 'r+b') as f:
      f.truncate(os.path.getsize(store) // 2)
    error, what = records.RecordError, f'{store}: record'
  else:
    os.remove(index)
    error, what = FileNotFoundError, f'{index}: no region store index'
  with pytest.raises(error, match=re.escape(what)):
    pipeline.make_dataset(tiny_with_data(), small_world, 'pretrain',
                          batch_size=8, train=True, seed=0)


def test_coco_like_disk_per_pair(tmp_path):
  """Five captions per image, COCO's 36 x 2048 float16 features: by
  reference a pair costs its share of the store and its own caption
  record, within the issue's bound (<= 1.1 x store / pairs + the caption's
  bytes); copied, every caption carries the whole image."""
  rng = np.random.default_rng(0)
  images, per_image = 12, 5
  d = str(tmp_path / 'coco')
  region_store.write_region_store(region_store.store_path(d), (
      {'image_id': str(i),
       'region_feats': rng.normal(size=(36, 2048)).astype(np.float16),
       'region_boxes': np.tile([0.1, 0.1, 0.5, 0.5], (36, 1)).astype(
           np.float32),
       'region_tags': ['dog'] * 36, 'region_conf': np.ones(36, np.float32)}
      for i in range(images)))
  records.write_meta(d, {'tags': ['dog'], 'synonyms': {}, 'feature_dim': 2048,
                         'feature_dtype': 'float16', 'splits': {}})
  lines = [f'{{"image_id": "{i}", "caption": "A dog number {k} of {i}."}}'
           for i in range(images) for k in range(per_image)]
  (tmp_path / 'c.jsonl').write_text('\n'.join(lines) + '\n')
  for copy, out in ((False, None), (True, str(tmp_path / 'copied'))):
    n, _ = captions.convert_captions('jsonl', str(tmp_path / 'c.jsonl'), d,
                                     out, 'pretrain', copy_features=copy)
    assert n == images * per_image
  store_bytes = (os.path.getsize(region_store.store_path(d))
                 + os.path.getsize(region_store.index_path(
                     region_store.store_path(d))))
  pairs = images * per_image
  caption_file = os.path.getsize(records.split_path(d, 'pretrain'))
  caption_bytes = caption_file / pairs  # A caption record, with its framing.
  per_pair = (store_bytes + caption_file) / pairs
  assert per_pair <= 1.1 * store_bytes / pairs + caption_bytes
  # No features in it: the file is a few 64 KiB blocks (ArrayRecord's
  # padding) against the store's 12 x 36 x 2048 float16 values.
  assert caption_file < 0.1 * store_bytes
  copied = os.path.getsize(records.split_path(str(tmp_path / 'copied'),
                                              'pretrain')) / pairs
  assert copied > 0.95 * per_image * store_bytes / pairs
