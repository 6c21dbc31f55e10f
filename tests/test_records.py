"""ArrayRecord storage: round trip, atomic writes, clear errors."""

import os

import numpy as np
import pytest

from cmal_jax.data import records


def _pair(n=3, f=64, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.5, (n, 2)).astype(np.float32)
  return {
      'image_id': f'img{seed}', 'caption': 'a red circle.',
      'region_feats': rng.standard_normal((n, f)).astype(np.float32),
      'region_boxes': np.concatenate([xy, xy + 0.3], 1),
      'region_tags': ['circle'] * n,
      'region_conf': np.full((n,), 0.9, np.float32),
  }


def test_round_trip(tmp_path):
  path = str(tmp_path / 'x.array_record')
  exs = [_pair(n, seed=n) for n in range(4)]
  assert records.write_records(path, exs) == 4
  source = records.open_source(path)
  assert len(source) == 4
  for i, ex in enumerate(exs):
    got = records.decode_record(source[i])
    got = records.validate_pair(got, path=path, index=i, feature_dim=64)
    np.testing.assert_array_equal(got['region_feats'], ex['region_feats'])
    np.testing.assert_array_equal(got['region_boxes'], ex['region_boxes'])
    assert got['region_tags'] == ex['region_tags']
    assert got['caption'] == ex['caption']


def test_one_record_reads_are_grains(tmp_path):
  """open_source reads one record as a range (records._CheckedSource): the
  bytes grain's ArrayRecordDataSource gives, for every record, in any
  order, and an index out of range is refused as grain refuses it."""
  import grain
  path = str(tmp_path / 'x.array_record')
  records.write_records(path, [{'i': i, 'pad': 'x' * (i % 7)}
                               for i in range(300)])
  ours, grains = records.open_source(path), grain.sources.ArrayRecordDataSource(
      [path])
  order = np.random.default_rng(0).permutation(300)
  assert [ours[int(i)] for i in order] == [grains[int(i)] for i in order]
  assert records.decode_record(ours[123]) == {'i': 123, 'pad': 'x' * 4}
  with pytest.raises(ValueError, match='Record key should be in'):
    ours[300]


def test_write_is_atomic(tmp_path):
  path = str(tmp_path / 'x.array_record')

  def broken():
    yield _pair()
    raise RuntimeError('generator died')

  with pytest.raises(RuntimeError):
    records.write_records(path, broken())
  assert not os.path.exists(path)
  assert not os.path.exists(path + '.tmp')


def test_missing_file_names_path(tmp_path):
  path = str(tmp_path / 'nope.array_record')
  with pytest.raises(FileNotFoundError, match='nope.array_record') as e:
    records.open_source(path)
  assert 'cmal_jax.world.scenes' in str(e.value)


def test_truncated_file_names_file(tmp_path):
  path = str(tmp_path / 'cut.array_record')
  records.write_records(path, [_pair(seed=i) for i in range(20)])
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match='cut.array_record'):
    source = records.open_source(path)
    for i in range(len(source)):
      source[i]


@pytest.mark.parametrize('field,corrupt,problem', [
    ('caption', lambda ex: ex.pop('caption'), 'missing'),
    ('region_feats', lambda ex: ex['region_feats'].__setitem__((1, 2), np.nan),
     'NaN'),
    ('region_boxes', lambda ex: ex['region_boxes'].__setitem__((0, 3), np.inf),
     'Inf'),
    ('region_feats', lambda ex: ex.__setitem__(
        'region_feats', np.zeros((3, 32), np.float32)),
     'feature width 32 does not match config model.region_feat_dim=64'),
    ('region_tags', lambda ex: ex['region_tags'].pop(), '2 tags for 3'),
    ('region_boxes', lambda ex: ex['region_boxes'].__setitem__((0, 0), 0.99),
     'x1 <= x2'),
])
def test_validate_errors(field, corrupt, problem):
  ex = _pair()
  corrupt(ex)
  with pytest.raises(records.RecordError) as e:
    records.validate_pair(ex, path='/d/train.array_record', index=7,
                          feature_dim=64)
  msg = str(e.value)
  assert msg.startswith(f"/d/train.array_record: record 7: field '{field}': ")
  assert problem in msg
  assert (e.value.path, e.value.index, e.value.field) == (
      '/d/train.array_record', 7, field)


def test_zero_regions_validate(tmp_path):
  path = str(tmp_path / 'z.array_record')
  records.write_records(path, [_pair(n=0)])
  ex = records.decode_record(records.open_source(path)[0])
  ex = records.validate_pair(ex, path=path, index=0, feature_dim=64)
  assert ex['region_feats'].shape == (0, 64)
  assert ex['region_boxes'].shape == (0, 4)
  assert ex['region_tags'] == []


def test_meta(tmp_path):
  d = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='meta.json'):
    records.read_meta(d)
  meta = {'tags': ['a'], 'synonyms': {'a': 'a'}, 'feature_dim': 64,
          'splits': {'train': 3}, 'generator': {}}
  records.write_meta(d, meta)
  records.write_meta(d, dict(meta, splits={'val': 2}))
  assert records.read_meta(d)['splits'] == {'train': 3, 'val': 2}
  with pytest.raises(ValueError, match='feature_dim'):
    records.write_meta(d, dict(meta, feature_dim=128))
  assert records.split_path(d, 'val') == os.path.join(d, 'val.array_record')
