"""python -m cmal_jax.convert.inspect: reports checked against numbers computed
here straight from the records (and, for anchors, from anchors.py called
directly), and every error of a deliberately broken file reported."""

import collections
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cmal_jax.data import anchors
from cmal_jax.data import image_store
from cmal_jax.data import pair_source
from cmal_jax.convert import inspect as inspect_lib
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks
from cmal_jax.world import scenes
from cmal_jax.world import task_examples
from cmal_jax.data.tokenizer import load_tokenizer

P = scenes.WorldParams(feature_dim=64)
PIXELS = scenes.WorldParams(feature_dim=64, images=True)
NUM_PAIRS, NUM_TASK = 20, 20
TASKS_CHECKED = ('vqa', 'nlvr2', 'retrieval')  # 1 text, 2 images, 5 texts.


@pytest.fixture(scope='module')
def pair_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('pairs'))
  scenes.generate_split(d, 'train', NUM_PAIRS, P, seed=0)
  return d


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tasks'))
  task_examples.generate(d, tasks.TASKS, {'train': NUM_TASK}, P, seed=0)
  return d


def _read_all(path):
  source = records.open_source(path)
  return [records.decode_record(source[i]) for i in range(len(source))]


def _read_pairs(path):
  """A pair file's records as pair records: the world's caption records
  joined with their folder's store."""
  joiner = pair_source.folder_joiner(os.path.dirname(path), path, None)
  return [joiner.join(r, i) for i, r in enumerate(_read_all(path))]


def _int_stats(values):
  return dict(min=int(np.min(values)), mean=float(np.mean(values)),
              median=float(np.median(values)), max=int(np.max(values)))


def _check_stats(got, values):
  want = _int_stats(values)
  assert got['min'] == want['min'] and got['max'] == want['max']
  assert got['median'] == want['median']
  assert got['mean'] == pytest.approx(want['mean'])


def _direct_anchors(text_image_pairs, vocab):
  """Anchor numbers from anchors.detect_anchors called here directly."""
  tokenizer = load_tokenizer()
  per_pair, words = [], collections.Counter()
  for text, image in text_image_pairs:
    enc = tokenizer.encode(text, 10_000)
    tag_ids = [vocab.tag_id(t) for t in image['region_tags']]
    found = anchors.detect_anchors(text, enc.offsets, tag_ids,
                                   image['region_conf'], vocab, 100)
    per_pair.append(int(found.valid.sum()))
    for w, r in zip(found.words, found.region[found.valid]):
      words[f'{w.lower()} -> {image["region_tags"][r]}'] += 1
  per_pair = np.array(per_pair)
  histogram = {str(n): int(np.sum(per_pair == n)) for n in (0, 1, 2)}
  histogram['3+'] = int(np.sum(per_pair >= 3))
  return dict(pairs=len(per_pair), share=float(np.mean(per_pair > 0)),
              mean=float(np.mean(per_pair)), histogram=histogram, words=words)


def _check_anchors(got, want):
  assert got['available'] and got['pairs'] == want['pairs']
  assert got['with_anchor_share'] == pytest.approx(want['share'])
  assert got['per_caption_mean'] == pytest.approx(want['mean'])
  assert got['histogram'] == want['histogram']
  assert dict(map(tuple, got['top_anchors'])) == dict(want['words'])


# ------------------------------------------------------------- good files

def test_pair_file(pair_dir):
  path = records.split_path(pair_dir, 'train')
  report = inspect_lib.inspect_path(path, top=1000)
  pairs = [records.validate_pair(r, path=path, index=i, feature_dim=64)
           for i, r in enumerate(_read_pairs(path))]
  assert report['kind'] == 'pair'
  assert report['records'] == report['inspected'] == NUM_PAIRS
  assert report['valid_records'] == report['images'] == NUM_PAIRS
  assert report['caption_records'] == NUM_PAIRS  # The world's, by reference.
  assert report['num_errors'] == 0 and report['errors'] == []
  assert report['features']['width'] == 64
  assert report['features']['expected_width'] == 64
  assert report['features']['dtypes'] == {
      'float32': sum(len(p['region_tags']) > 0 for p in pairs)}
  # Regions, boxes and tags.
  counts = [len(p['region_tags']) for p in pairs]
  _check_stats(report['regions']['per_image'], counts)
  assert report['regions']['total'] == sum(counts)
  assert report['regions']['images_without_regions'] == counts.count(0)
  boxes = np.concatenate([p['region_boxes'] for p in pairs])
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  assert report['boxes']['area']['min'] == pytest.approx(area.min())
  assert report['boxes']['area']['max'] == pytest.approx(area.max())
  tags = collections.Counter(t for p in pairs for t in p['region_tags'])
  assert report['tags']['untagged_share'] == pytest.approx(
      tags[''] / sum(counts))
  assert dict(map(tuple, report['tags']['top'])) == {
      t: c for t, c in tags.items() if t}
  # Captions: world captions are words separated by single spaces.
  _check_stats(report['captions']['words'],
               [len(p['caption'].split()) for p in pairs])
  tokenizer = load_tokenizer()
  _check_stats(report['captions']['tokens'],
               [len(tokenizer.encode(p['caption'], 10_000).ids) - 2
                for p in pairs])
  # Anchors, from anchors.py called directly on the same records.
  vocab = anchors.TagVocab.from_meta(records.read_meta(pair_dir))
  _check_anchors(report['anchors'],
                 _direct_anchors([(p['caption'], p) for p in pairs], vocab))
  assert report['anchors']['with_anchor_share'] > 0.5  # The world names.


def test_region_store(task_dir):
  path = region_store.store_path(task_dir)
  report = inspect_lib.inspect_path(path)
  recs = _read_all(path)
  assert report['kind'] == 'regions' and report['num_errors'] == 0
  assert report['records'] == report['images'] == len(recs)
  assert report['features']['width'] == 64
  counts = [len(r['region_conf']) for r in recs]
  _check_stats(report['regions']['per_image'], counts)
  assert 'anchors' not in report


def _text_image_pairs(example, task, store):
  """What fine-tuning feeds, written out per task (not inspect's code)."""
  if task == 'vqa':
    return [(example['question'], store[example['image_id']])]
  if task == 'nlvr2':
    return [(example['sentence'], store[i]) for i in example['image_ids']]
  return [(c, store[example['image_id']]) for c in example['captions']]


@pytest.mark.parametrize('task', TASKS_CHECKED)
def test_task_file(task_dir, task):
  path = tasks.task_path(task_dir, task, 'train')
  report = inspect_lib.inspect_path(path, top=1000)
  examples = _read_all(path)
  store = region_store.RegionStore(region_store.store_path(task_dir))
  assert report['kind'] == 'task' and report['task'] == task
  assert report['records'] == report['valid_records'] == NUM_TASK
  assert report['num_errors'] == 0
  pairs = [p for ex in examples for p in _text_image_pairs(ex, task, store)]
  image_ids = {i for ex in examples
               for i in (ex['image_ids'] if task == 'nlvr2'
                         else [ex['image_id']])}
  assert report['images'] == len(image_ids)
  vocab = anchors.TagVocab.from_meta(records.read_meta(task_dir))
  _check_anchors(report['anchors'], _direct_anchors(pairs, vocab))
  texts = {'vqa': 1, 'nlvr2': 1, 'retrieval': 5}[task] * NUM_TASK
  assert report['captions']['count'] == texts


def test_folder_and_main(task_dir, capsys):
  report = inspect_lib.inspect_path(task_dir)
  assert report['kind'] == 'folder' and report['num_errors'] == 0
  kinds = {os.path.basename(f['path']): f.get('task') or f['kind']
           for f in report['files']}
  assert kinds == {'regions.array_record': 'regions',
                   **{f'{t}_train.array_record': t for t in tasks.TASKS}}
  assert inspect_lib.main([task_dir, '--json']) == 0
  assert json.loads(capsys.readouterr().out)['num_errors'] == 0
  assert inspect_lib.main([task_dir]) == 0
  text = capsys.readouterr().out
  assert 'region store' in text and 'vqa task file' in text
  assert text.splitlines()[-1].endswith('errors: 0')


def test_limit(pair_dir, capsys):
  path = records.split_path(pair_dir, 'train')
  report = inspect_lib.inspect_path(path, limit=5)
  assert report['records'] == NUM_PAIRS and report['inspected'] == 5
  assert report['valid_records'] == report['captions']['count'] == 5
  assert report['anchors']['pairs'] == 5
  assert inspect_lib.main([path, '--limit=5']) == 0
  assert 'only the first 5 inspected' in capsys.readouterr().out


def test_float16_features_are_reported_as_stored(tmp_path):
  pairs = [scenes.make_pair(0, 'half', i, P) for i in range(6)]
  for p in pairs:
    p['region_feats'] = p['region_feats'].astype(np.float16)
  path = str(tmp_path / 'half.array_record')
  records.write_records(path, pairs)
  report = inspect_lib.inspect_path(path)
  assert report['num_errors'] == 0
  assert report['features']['width'] == 64
  assert report['features']['dtypes'] == {
      'float16': sum(len(p['region_tags']) > 0 for p in pairs)}


# -------------------------------------------------------------- bad files

def _bad_pairs():
  """10 world pairs; record 3 has the wrong feature width, 5 a box outside
  [0, 1], 7 no caption."""
  pairs = [scenes.make_pair(0, 'bad', i, P) for i in range(10)]
  for i in (3, 5):  # Records with regions to break.
    assert len(pairs[i]['region_tags'])
  pairs[3]['region_feats'] = pairs[3]['region_feats'][:, :32]
  pairs[5]['region_boxes'][0, 2] = 1.5
  del pairs[7]['caption']
  return pairs


def test_every_bad_record_is_reported(tmp_path, capsys):
  path = str(tmp_path / 'bad.array_record')  # No meta.json: told by fields.
  records.write_records(path, _bad_pairs())
  report = inspect_lib.inspect_path(path)
  assert report['kind'] == 'pair'
  assert report['num_errors'] == 3 and report['valid_records'] == 7
  assert report['errors_by_field'] == {'region_feats': 1, 'region_boxes': 1,
                                       'caption': 1}
  want = [f"{path}: record 3: field 'region_feats': feature width 32",
          f"{path}: record 5: field 'region_boxes': coordinates outside",
          f"{path}: record 7: field 'caption': missing"]
  for error, start in zip(report['errors'], want):
    assert error.startswith(start), error
  assert inspect_lib.main([path]) == 1
  out = capsys.readouterr().out
  assert all(w in out for w in want)
  assert inspect_lib.main([path, '--max_errors=1']) == 1
  out = capsys.readouterr().out
  assert want[0] in out and want[1] not in out and '... and 2 more' in out
  # The command itself exits non-zero.
  run = subprocess.run([sys.executable, '-m', 'cmal_jax.convert.inspect', path],
                       capture_output=True, text=True)
  assert run.returncode == 1 and want[2] in run.stdout


def test_bad_task_records(task_dir, tmp_path):
  d = str(tmp_path / 'tasks')
  shutil.copytree(task_dir, d)
  good = _read_all(tasks.task_path(d, 'vqa', 'train'))[:3]
  good[1]['image_id'] = 'no-such-image'
  del good[2]['answers']
  path = tasks.task_path(d, 'vqa', 'broken')
  records.write_records(path, good)
  report = inspect_lib.inspect_path(path)
  assert report['num_errors'] == 2
  assert report['errors'][0].startswith(
      f"{path}: record 1: field 'image_id': image 'no-such-image' is not in")
  assert report['errors'][1].startswith(f"{path}: record 2: field 'answers'")


def test_not_an_array_record_file(tmp_path, capsys):
  path = str(tmp_path / 'notes.array_record')
  with open(path, 'w') as f:
    f.write('image_id,caption\n1,a red circle\n')
  report = inspect_lib.inspect_path(path)
  assert report['kind'] == 'unreadable' and report['num_errors'] == 1
  assert report['errors'][0].startswith(
      f'{path}: not a readable ArrayRecord file')
  assert inspect_lib.main([path]) == 1
  assert 'not a readable ArrayRecord file' in capsys.readouterr().out
  assert inspect_lib.main([str(tmp_path / 'missing')]) == 2
  assert 'no such file or folder' in capsys.readouterr().err


# ------------------------------------------------------------- pixels

def _image_sizes(datas):
  """(widths, heights) of encoded images, decoded here by PIL directly."""
  sizes = [Image.open(io.BytesIO(d)).size for d in datas]
  return [w for w, _ in sizes], [h for _, h in sizes]


def _check_pixels(got, datas):
  widths, heights = _image_sizes(datas)
  assert got['count'] == len(datas)
  assert got['formats'] == {'PNG': len(datas)}
  assert (got['width']['min'], got['width']['max']) == (min(widths),
                                                        max(widths))
  assert (got['height']['min'], got['height']['max']) == (min(heights),
                                                          max(heights))
  sizes = [len(d) for d in datas]
  assert (got['bytes']['min'], got['bytes']['max']) == (min(sizes),
                                                        max(sizes))
  assert got['bytes']['mean'] == pytest.approx(np.mean(sizes))


@pytest.fixture(scope='module')
def pixel_pair_dir(tmp_path_factory):
  """World pairs with PNG images (and region_feats: the world keeps both)."""
  d = str(tmp_path_factory.mktemp('pixel_pairs'))
  scenes.generate_split(d, 'train', NUM_PAIRS, PIXELS, seed=0)
  return d


def test_pair_file_with_images_and_features(pixel_pair_dir):
  path = records.split_path(pixel_pair_dir, 'train')
  report = inspect_lib.inspect_path(path)
  pairs = _read_pairs(path)
  assert report['kind'] == 'pair' and report['num_errors'] == 0
  assert report['valid_records'] == report['images'] == NUM_PAIRS
  assert report['features']['width'] == 64  # Both are checked.
  _check_pixels(report['pixels'], [p['image'] for p in pairs])
  assert report['anchors']['with_anchor_share'] > 0.5


def test_pixel_pairs_without_features_and_a_corrupt_image(pixel_pair_dir,
                                                          capsys):
  """What `convert captions` writes from an image store: image bytes, no
  region_feats; record 3's image is truncated."""
  pairs = _read_pairs(records.split_path(pixel_pair_dir, 'train'))
  for p in pairs:
    del p['region_feats']
  pairs[3]['image'] = pairs[3]['image'][:100]
  path = records.split_path(pixel_pair_dir, 'pixels')  # meta.json beside.
  records.write_records(path, pairs)
  report = inspect_lib.inspect_path(path)
  assert report['kind'] == 'pair' and report['features'] is None
  assert report['valid_records'] == report['images'] == NUM_PAIRS - 1
  assert report['errors_by_field'] == {'image': 1}
  want = (f"{path}: record 3: field 'image': image "
          f"{pairs[3]['image_id']!r}: cannot decode the image")
  assert report['errors'][0].startswith(want)
  good = pairs[:3] + pairs[4:]
  _check_pixels(report['pixels'], [p['image'] for p in good])
  counts = [len(p['region_tags']) for p in good]
  _check_stats(report['regions']['per_image'], counts)
  assert report['anchors']['pairs'] == NUM_PAIRS - 1
  assert inspect_lib.main([path]) == 1
  out = capsys.readouterr().out
  assert 'features  none (images only)' in out and want in out
  assert f'pixels    {NUM_PAIRS - 1} images (PNG {NUM_PAIRS - 1})' in out


def test_region_store_with_images(pixel_pair_dir):
  """Region records for pixels (no region_feats); record 1 corrupt."""
  pairs = _read_pairs(records.split_path(pixel_pair_dir, "train"))[:6]
  regions = [{k: p[k] for k in region_store.PIXEL_RECORD_FIELDS}
             for p in pairs]
  regions[1]['image'] = b'\x89PNG not really'
  d = os.path.join(pixel_pair_dir, 'store')
  path = region_store.store_path(d)
  region_store.write_region_store(path, regions)  # Bytes are not decoded.
  report = inspect_lib.inspect_path(path)
  assert report['kind'] == 'regions' and report['features'] is None
  assert report['valid_records'] == 5 and report['num_errors'] == 1
  assert report['errors'][0].startswith(
      f"{path}: record 1: field 'image': image {pairs[1]['image_id']!r}: "
      'cannot decode the image')
  _check_pixels(report['pixels'], [r['image'] for r in regions[:1] +
                                   regions[2:]])
  assert 'anchors' not in report


def _png_file(path, width, height, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
      path)
  return path.read_bytes()


def test_image_folder(tmp_path, capsys):
  """images.json of 4 images: two good, one corrupt PNG, one missing."""
  datas = [_png_file(tmp_path / 'a.png', 80, 60, 0),
           _png_file(tmp_path / 'b.png', 40, 50, 1)]
  corrupt = tmp_path / 'c.png'
  corrupt.write_bytes(_png_file(corrupt, 30, 30, 2)[:120])
  image_store.write_image_store(str(tmp_path), [
      ('1', {'file': 'a.png', 'boxes': [[8, 6, 48, 36], [0, 0, 80, 60]],
             'tags': ['car', '']}),
      ('2', {'file': 'b.png'}),  # No boxes: the grid.
      ('3', {'file': 'c.png', 'boxes': [[0, 0, 10, 10]], 'tags': ['car']}),
      ('4', {'file': 'gone.png'})])
  report = inspect_lib.inspect_path(str(tmp_path))
  assert report['kind'] == 'folder' and report['num_errors'] == 2
  (store,) = report['files']
  assert store == inspect_lib.inspect_path(str(tmp_path / 'images.json'))
  assert store['kind'] == 'images' and store['records'] == 4
  assert store['valid_records'] == store['images'] == 2
  assert (store['missing_files'], store['corrupt_images']) == (1, 1)
  assert store['errors_by_field'] == {'image': 1, 'file': 1}
  assert store['errors'][0].startswith(
      f"{corrupt}: image '3': cannot decode the image")
  assert store['errors'][1].startswith(
      f"{tmp_path / 'gone.png'}: image '4': cannot read the image file")
  _check_pixels(store['pixels'], datas)
  assert store['features'] is None and 'anchors' not in store
  assert store['regions']['total'] == 2
  _check_stats(store['regions']['per_image'], [2, 0])
  # Boxes normalised by the decoded size: the second covers the image.
  assert store['boxes']['near_full'] == 1
  assert store['boxes']['area']['max'] == pytest.approx(1.0)
  assert store['boxes']['area']['min'] == pytest.approx(0.25)
  assert store['tags']['distinct'] == 1 and store['tags']['top'] == [
      ['car', 1]]
  assert inspect_lib.main([str(tmp_path)]) == 1
  out = capsys.readouterr().out
  assert 'image store, 4 listed, 2 images readable (1 missing, 1 corrupt)' \
      in out
  assert "image '3'" in out and "image '4'" in out


def test_task_file_on_an_image_folder(tmp_path):
  """Task examples are checked against images.json when there is no
  region store."""
  _png_file(tmp_path / 'a.png', 20, 20, 0)
  image_store.write_image_store(str(tmp_path), [('1', {'file': 'a.png'})])
  example = {'pair_id': 'p', 'image_id': '1', 'hypothesis': 'A dog.',
             'label': 'entailment'}
  path = tasks.task_path(str(tmp_path), 've', 'val')
  records.write_records(path, [example, dict(example, image_id='nope')])
  report = inspect_lib.inspect_path(path)
  assert report['task'] == 've' and report['valid_records'] == 1
  assert report['errors'] == [
      f"{path}: record 1: field 'image_id': image 'nope' is not in the "
      f"image store {tmp_path / 'images.json'}"]
