"""Real-world formats -> our records (convert/cli.py, formats/bottom_up.py,
formats/captions.py).

The TSVs are written the way bottom-up-attention's generate_tsv.py writes
them (cmal_testutil.tsv_row / write_tsv: csv, tab-separated, '\\r\\n' line
ends, each array base64 of its `.tobytes()`), independently of the
converter's own code; the caption files are hand-written samples of each
official format. The last test runs the whole chain, TSV -> region store
-> JSONL captions -> pair records (both inspected by python -m
cmal_jax.convert.inspect) -> 20 tiny pre-training steps.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cmal_jax import jobs
from cmal_jax.convert import cli as convert
from cmal_jax.data import pair_source, records, region_store
from cmal_jax.convert.formats import FormatError, bottom_up, captions
from cmal_testutil import TSV_IMAGE_SIZE, b64, tsv_row, write_tsv

# A Visual Genome-style vocabulary: canonical name first, synonyms after.
VOCAB = 'man,men,guy\ndog,puppy\ntree\ntraffic light,stoplight\nhorse\n\n'
TAGS = ['man', 'dog', 'tree', 'traffic light', 'horse']
(W, H), F = TSV_IMAGE_SIZE, 12


def _features(seed, n, width=F):
  return np.random.default_rng(seed).normal(size=(n, width)).astype(
      np.float32)


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


def _vocab(tmp_path):
  return _write(tmp_path / 'objects_vocab.txt', VOCAB)


BOXES_1 = [[10, 20, 330, 260], [0, 0, 640, 480]]
# Within the 1-pixel tolerance: clipped to the image.
BOXES_2 = [[-0.5, 100, 640.8, 480.9], [5, 5, 6, 6], [600, 0, 640, 10]]


def _good_rows():
  return [tsv_row(42, BOXES_1, _features(0, 2), [1, 3], [0.9, 0.4]),
          tsv_row(7, BOXES_2, _features(1, 3), [0, 0, 4],
                  [0.8, 0.7, 0.2])]


def _normalised(boxes):
  return (np.asarray(boxes, np.float64) / [W, H, W, H]).astype(np.float32)


def _leftovers(directory):
  """Files a failed conversion left in directory (which may not exist)."""
  return os.listdir(directory) if os.path.exists(directory) else []


def _store(out):
  return region_store.RegionStore(region_store.store_path(str(out)))


# ---------------------------------------------------------------- vocabulary

def test_vocab_canonical_names_and_synonyms(tmp_path):
  tags, synonyms = bottom_up.read_vocab(_vocab(tmp_path))
  assert tags == TAGS
  assert synonyms == {
      'man': 'man', 'men': 'man', 'guy': 'man', 'dog': 'dog',
      'puppy': 'dog', 'tree': 'tree', 'traffic light': 'traffic light',
      'stoplight': 'traffic light', 'horse': 'horse'}


def test_vocab_blank_line_inside_is_an_error(tmp_path):
  path = _write(tmp_path / 'v.txt', 'man\n\ndog\n')
  with pytest.raises(FormatError, match=re.escape(f'{path}: line 2: no '
                                                  'class name (class id 1)')):
    bottom_up.read_vocab(path)


# ---------------------------------------------------------------- bottom-up

def test_bottom_up_numbers_round_trip(tmp_path):
  tsv = write_tsv(tmp_path / 'feats.tsv', _good_rows())
  out = tmp_path / 'store'
  n, skipped = bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), str(out))
  assert (n, skipped) == (2, {})
  store = _store(out)
  assert store.image_ids() == ['42', '7']
  a, b = store['42'], store['7']
  np.testing.assert_array_equal(a['region_feats'], _features(0, 2))
  np.testing.assert_array_equal(b['region_feats'], _features(1, 3))
  np.testing.assert_array_equal(a['region_boxes'], _normalised(BOXES_1))
  clipped = [[0, 100, 640, 480], [5, 5, 6, 6], [600, 0, 640, 10]]
  np.testing.assert_array_equal(b['region_boxes'], _normalised(clipped))
  assert a['region_tags'] == ['dog', 'traffic light']
  assert b['region_tags'] == ['man', 'man', 'horse']
  np.testing.assert_array_equal(a['region_conf'],
                                np.float32([0.9, 0.4]))
  meta = records.read_meta(str(out))
  assert meta['tags'] == TAGS and meta['synonyms']['puppy'] == 'dog'
  assert (meta['feature_dim'], meta['feature_dtype']) == (F, 'float32')


def test_module_entry_point_converts_and_reports(tmp_path):
  # python -m cmal_jax.convert (convert/__main__.py) runs cli.main.
  tsv = write_tsv(tmp_path / 'feats.tsv', _good_rows())
  out = tmp_path / 'store'
  done = subprocess.run(
      [sys.executable, '-m', 'cmal_jax.convert', 'bottom_up', f'--tsv={tsv}',
       f'--vocab={_vocab(tmp_path)}', f'--out={out}'],
      capture_output=True, text=True, check=True)
  assert done.stdout.strip() == f'Wrote 2 images to {out}; skipped none'
  assert _store(out).image_ids() == ['42', '7']


@pytest.mark.parametrize('ids_dtype', [np.int64, np.float32, np.int32])
def test_object_ids_of_any_width_and_ten_columns(tmp_path, ids_dtype):
  rows = [tsv_row(1, BOXES_1, _features(0, 2), [4, 2], [0.5, 0.6],
                  attrs_conf=True, ids_dtype=ids_dtype)]
  assert len(rows[0]) == 10
  out = tmp_path / 'store'
  bottom_up.convert_bottom_up([write_tsv(tmp_path / 'f.tsv', rows)],
                              _vocab(tmp_path), str(out))
  assert _store(out)['1']['region_tags'] == ['horse', 'tree']


def test_lxmert_layout_is_detected(tmp_path):
  # img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
  # num_boxes, boxes, features.
  r = tsv_row('COCO_val2014_000000000042', BOXES_1, _features(0, 2),
              [1, 3], [0.9, 0.4], attrs_conf=True)
  lxmert = [r[0], r[2], r[1], r[6], r[7], r[8], r[9], r[3], r[4], r[5]]
  out = tmp_path / 'store'
  bottom_up.convert_bottom_up([write_tsv(tmp_path / 'f.tsv', [lxmert])],
                              _vocab(tmp_path), str(out), numeric_ids=True)
  regions = _store(out)['42']
  np.testing.assert_array_equal(regions['region_boxes'], _normalised(BOXES_1))
  assert regions['region_tags'] == ['dog', 'traffic light']


def test_six_columns_have_no_tags_and_full_confidence(tmp_path):
  rows = [tsv_row(3, BOXES_1, _features(0, 2)),
          tsv_row(4, [], np.zeros((0, F)))]
  out = tmp_path / 'store'
  n, _ = bottom_up.convert_bottom_up([write_tsv(tmp_path / 'f.tsv', rows)],
                                     _vocab(tmp_path), str(out))
  assert n == 2
  store = _store(out)
  assert store['3']['region_tags'] == ['', '']
  np.testing.assert_array_equal(store['3']['region_conf'], [1.0, 1.0])
  assert store['4']['region_feats'].shape == (0, F)


def test_float16_round_trip(tmp_path):
  tsv = write_tsv(tmp_path / 'feats.tsv', _good_rows())
  out = tmp_path / 'store'
  bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), str(out),
                              float16=True)
  raw = records.decode_record(records.open_source(
      region_store.store_path(str(out)))[0])
  assert raw['region_feats'].dtype == np.float16  # Half the bytes on disk.
  feats = _store(out)['42']['region_feats']
  assert feats.dtype == np.float32
  np.testing.assert_allclose(feats, _features(0, 2), rtol=1e-3, atol=1e-4)
  assert records.read_meta(str(out))['feature_dtype'] == 'float16'


def test_several_files_make_one_store(tmp_path):
  a = write_tsv(tmp_path / 'a.tsv', _good_rows()[:1])
  b = write_tsv(tmp_path / 'b.tsv', _good_rows()[1:])
  out = tmp_path / 'store'
  convert.main(['bottom_up', f'--tsv={a},{b}', f'--vocab={_vocab(tmp_path)}',
                f'--out={out}'])
  assert _store(out).image_ids() == ['42', '7']


# Bad input: (the bad line's columns from a good one, field, reason).
def _replace(index, value):
  return lambda row: row[:index] + [value] + row[index + 1:]


_BAD_LINES = {
    'malformed_base64': (_replace(5, 'not*base64!'), 'features'),
    'num_boxes_mismatch': (_replace(3, '3'), 'boxes'),
    'feature_width': (_replace(5, b64(_features(2, 2, F + 1))), 'features'),
    'box_outside_image': (_replace(4, b64(np.float32(
        [[0, 0, 10, 10], [0, 0, 642, 480]]))), 'boxes'),
    'unknown_object': (_replace(6, b64(np.int64([1, 5]))), 'objects_id'),
    'column_count': (lambda row: row[:5], 'features'),
    'bad_image_size': (_replace(1, '640.5'), 'image_w'),
    'duplicate_image_id': (_replace(0, '42'), 'image_id'),
}


def _bad_file(tmp_path, reasons):
  """Line 1 good (image 42), then one bad line per reason (from image 99's
  good line), then a good one (image 8)."""
  good = tsv_row(99, BOXES_1, _features(3, 2), [1, 3], [0.9, 0.4])
  rows = [_good_rows()[0]]
  rows += [_BAD_LINES[r][0](good) for r in reasons]
  rows.append(tsv_row(8, BOXES_1, _features(4, 2), [0, 0], [0.5, 0.5]))
  return write_tsv(tmp_path / 'bad.tsv', rows)


@pytest.mark.parametrize('reason', sorted(_BAD_LINES))
def test_bad_line_names_file_line_and_field(tmp_path, reason):
  tsv = _bad_file(tmp_path, [reason])
  field = _BAD_LINES[reason][1]
  with pytest.raises(FormatError, match='^' + re.escape(
      f"{tsv}: line 2: field '{field}': ")) as e:
    bottom_up.convert_bottom_up([tsv], _vocab(tmp_path),
                                str(tmp_path / 'store'))
  assert e.value.reason == reason
  assert _leftovers(tmp_path / 'store') == []


def test_bad_line_messages_say_what_is_wrong(tmp_path):
  vocab, out = _vocab(tmp_path), str(tmp_path / 'store')
  cases = {
      'duplicate_image_id': "duplicate id '42' (first at {tsv}: line 1)",
      'box_outside_image': 'box 1 [0.0, 0.0, 642.0, 480.0] lies outside the '
                           '640x480 image by more than 1 pixel',
      'unknown_object': 'class id 5 of box 1 is not in the vocabulary (5 '
                        'classes)',
      'feature_width': 'width 13 differs from 12 (set by {tsv}: line 1)',
  }
  for reason, message in cases.items():
    tsv = _bad_file(tmp_path, [reason])
    field = _BAD_LINES[reason][1]
    with pytest.raises(FormatError, match='^' + re.escape(
        f"{tsv}: line 2: field '{field}': {message.format(tsv=tsv)}") + '$'):
      bottom_up.convert_bottom_up([tsv], vocab, out)


def test_skip_bad_counts_each_reason(tmp_path, capsys):
  tsv = _bad_file(tmp_path, sorted(_BAD_LINES))
  out = tmp_path / 'store'
  n, skipped = convert.main(['bottom_up', f'--tsv={tsv}', '--skip_bad',
                             f'--vocab={_vocab(tmp_path)}', f'--out={out}'])
  assert n == 2 and skipped == {reason: 1 for reason in _BAD_LINES}
  assert _store(out).image_ids() == ['42', '8']
  printed = capsys.readouterr().out
  assert f'Wrote 2 images to {out}; skipped 8: bad_image_size 1,' in printed
  assert records.read_meta(str(out))['source']['skipped'] == skipped


def test_a_skipped_line_fixes_neither_width_nor_id(tmp_path):
  outside = [[0, 0, 10, 10], [0, 0, 700, 10]]
  rows = [tsv_row(42, outside, _features(0, 2, F + 1), [1, 3], [0.9, 0.4])]
  rows += _good_rows()  # Image 42 again, width F.
  out = tmp_path / 'store'
  n, skipped = bottom_up.convert_bottom_up(
      [write_tsv(tmp_path / 'f.tsv', rows)], _vocab(tmp_path), str(out),
      skip_bad=True)
  assert (n, skipped) == (2, {'box_outside_image': 1})
  assert records.read_meta(str(out))['feature_dim'] == F


def test_interrupted_conversion_leaves_no_store(tmp_path):
  rows = [tsv_row(i, BOXES_1, _features(i, 2), [1, 3], [0.9, 0.4])
          for i in range(32)]
  rows[30] = _replace(5, 'not*base64!')(rows[30])  # Near the end.
  tsv = write_tsv(tmp_path / 'f.tsv', rows)
  out = tmp_path / 'store'
  with pytest.raises(FormatError, match=re.escape(f"{tsv}: line 31: field "
                                                  "'features'")):
    bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), str(out))
  assert _leftovers(out) == []  # No data, .tmp, index nor meta.json.
  # A later run starts clean and succeeds.
  n, skipped = bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), str(out),
                                           skip_bad=True)
  assert (n, skipped) == (31, {'malformed_base64': 1})


def test_refuses_to_overwrite_a_store(tmp_path):
  tsv = write_tsv(tmp_path / 'f.tsv', _good_rows())
  out = str(tmp_path / 'store')
  bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), out)
  with pytest.raises(FileExistsError, match='fresh directory'):
    bottom_up.convert_bottom_up([tsv], _vocab(tmp_path), out)


# ---------------------------------------------------------------- captions

@pytest.fixture
def store_dir(tmp_path):
  """Images '42' (dog, traffic light) and '7' (man, man, horse)."""
  out = str(tmp_path / 'store')
  bottom_up.convert_bottom_up(
      [write_tsv(tmp_path / 'f.tsv', _good_rows())], _vocab(tmp_path), out)
  return out


def _pairs(directory, split):
  """A split's records as pre-training reads them (caption records joined
  with the folder's store)."""
  meta = records.read_meta(str(directory))
  source, path = pair_source.open_split(str(directory), split, pixels=False,
                                        feature_dim=meta['feature_dim'])
  return [records.validate_pair(records.decode_record_at(source[i], path, i),
                                path='', index=i,
                                feature_dim=meta['feature_dim'])
          for i in range(len(source))]


def _stored(directory, split):
  """A split's records as they are on disk."""
  source = records.open_source(records.split_path(str(directory), split))
  return [records.decode_record(source[i]) for i in range(len(source))]


def _check_pairs(out, split, expected):
  pairs = _pairs(out, split)
  assert [(p['image_id'], p['caption']) for p in pairs] == expected
  for p in pairs:  # Each carries its image's regions.
    want = _features(0, 2) if p['image_id'] == '42' else _features(1, 3)
    np.testing.assert_array_equal(p['region_feats'], want)
  meta = records.read_meta(str(out))
  assert meta['tags'] == TAGS and meta['feature_dim'] == F
  assert meta['splits'][split] == len(expected)


def test_coco_captions(tmp_path, store_dir):
  path = _write(tmp_path / 'captions_val2014.json', json.dumps({
      'info': {}, 'images': [{'id': 42, 'file_name': 'x.jpg'}],
      'annotations': [
          {'image_id': 42, 'id': 1, 'caption': 'A dog under a stoplight. '},
          {'image_id': 7, 'id': 2, 'caption': 'Two men and a horse.'}]}))
  n, skipped = captions.convert_captions('coco', path, store_dir, None,
                                         'val')
  assert (n, skipped) == (2, {})
  # Caption records beside the store, joined when read.
  assert _stored(store_dir, 'val') == [
      {'image_id': '42', 'caption': 'A dog under a stoplight.'},
      {'image_id': '7', 'caption': 'Two men and a horse.'}]
  _check_pairs(store_dir, 'val', [('42', 'A dog under a stoplight.'),
                                  ('7', 'Two men and a horse.')])
  with pytest.raises(ValueError, match=re.escape(
      f"--out={tmp_path / 'pairs'} is not the store's folder")):
    captions.convert_captions('coco', path, store_dir, str(tmp_path / 'pairs'),
                              'val')


def test_vg_region_descriptions(tmp_path, store_dir):
  region = lambda rid, phrase: {'region_id': rid, 'image_id': 7,
                                'phrase': phrase, 'x': 1, 'y': 2,
                                'width': 30, 'height': 40}
  path = _write(tmp_path / 'region_descriptions.json', json.dumps([
      {'id': 7, 'regions': [region(11, 'man riding a horse'),
                            region(12, 'the guy is smiling')]}]))
  out = tmp_path / 'pairs'  # Self-contained pair records, anywhere.
  n, _ = captions.convert_captions('vg', path, store_dir, str(out),
                                   'pretrain', copy_features=True)
  assert n == 2
  assert all('region_feats' in p for p in _stored(out, 'pretrain'))
  _check_pairs(out, 'pretrain', [('7', 'man riding a horse'),
                                 ('7', 'the guy is smiling')])


def test_jsonl_captions_and_splits_merge(tmp_path, store_dir):
  path = _write(tmp_path / 'c.jsonl', '{"image_id": "7", "caption": "men"}\n'
                '{"image_id": 42, "caption": "a puppy"}\n\n')
  out = store_dir  # --out defaults to --regions.
  convert.main(['captions', '--format=jsonl', f'--input={path}',
                f'--regions={store_dir}', '--split=val'])
  convert.main(['captions', '--format=jsonl', f'--input={path}',
                f'--regions={store_dir}'])
  _check_pairs(out, 'pretrain', [('7', 'men'), ('42', 'a puppy')])
  assert records.read_meta(str(out))['splits'] == {'val': 2, 'pretrain': 2}


_BAD_CAPTIONS = [  # (JSONL line, field, reason), each on line 2.
    ({'image_id': 404, 'caption': 'a dog'}, 'image_id', 'unknown_image'),
    ({'image_id': 42, 'caption': '   '}, 'caption', 'empty_caption'),
    ({'image_id': 42}, 'caption', 'missing_field'),
    ({'caption': 'a dog'}, 'image_id', 'missing_field'),
]


@pytest.mark.parametrize('line,field,reason', _BAD_CAPTIONS)
def test_bad_caption_names_file_line_and_field(tmp_path, store_dir, line,
                                               field, reason):
  path = _write(tmp_path / 'c.jsonl', json.dumps(
      {'image_id': 7, 'caption': 'a man'}) + '\n' + json.dumps(line) + '\n')
  out = store_dir
  with pytest.raises(FormatError, match='^' + re.escape(
      f"{path}: line 2: field '{field}': ")) as e:
    captions.convert_captions('jsonl', path, store_dir, out, 'pretrain')
  assert e.value.reason == reason
  assert not os.path.exists(records.split_path(str(out), 'pretrain'))
  n, skipped = captions.convert_captions('jsonl', path, store_dir, out,
                                         'pretrain', skip_bad=True)
  assert (n, skipped) == (1, {reason: 1})


def test_coco_and_vg_errors_name_the_record(tmp_path, store_dir):
  coco = _write(tmp_path / 'coco.json', json.dumps({'annotations': [
      {'image_id': 404, 'id': 9, 'caption': 'a dog'}]}))
  with pytest.raises(FormatError, match=re.escape(
      f"{coco}: id 9: field 'image_id': image '404' has no region")):
    captions.convert_captions('coco', coco, store_dir, None, 'val')
  vg = _write(tmp_path / 'vg.json', json.dumps([{'id': 7, 'regions': [
      {'region_id': 5, 'image_id': 7, 'phrase': ''}]}]))
  with pytest.raises(FormatError, match=re.escape(
      f"{vg}: region_id 5: field 'phrase': empty caption")):
    captions.convert_captions('vg', vg, store_dir, None, 'val')


# ---------------------------------------------------------------- end to end

E2E_F = 32  # Not the tiny config's 64: the override must follow the data.
_SCENES = [  # Class ids of each image's boxes (TAGS order).
    [0, 1, 4], [0, 0, 2], [1, 2, 3], [4, 4, 0, 1], [2, 3], [0, 1, 2, 3, 4],
    [1, 1], [3, 0, 4], [2, 2, 1], [4, 1], [0, 3], [1, 4, 2], [0, 2, 4],
    [3, 3, 1], [2, 0], [4, 2, 3]]
_WORDS = [('man', 'men', 'guy'), ('dog', 'puppy'), ('tree',),
          ('traffic light', 'stoplight'), ('horse',)]


def _e2e_tsv(path):
  """16 images whose features carry their boxes' classes (so there is
  something to learn), tagged by the detector with those classes."""
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(len(TAGS), E2E_F))
  rows = []
  for i, classes in enumerate(_SCENES):
    n = len(classes)
    x1 = rng.uniform(0, 300, n)
    y1 = rng.uniform(0, 200, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(10, 300, n),
                      y1 + rng.uniform(10, 250, n)], 1)
    feats = (directions[classes] + 0.1 * rng.normal(size=(n, E2E_F)))
    rows.append(tsv_row(1000 + i, boxes, feats.astype(np.float32), classes,
                        rng.uniform(0.3, 1.0, n)))
  return write_tsv(path, rows)


def _e2e_captions(path, templates):
  """One JSONL caption per image and template, naming its classes."""
  with open(path, 'w') as f:
    for i, classes in enumerate(_SCENES):
      for k, template in enumerate(templates):
        words = [_WORDS[c][(i + k) % len(_WORDS[c])] for c in classes[:2]]
        f.write(json.dumps({'image_id': 1000 + i,
                            'caption': template.format(*words)}) + '\n')
  return str(path)


def _check_inspected(store, data):
  """python -m cmal_jax.convert.inspect on the converted store and pairs."""
  from cmal_jax.convert import inspect as inspect_lib
  regions = inspect_lib.inspect_path(region_store.store_path(str(store)))
  assert regions['kind'] == 'regions' and regions['num_errors'] == 0
  assert regions['records'] == regions['images'] == len(_SCENES)
  assert regions['features']['width'] == E2E_F
  assert regions['features']['dtypes'] == {'float16': len(_SCENES)}
  assert regions['regions']['total'] == sum(map(len, _SCENES))
  assert regions['tags']['distinct'] == len(TAGS)
  assert regions['pixels'] is None
  pairs = inspect_lib.inspect_path(records.split_path(str(data), 'pretrain'))
  assert pairs['kind'] == 'pair' and pairs['num_errors'] == 0
  assert pairs['records'] == pairs['valid_records'] == 64
  assert pairs['images'] == len(_SCENES)
  assert pairs['features']['width'] == pairs['features'][
      'expected_width'] == E2E_F
  assert pairs['captions']['count'] == 64
  # Every caption names two of its image's classes (a synonym or not), as
  # the pipeline's batches show below.
  assert pairs['anchors']['available']
  assert pairs['anchors']['with_anchor_share'] == 1.0
  assert pairs['anchors']['per_caption_mean'] >= 1


# Slow (conversion, then a whole run): the converter's output is checked
# record by record above in the default run.
@pytest.mark.slow
def test_end_to_end_tsv_to_pretraining(tmp_path):
  from cmal_testutil import read_all
  from configs import pretrain
  store = data = tmp_path / 'store'  # Caption records beside the store.
  convert.main(['bottom_up', f'--tsv={_e2e_tsv(tmp_path / "f.tsv")}',
                f'--vocab={_vocab(tmp_path)}', f'--out={store}', '--float16'])
  train_caps = _e2e_captions(tmp_path / 'train.jsonl', [
      'A {} next to a {}.', 'There is a {} and a {} here.',
      'The {} looks at the {}.', 'one {} , one {}'])
  val_caps = _e2e_captions(tmp_path / 'val.jsonl', ['A {} with a {}.'])
  for split, path in (('pretrain', train_caps), ('val', val_caps)):
    convert.main(['captions', '--format=jsonl', f'--input={path}',
                  f'--regions={store}', f'--split={split}'])
  assert records.read_meta(str(data))['splits'] == {'pretrain': 64,
                                                    'val': 16}
  _check_inspected(store, data)

  c = pretrain.get_config('tiny')
  c.data.dir = str(data)
  c.model.region_feat_dim = E2E_F  # = meta.json feature_dim.
  # model.num_tags stays 0: the tag vocabulary is read from meta.json.
  c.total_steps, c.log_every = 4, 2  # Plumbing: trains, logs, evaluates.
  c.eval.batch_size, c.eval.retrieval_images = 16, 8
  # Caption words match vocabulary classes: every example has anchors (read
  # without ITM negatives, which pair an image with another's caption).
  own_captions = c.copy_and_resolve_references()
  own_captions.data.itm_neg_prob = 0.0
  for batch in read_all(own_captions, data, 16):
    assert batch['anchor_valid'].any(axis=1).all()
  results = jobs.train_and_evaluate(c, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    lines = [m for m in map(json.loads, f) if 'loss' in m]  # Train lines.
  assert [m['step'] for m in lines] == [2, 4]
  for m in lines:
    for key in ('loss_amc_pair', 'loss_amc_label', 'loss_mlm', 'loss_itm'):
      assert np.isfinite(m[key]), (key, m)
  assert 0 <= results['amc_pair_acc'] <= 1
