"""data.on_error='skip': a bad record is replaced by the next good record of
its file, deterministically, and counted per reason; too many skips stop the
run (pipeline.check_skip_limit)."""

import numpy as np
import pytest

from cmal_jax import configlib
from cmal_jax.data import anchors, pipeline, records
from cmal_jax.world import scenes
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer
from configs import pretrain
import cmal_testutil
from cmal_testutil import F, good_pair, write_dataset
from cmal_testutil import tiny_with_data as tiny

GARBAGE = b'\xc1\xc1 not msgpack'  # 0xc1 is never used by msgpack.
N = 12


def read_all(config, directory, batch_size=4):
  return cmal_testutil.read_all(config, directory, batch_size)


def _nan_feats(p):
  p['region_feats'][0, 5] = np.nan
  return p


def _drop_caption(p):
  del p['caption']
  return p


def _unknown_tag(p):
  p['region_tags'][0] = 'unicorn'
  return p


# Record index -> how it is broken. 5 and 6 are consecutive; 11, the last,
# wraps around to record 0.
BAD = {2: _nan_feats, 5: _drop_caption, 6: _drop_caption,
       9: lambda p: GARBAGE, 11: _unknown_tag}
# Slot -> the good record fed there, and what was skipped to reach it.
FED = [0, 1, 3, 3, 4, 7, 7, 7, 8, 10, 10, 0]
SKIPPED = {2: {'region_feats': 1}, 5: {'caption': 2}, 6: {'caption': 1},
           9: {'record': 1}, 11: {'region_tags': 1}}


@pytest.fixture
def bad_dir(tmp_path):
  pairs = [BAD[i](good_pair(i)) if i in BAD else good_pair(i)
           for i in range(N)]
  write_dataset(tmp_path, pairs)
  return tmp_path


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches])
          for k in batches[0] if k != 'stats'}, {
              k: np.concatenate([b['stats'][k] for b in batches])
              for k in batches[0]['stats']}


def test_skip_feeds_next_good_record_and_counts(bad_dir):
  config = tiny(on_error='skip', itm_neg_prob=0.0)
  batches = read_all(config, bad_dir)
  assert len(batches) == N // 4
  T, R, K = (config.data.max_text_len, config.data.max_regions,
             config.data.max_anchors)
  for b in batches:  # Full, static shapes.
    assert b['input_ids'].shape == (4, T)
    assert b['region_feats'].shape == (4, R, F)
    assert b['anchor_valid'].shape == (4, K)
    assert tuple(b['stats']) == pipeline.STAT_KEYS
    assert all(v.shape == (4,) and v.dtype == np.int32
               for v in b['stats'].values())
  arrays, stats = _concat(batches)

  # Every slot holds the good record it should: the same arrays as that
  # record encoded on its own.
  shapes = Shapes.from_config(config)
  vocab = anchors.TagVocab(scenes.WORLD_TAGS, scenes.WORLD_SYNONYMS)
  tok = load_tokenizer(None)
  for slot, i in enumerate(FED):
    assert i not in BAD
    image = pipeline.decode_pair(records.encode_record(good_pair(i)),
                                 path='x', index=i, shapes=shapes, vocab=vocab)
    want, _ = pipeline.encode_pair(image['caption'], image, tok, vocab, shapes)
    for k, v in want.items():
      np.testing.assert_array_equal(arrays[k][slot], v, err_msg=f'{slot} {k}')

  # Per-slot and total counts per reason are exact.
  for reason in pipeline.SKIP_REASONS:
    want = [SKIPPED.get(slot, {}).get(reason, 0) for slot in range(N)]
    np.testing.assert_array_equal(stats[f'skipped_{reason}'], want,
                                  err_msg=reason)
  totals = {k: int(v.sum()) for k, v in stats.items()}
  assert {r: totals[f'skipped_{r}'] for r in pipeline.SKIP_REASONS} == {
      'record': 1, 'image_id': 0, 'caption': 3, 'region_feats': 1,
      'region_boxes': 0, 'region_tags': 1, 'region_conf': 0}
  assert totals['examples'] == N
  assert pipeline.skip_report(totals) == (
      'Data: skipped 6 bad records for 12 examples (50.00%); by field: '
      'record 1, caption 3, region_feats 1, region_tags 1.')


def test_raise_still_names_file_record_field(bad_dir):
  path = records.split_path(str(bad_dir), 'pretrain')
  with pytest.raises(records.RecordError) as e:
    read_all(tiny(), bad_dir)  # on_error='raise' is the default.
  assert str(e.value) == (
      f"{path}: record 2: field 'region_feats': contains NaN or Inf")
  assert (e.value.path, e.value.index, e.value.field) == (
      path, 2, 'region_feats')


def test_raise_mode_carries_zero_skip_counters(tmp_path):
  write_dataset(tmp_path, [good_pair(i) for i in range(8)])
  for mode in ('raise', 'skip'):
    for b in read_all(tiny(on_error=mode), tmp_path):
      assert tuple(b['stats']) == pipeline.STAT_KEYS
      for r in pipeline.SKIP_REASONS:
        np.testing.assert_array_equal(b['stats'][f'skipped_{r}'], [0] * 4)


def test_skip_is_deterministic(bad_dir):
  """Two reads of the shuffled, repeated stream (one through the prefetching
  iterator) are identical, and each epoch skips the same records."""
  config = tiny(on_error='skip', itm_group=4)

  def dataset():
    ds, _, _ = pipeline.make_dataset(config, str(bad_dir), 'pretrain',
                                     batch_size=4, train=True, seed=3)
    return ds

  direct = [dataset()[i] for i in range(6)]  # Two epochs.
  it = pipeline.to_iterator(dataset(), config)
  streamed = [next(it) for _ in range(6)]
  for a, b in zip(direct, streamed):
    for (ka, va), (kb, vb) in zip(
        sorted(_flat(a).items()), sorted(_flat(b).items())):
      assert ka == kb
      np.testing.assert_array_equal(va, vb, err_msg=ka)
  for epoch in (direct[:3], direct[3:]):
    _, stats = _concat(epoch)
    assert int(stats['examples'].sum()) == N
    assert sum(int(stats[f'skipped_{r}'].sum())
               for r in pipeline.SKIP_REASONS) == 6


def _flat(batch):
  out = {k: v for k, v in batch.items() if k != 'stats'}
  out.update({f'stats/{k}': v for k, v in batch['stats'].items()})
  return out


def test_skip_gives_up_after_too_many_bad_in_a_row(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'MAX_CONSECUTIVE_BAD', 3)
  pairs = [good_pair(i) for i in range(8)]
  for i in (1, 2, 3):
    _nan_feats(pairs[i])
  path = write_dataset(tmp_path, pairs)
  with pytest.raises(records.RecordError) as e:
    read_all(tiny(on_error='skip'), tmp_path)
  assert (e.value.path, e.value.index, e.value.field) == (
      path, 1, 'region_feats')
  assert str(e.value).startswith(
      f"{path}: record 1: field 'region_feats': contains NaN or Inf; "
      "data.on_error='skip' gave up: the 3 records")


def test_skip_gives_up_when_every_record_is_bad(tmp_path):
  path = write_dataset(tmp_path, [GARBAGE] * 4)
  with pytest.raises(records.RecordError) as e:
    read_all(tiny(on_error='skip'), tmp_path)
  assert (e.value.path, e.value.index, e.value.field) == (path, 0, '*')
  assert 'gave up: the 4 records' in str(e.value)


class _FlakySource:
  """A source whose record 1 cannot be read, like a corrupt chunk."""

  def __init__(self, raws, path):
    self.raws, self.path = raws, path

  def __len__(self):
    return len(self.raws)

  def __getitem__(self, i):
    if i == 1:
      raise records.RecordError(self.path, i, '*', 'cannot read record')
    return self.raws[i]


def test_skip_survives_an_unreadable_record():
  config = tiny()
  shapes = Shapes.from_config(config)
  vocab = anchors.TagVocab(scenes.WORLD_TAGS, scenes.WORLD_SYNONYMS)
  source = _FlakySource([records.encode_record(good_pair(i))
                         for i in range(3)], 'f')
  decode = lambda mode: pipeline.RecordDecoder(
      source, path='f', shapes=shapes, vocab=vocab, on_error=mode)
  example = decode('skip')(1)
  assert example['image_id'] == good_pair(2)['image_id']
  assert example['skipped'] == {'record': 1}
  assert 'skipped' not in decode('skip')(0)
  with pytest.raises(records.RecordError, match="f: record 1: field '\\*'"):
    decode('raise')(1)


def test_region_tags_dict_with_bad_keys_is_a_record_error():
  """msgpack maps as region_tags are read as lists only with index keys."""
  p = good_pair(0)
  p['region_tags'] = {'a': 'circle'}
  with pytest.raises(records.RecordError, match='expected a list of str'):
    records.validate_pair(records.decode_record(records.encode_record(p)),
                          path='x', index=0, feature_dim=F)


# -------------------------------------------------------------- skip limit

def _stats(examples, **skipped):
  s = {k: 0 for k in pipeline.STAT_KEYS}
  s['examples'] = examples
  s.update({f'skipped_{r}': n for r, n in skipped.items()})
  return s


def test_check_skip_limit():
  config = tiny(on_error='skip')  # max_skip_fraction = 0.01.
  assert pipeline.check_skip_limit(_stats(0), config) == 0
  assert pipeline.check_skip_limit(_stats(1000), config) == 0
  # Exactly at the limit passes.
  assert pipeline.check_skip_limit(
      _stats(1000, caption=4, record=6), config) == 10
  with pytest.raises(ValueError) as e:
    pipeline.check_skip_limit(_stats(1000, caption=5, record=6), config)
  msg = str(e.value)
  assert 'config.data.max_skip_fraction=0.01' in msg
  assert 'Skipped 11 bad records for 1000 examples (1.10%)' in msg
  assert 'record 6, caption 5' in msg
  config.data.max_skip_fraction = 0.02
  assert pipeline.check_skip_limit(
      _stats(1000, caption=5, record=6), config) == 11
  config.data.max_skip_fraction = 0.0
  with pytest.raises(ValueError, match='max_skip_fraction=0.0 '):
    pipeline.check_skip_limit(_stats(10**6, region_conf=1), config)


def test_skip_report():
  assert pipeline.skip_report(_stats(64)) == (
      'Data: no bad records skipped (64 examples).')
  assert pipeline.skip_report(_stats(200, region_boxes=2, image_id=1)) == (
      'Data: skipped 3 bad records for 200 examples (1.50%); by field: '
      'image_id 1, region_boxes 2.')


@pytest.mark.parametrize('field,value,message', [
    ('on_error', 'ignore',
     "config.data.on_error='ignore': must be 'raise' or 'skip'"),
    ('max_skip_fraction', 1.5,
     'config.data.max_skip_fraction=1.5: must be a fraction in [0, 1]'),
    ('max_skip_fraction', -0.1, 'config.data.max_skip_fraction=-0.1'),
])
def test_invalid_skip_config(field, value, message):
  c = pretrain.get_config('tiny')
  c.data[field] = value
  with pytest.raises(ValueError) as e:
    configlib.validate(c)
  assert message in str(e.value)


def test_skip_config_defaults_validate():
  c = pretrain.get_config('tiny')
  assert (c.data.on_error, c.data.max_skip_fraction) == ('raise', 0.01)
  c.data.on_error = 'skip'
  configlib.validate(c)
