"""Downstream tasks from the synthetic world, and the region store.

Labels are re-derived here from the true scenes with a parser and relation
rules written independently of world_tasks.py, so a generator bug shows up
as a disagreement rather than being checked against itself.
"""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import tasks
from cmal_jax.world import scenes
from cmal_jax.world import task_baselines
from cmal_jax.world import task_common
from cmal_jax.world import task_examples as wt
from cmal_jax.world import task_vqa

P = scenes.WorldParams(feature_dim=64)
SPLITS = {'train': 160, 'val': 12, 'test': 80}
NUM_CHECKED = 90  # Examples per task whose labels are recomputed.


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tasks'))
  paths = wt.generate(d, tasks.TASKS, SPLITS, P, seed=0)
  return d, paths


def _read(directory, task, split):
  source = records.open_source(tasks.task_path(directory, task, split))
  return [records.decode_record(source[i]) for i in range(len(source))]


# ------------------------------------------------------- independent parser

_SIZES = {'small': 'small', 'little': 'small', 'tiny': 'small',
          'large': 'large', 'big': 'large'}
_NOUN_TAG = {}
for _w, _t in scenes.WORLD_SYNONYMS.items():
  _NOUN_TAG[_w] = _t
  _NOUN_TAG[scenes.plural(_w)] = _t
for _g in ('object', 'shape', 'thing'):
  _NOUN_TAG[_g] = _NOUN_TAG[_g + 's'] = None
_NOUNS_LONGEST = sorted(_NOUN_TAG, key=len, reverse=True)
_REL = {'to the left of': 'left', 'to the right of': 'right',
        'above': 'above', 'below': 'below'}
_REL_RE = '|'.join(_REL)


def parse_desc(phrase):
  """'small red discs' -> {'size': 'small', 'colour': 'red', 'shape': ...}."""
  phrase = phrase.strip()
  phrase = re.sub(r'^(the|a|an) ', '', phrase)
  noun = next(n for n in _NOUNS_LONGEST
              if phrase == n or phrase.endswith(' ' + n))
  desc = {} if _NOUN_TAG[noun] is None else {'shape': _NOUN_TAG[noun]}
  for word in phrase[:len(phrase) - len(noun)].split():
    if word in _SIZES:
      desc['size'] = _SIZES[word]
    else:
      assert word in scenes.COLOURS, (word, phrase)
      desc['colour'] = word
  return desc


def fits(objects, desc):
  return [o for o in objects
          if all(getattr(o, k) == v for k, v in desc.items())]


def rel_holds(a, b, rel):
  """a rel b by centres; None inside a 6 % dead zone (64 px -> 3.84 px)."""
  d = {'left': b.center[0] - a.center[0], 'right': a.center[0] - b.center[0],
       'above': b.center[1] - a.center[1], 'below': a.center[1] - b.center[1]}
  d = d[rel]
  return None if abs(d) <= 0.06 * P.image_size else d > 0


def _scenes(task, n=NUM_CHECKED, split='train'):
  for i in range(n):
    example, images = wt.make_example_scenes(task, 0, split, i, P)
    yield example, [scene for _, scene in images]


# --------------------------------------------------------------- determinism

@pytest.mark.parametrize('task', tasks.TASKS)
def test_same_seed_same_bytes_other_split_differs(task):
  for i in (0, 7):
    a_ex, a_regions = wt.make_example(task, 0, 'train', i, P)
    wt.make_example(task, 0, 'train', i + 1, P)  # Other work in between.
    b_ex, b_regions = wt.make_example(task, 0, 'train', i, P)
    assert records.encode_record(a_ex) == records.encode_record(b_ex)
    assert ([records.encode_record(r) for r in a_regions]
            == [records.encode_record(r) for r in b_regions])
    v_ex, v_regions = wt.make_example(task, 0, 'val', i, P)
    assert {r['image_id'] for r in a_regions}.isdisjoint(
        r['image_id'] for r in v_regions)
    assert not np.array_equal(a_regions[0]['region_feats'],
                              v_regions[0]['region_feats'])
    s_ex, _ = wt.make_example(task, 1, 'train', i, P)
    assert records.encode_record(s_ex) != records.encode_record(a_ex)


def test_streams_disjoint_from_pretraining():
  ids = {scenes.split_id(s) for s in ('pretrain', 'val')}
  for task in tasks.TASKS:
    for split in SPLITS:
      assert scenes.split_id(task_common.stream_name(task, split)) not in ids
  # Task image 0 is not pre-training image 0 (same seed, same index).
  _, images = wt.make_example_scenes('retrieval', 0, 'train', 0, P)
  rng = np.random.default_rng([0, scenes.split_id('pretrain'), 0])
  assert not np.array_equal(images[0][1].image,
                            scenes.sample_scene(rng, P).image)


# -------------------------------------------------------------------- schema

_TYPES = {
    'vqa': {'question_id': int, 'image_id': str, 'question': str,
            'answers': list, 'question_type': str, 'answer_type': str},
    've': {'pair_id': str, 'image_id': str, 'hypothesis': str, 'label': str},
    'nlvr2': {'identifier': str, 'image_ids': list, 'sentence': str,
              'label': bool},
    'rec': {'ref_id': int, 'sent_id': int, 'image_id': str,
            'expression': str, 'target_box': list},
    'retrieval': {'image_id': str, 'captions': list},
}


def _image_ids(task, ex):
  return ex['image_ids'] if task == 'nlvr2' else [ex['image_id']]


@pytest.mark.parametrize('task', tasks.TASKS)
def test_schema_and_store_coverage(dataset, task):
  d, _ = dataset
  store = region_store.RegionStore(region_store.store_path(d))
  seen_ids = set()
  for split, num in SPLITS.items():
    examples = _read(d, task, split)
    assert len(examples) == num
    for ex in examples:
      assert tuple(sorted(ex)) == tuple(sorted(tasks.TASK_FIELDS[task]))
      for field, typ in _TYPES[task].items():
        assert type(ex[field]) is typ, (field, ex)  # bool is not int here.
      for image_id in _image_ids(task, ex):
        assert image_id in store, image_id
      seen_ids.update(_image_ids(task, ex))
      if task == 'vqa':
        assert len(ex['answers']) == 10
        assert all(isinstance(a, str) and a for a in ex['answers'])
        assert ex['question_type'] in task_vqa.VQA_TYPES
        assert ex['answer_type'] in ('yes/no', 'number', 'other')
      elif task == 've':
        assert ex['label'] in tasks.VE_LABELS
      elif task == 'nlvr2':
        left, right = ex['image_ids']
        pair = ex['identifier'].rsplit('-', 1)[0]
        assert (left, right) == (pair + '-img0', pair + '-img1')
        assert len(ex['identifier'].split('-')) == 4
      elif task == 'rec':
        x1, y1, x2, y2 = ex['target_box']
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
      else:
        assert len(ex['captions']) == 5
        assert len(set(ex['captions'])) >= 2
  key = {'vqa': 'question_id', 've': 'pair_id', 'nlvr2': 'identifier',
         'rec': 'sent_id', 'retrieval': 'image_id'}[task]
  all_keys = [ex[key] for s in SPLITS for ex in _read(d, task, s)]
  assert len(set(all_keys)) == len(all_keys)  # Ids unique across splits.
  # Region records are the detector's: valid, F = 64, tags from the scenes.
  rec = store[sorted(seen_ids)[0]]
  assert rec['region_feats'].shape[1:] == (64,)
  assert set(rec['region_tags']) <= set(scenes.WORLD_TAGS) | {''}


def test_store_holds_the_regenerated_regions(dataset):
  d, paths = dataset
  store = region_store.RegionStore(paths['regions'])
  for task, i in (('vqa', 3), ('nlvr2', 5), ('rec', 0)):
    example, regions = wt.make_example(task, 0, 'test', i, P)
    assert example == _read(d, task, 'test')[i]
    for r in regions:
      got = store[r['image_id']]
      np.testing.assert_array_equal(got['region_feats'], r['region_feats'])
      np.testing.assert_array_equal(got['region_boxes'], r['region_boxes'])
      assert got['region_tags'] == r['region_tags']


def test_meta_and_store_size(dataset):
  d, paths = dataset
  meta = records.read_meta(d)
  assert meta['feature_dim'] == 64
  assert meta['tags'] == list(scenes.WORLD_TAGS)
  assert meta['synonyms']['disc'] == 'circle'
  assert meta['splits']['nlvr2_train'] == SPLITS['train']
  store = region_store.RegionStore(paths['regions'])
  per_split = sum(SPLITS.values())
  assert len(store) == per_split * (len(tasks.TASKS) + 1)  # NLVR2: 2 each.


# --------------------------------------------------------------- correctness

def test_vqa_answers_follow_from_the_scene():
  checked = collections.Counter()
  for ex, (scene,) in _scenes('vqa'):
    obs, q = scene.objects, ex['question'].lower()
    votes = collections.Counter(ex['answers'])
    truth, n_truth = votes.most_common(1)[0]
    assert n_truth >= 6
    qt = ex['question_type']
    if qt == 'count':
      m = re.fullmatch(r'how many (.+) are there\?', q)
      assert truth == str(len(fits(obs, parse_desc(m[1])))), q
      assert ex['answer_type'] == 'number'
    elif qt == 'exists':
      m = re.fullmatch(r'is there (.+)\?', q)
      assert truth == ('yes' if fits(obs, parse_desc(m[1])) else 'no'), q
      assert ex['answer_type'] == 'yes/no'
    elif qt in ('colour', 'shape', 'size'):
      m = (re.fullmatch(r'what (?:colour|shape|size) is the (.+)\?', q)
           or re.fullmatch(r'is the (.+) small or large\?', q))
      (ob,) = fits(obs, parse_desc(m[1]))  # Asked only when unique.
      assert truth == getattr(ob, qt), q
    else:
      m = re.fullmatch(rf'what is ({_REL_RE}) the (.+)\?', q)
      (anchor,) = fits(obs, parse_desc(m[2]))
      holds = [rel_holds(o, anchor, _REL[m[1]]) for o in obs if o is not anchor]
      assert None not in holds and holds.count(True) == 1, q
      target = [o for o in obs if o is not anchor][holds.index(True)]
      assert truth == target.shape, q
    checked[qt] += 1
  assert set(checked) == set(task_vqa.VQA_TYPES)


def test_vqa_annotators_disagree_sometimes():
  soft = []
  for ex, _ in _scenes('vqa', 120):
    soft.append(len(set(ex['answers'])) > 1)
  assert 0.2 < np.mean(soft) < 0.9  # Soft scores are not all 1.0.


def _ve_label(truths):
  return ('entailment' if all(truths) else
          'contradiction' if not any(truths) else 'neutral')


def test_ve_labels_follow_from_the_scene():
  families = collections.Counter()
  for ex, (scene,) in _scenes('ve'):
    obs, h = scene.objects, ex['hypothesis'].lower().rstrip('.')
    m = re.fullmatch(rf'the (.+) is ({_REL_RE}) the (.+)', h)
    if m:
      ca, cb = fits(obs, parse_desc(m[1])), fits(obs, parse_desc(m[3]))
      assert ca and cb and not set(map(id, ca)) & set(map(id, cb))
      truths = [rel_holds(a, b, _REL[m[2]]) for a in ca for b in cb]
      assert None not in truths
      families['relation'] += 1
    else:
      subject, value = re.fullmatch(r'the (.+) is (.+)', h).groups()
      cands = fits(obs, parse_desc(subject))
      assert cands, h
      if value in scenes.COLOURS:
        truths = [o.colour == value for o in cands]
      elif value in _SIZES:
        truths = [o.size == _SIZES[value] for o in cands]
      else:
        shape = parse_desc(value)['shape']
        truths = [o.shape == shape for o in cands]
      families['attribute'] += 1
    assert _ve_label(truths) == ex['label'], (h, ex['label'])
  assert families['relation'] > 5 and families['attribute'] > 30


def test_nlvr2_labels_follow_from_both_scenes():
  templates = collections.Counter()
  for ex, (left, right) in _scenes('nlvr2'):
    s = ex['sentence'].lower().rstrip('.')
    patterns = {
        'both': r'both images contain (.+)',
        'exactly_one': r'exactly one image contains (.+)',
        'neither': r'neither image contains (.+)',
        'total': r'the two images contain exactly (\w+) (.+) in total',
        'more': r'the left image contains more (.+) than the right image',
        'fewer': r'the left image contains fewer (.+) than the right image',
        'same': r'the left image contains as many (.+) as the right image',
    }
    (name, m), = [(k, re.fullmatch(p, s)) for k, p in patterns.items()
                  if re.fullmatch(p, s)]
    desc = parse_desc(m[m.lastindex])
    cl, cr = len(fits(left.objects, desc)), len(fits(right.objects, desc))
    truth = {'both': cl > 0 and cr > 0, 'exactly_one': (cl > 0) != (cr > 0),
             'neither': cl == cr == 0, 'more': cl > cr, 'fewer': cl < cr,
             'same': cl == cr,
             'total': cl + cr == ('zero one two three four five'.split()
                                  .index(m[1]) if name == 'total' else 0)}
    assert truth[name] == ex['label'], (s, cl, cr)
    templates[name] += 1
  assert len(templates) >= 6


def test_rec_target_is_the_one_object_meant():
  kinds = collections.Counter()
  extremes = {'leftmost': (0, 1), 'rightmost': (0, -1), 'topmost': (1, 1),
              'lowest': (1, -1)}
  for ex, (scene,) in _scenes('rec'):
    obs, e = scene.objects, ex['expression']
    assert len(obs) >= 2  # There are distractors.
    m_rel = re.fullmatch(rf'the (.+) ({_REL_RE}) the (.+)', e)
    m_ext = re.fullmatch(r'the (leftmost|rightmost|topmost|lowest) (.+)', e)
    if m_rel:
      cands = fits(obs, parse_desc(m_rel[1]))
      (landmark,) = fits(obs, parse_desc(m_rel[3]))
      assert len(cands) >= 2
      holds = [rel_holds(c, landmark, _REL[m_rel[2]]) for c in cands]
      assert None not in holds and holds.count(True) == 1
      target = cands[holds.index(True)]
      kinds['relation'] += 1
    elif m_ext:
      cands = fits(obs, parse_desc(m_ext[2]))
      axis, sign = extremes[m_ext[1]]
      assert len(cands) >= 2
      cands.sort(key=lambda o: sign * o.center[axis])
      gap = sign * (cands[1].center[axis] - cands[0].center[axis])
      assert gap > 0.06 * P.image_size
      target = cands[0]
      kinds['extreme'] += 1
    else:
      (target,) = fits(obs, parse_desc(e))  # Exactly one object matches.
      kinds['attributes'] += 1
    np.testing.assert_allclose(ex['target_box'],
                               np.array(target.box) / P.image_size)
    assert all(0 <= v <= 1 for v in ex['target_box'])
  assert min(kinds.values()) >= 5 and len(kinds) == 3


def test_retrieval_captions_describe_the_scene():
  for ex, (scene,) in _scenes('retrieval', 30):
    assert len(ex['captions']) == 5
    colours = {o.colour for o in scene.objects}
    for c in ex['captions']:
      words = re.findall(r'[a-z]+', c.lower())
      named = {w for w in words if w in scenes.COLOURS}
      assert named and named <= colours, (c, colours)


# ---------------------------------------------------- balance and difficulty

def test_label_balance(dataset):
  d, _ = dataset
  ve = collections.Counter(ex['label'] for ex in _read(d, 've', 'train'))
  for label in tasks.VE_LABELS:
    assert 0.20 <= ve[label] / SPLITS['train'] <= 0.45, ve
  nlvr2 = [ex['label'] for ex in _read(d, 'nlvr2', 'train')]
  assert 0.40 <= np.mean(nlvr2) <= 0.60
  types = collections.Counter(ex['question_type']
                              for ex in _read(d, 'vqa', 'train'))
  assert set(types) == set(task_vqa.VQA_TYPES) and min(types.values()) >= 10


def test_blind_baselines_are_far_from_perfect(dataset):
  d, paths = dataset
  store = region_store.RegionStore(paths['regions'])
  scores = {}
  for task in tasks.TASKS:
    train, test = _read(d, task, 'train'), _read(d, task, 'test')
    scores[task] = task_baselines.blind_baseline(test, task, train=train,
                                                 regions=store)
  assert 0.15 < scores['vqa'] < 0.45, scores
  assert 0.2 < scores['ve'] < 0.45, scores
  assert 0.35 < scores['nlvr2'] < 0.65, scores
  assert 0.05 < scores['rec'] < 0.4, scores
  assert scores['retrieval'] == 1 / SPLITS['test']


# -------------------------------------------------------------- region store

def _region(image_id, n=3, f=64, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.5, (n, 2)).astype(np.float32)
  return {'image_id': image_id,
          'region_feats': rng.standard_normal((n, f)).astype(np.float32),
          'region_boxes': np.concatenate([xy, xy + 0.4], 1),
          'region_tags': ['circle'] * (n - 1) + [''] if n else [],
          'region_conf': np.linspace(0.9, 0.1, n).astype(np.float32)}


def test_region_store_round_trip(tmp_path):
  path = str(tmp_path / 'regions.array_record')
  recs = [_region(f'img{i}', n=i, seed=i) for i in range(4)]  # n = 0 too.
  assert region_store.write_region_store(path, recs) == 4
  assert os.path.exists(region_store.index_path(path))
  store = region_store.RegionStore(path)
  assert len(store) == 4 and store.image_ids() == [f'img{i}' for i in range(4)]
  assert 'img2' in store and 'img9' not in store
  for r in recs:
    got = store[r['image_id']]
    assert set(got) == {'image_id', *tasks.REGION_FIELDS}
    np.testing.assert_array_equal(got['region_feats'].reshape(-1, 64),
                                  r['region_feats'].reshape(-1, 64))
    np.testing.assert_array_equal(got['region_boxes'], r['region_boxes'])
    assert got['region_tags'] == r['region_tags']
    assert got['region_feats'].dtype == np.float32


def test_region_store_missing_id_names_store_and_id(tmp_path):
  path = str(tmp_path / 'regions.array_record')
  region_store.write_region_store(path, [_region('a')])
  with pytest.raises(KeyError) as e:
    region_store.RegionStore(path)['task-vqa-train-0-0000042']
  assert path in str(e.value) and 'task-vqa-train-0-0000042' in str(e.value)


def test_region_store_rejects_bad_records_on_write(tmp_path):
  path = str(tmp_path / 'regions.array_record')
  bad = _region('b', seed=1)
  bad['region_boxes'] = bad['region_boxes'] + 1.0  # Outside [0, 1].
  with pytest.raises(records.RecordError) as e:
    region_store.write_region_store(path, [_region('a'), bad])
  assert (e.value.path, e.value.index, e.value.field) == (
      path, 1, 'region_boxes')
  assert not os.path.exists(path)
  with pytest.raises(records.RecordError, match="record 1: field 'image_id'"):
    region_store.write_region_store(path, [_region('a'), _region('a')])
  narrow = _region('c', f=32)
  with pytest.raises(records.RecordError, match='region_feats'):
    region_store.write_region_store(path, [_region('a'), narrow])


def test_corrupted_record_names_file_record_and_field(tmp_path):
  path = str(tmp_path / 'regions.array_record')
  region_store.write_region_store(path, [_region(f'i{k}', seed=k)
                                         for k in range(3)])
  # Rewrite the data behind the store's back: record 2 gets a NaN feature
  # and record 1 loses its tags; the index still points at them.
  recs = [_region(f'i{k}', seed=k) for k in range(3)]
  recs[2]['region_feats'][0, 0] = np.nan
  recs[1]['region_tags'] = ['circle']
  records.write_records(path, recs)
  store = region_store.RegionStore(path)
  store['i0']  # Untouched records still read.
  with pytest.raises(records.RecordError) as e:
    store['i2']
  assert (e.value.path, e.value.index, e.value.field) == (
      path, 2, 'region_feats')
  assert 'NaN' in str(e.value)
  with pytest.raises(records.RecordError, match=r"record 1: field "
                     r"'region_tags': has 1 tags for 3 regions"):
    store['i1']
  with open(region_store.index_path(path), 'w') as f:
    json.dump({'i0': 1, 'i1': 0, 'i2': 2}, f)  # A stale index.
  with pytest.raises(records.RecordError, match="record 0: field 'image_id'"):
    region_store.RegionStore(path)['i1']


def test_region_store_without_index_says_how_to_make_it(tmp_path):
  path = str(tmp_path / 'regions.array_record')
  records.write_records(path, [_region('a')])
  with pytest.raises(FileNotFoundError, match='index'):
    region_store.RegionStore(path)
  with pytest.raises(FileNotFoundError, match='nope.array_record'):
    region_store.RegionStore(str(tmp_path / 'nope.array_record'))


# ----------------------------------------------------------------------- CLI

def test_cli_writes_every_file(tmp_path):
  out = str(tmp_path / 'cli')
  cmd = [sys.executable, '-m', 'cmal_jax.world.task_examples', f'--out={out}',
         '--tasks=vqa,nlvr2', '--num_train=6', '--num_val=3', '--num_test=2',
         '--feature_dim=64', '--seed=3']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  for task in ('vqa', 'nlvr2'):
    for split, n in (('train', 6), ('val', 3), ('test', 2)):
      assert len(_read(out, task, split)) == n
  assert not os.path.exists(tasks.task_path(out, 've', 'train'))
  store = region_store.RegionStore(region_store.store_path(out))
  assert len(store) == 11 + 2 * 11
  assert any(i.startswith('train_s3-') for i in store.image_ids())
  meta = records.read_meta(out)
  assert meta['feature_dim'] == 64 and meta['splits']['vqa_test'] == 2
  # A second task into the same folder keeps the first one's images.
  res = subprocess.run(cmd[:4] + ['--tasks=rec', '--num_train=2',
                                  '--num_val=1', '--num_test=1',
                                  '--feature_dim=64', '--seed=3'],
                       cwd=root, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  store = region_store.RegionStore(region_store.store_path(out))
  assert len(store) == 33 + 4
  assert records.read_meta(out)['splits']['vqa_test'] == 2
  bad = subprocess.run(cmd[:4] + ['--tasks=vqa,captioning'], cwd=root,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'captioning' in bad.stderr
