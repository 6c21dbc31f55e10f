"""The fine-tuning input pipeline (cmal_jax/data/task_pipeline.py).

Expected values are recomputed here from the records and the region store
(top-R by confidence, soft scores, IoU written out by hand), not by calling
the pipeline's own helpers.
"""

import collections
import json
import os
import shutil

import numpy as np
import pytest

from cmal_jax import task_metrics
from cmal_jax.data import image_store
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import region_store
from cmal_jax.data import task_pipeline as tp
from cmal_jax.data import tasks
from cmal_jax.world import scenes
from cmal_jax.world import task_examples as wt
from cmal_jax.data.tokenizer import load_tokenizer
from configs import finetune
from cmal_testutil import break_region_record

SPLITS = {'train': 48, 'val': 16, 'test': 16}
B = 8
R = 5  # Below the world's up-to-8 regions, so truncation happens.
NUM_ANSWERS = 12


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """All five tasks (train 48 / val 16 / test 16), feature_dim 64. Tests
  that write copy it first (_copy)."""
  d = str(tmp_path_factory.mktemp('task_data'))
  wt.generate(d, tasks.TASKS, SPLITS, scenes.WorldParams(feature_dim=64),
              seed=0)
  return d


@pytest.fixture(scope='module')
def config():
  c = finetune.get_config('vqa,tiny')
  c.data.max_regions = R
  c.finetune.num_answers = NUM_ANSWERS
  return c


@pytest.fixture(scope='module')
def store(data_dir):
  return region_store.RegionStore(region_store.store_path(data_dir))


def _examples(directory, task, split):
  source = records.open_source(tasks.task_path(directory, task, split))
  return [records.decode_record(source[i]) for i in range(len(source))]


def _eval_batches(config, directory, task, split='val', **kw):
  ds, info = tp.make_task_dataset(config, directory, task, split,
                                  batch_size=B, train=False, seed=0, **kw)
  return [ds[i] for i in range(len(ds))], info


def _rows(batches, key):
  return np.concatenate([b[key] for b in batches])


def _stat(batches, key):
  return int(sum(b['stats'][key].sum() for b in batches))


def _ids(text, T):
  """The padded token ids of text, straight from the tokenizer."""
  enc = load_tokenizer(None).encode(text, T)
  ids = np.zeros(T, np.int32)
  ids[:len(enc.ids)] = enc.ids
  return ids, len(enc.ids)


def _top_regions(rec, r):
  """The r most confident regions of a store record, in stored order."""
  conf = rec['region_conf']
  keep = np.sort(np.argsort(-conf, kind='stable')[:r])
  return rec['region_feats'][keep], rec['region_boxes'][keep]


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


# ------------------------------------------------------- shapes and inputs

EXPECTED = {  # Task-specific arrays: (shape after B, dtype).
    'vqa': {'targets': None, 'question_id': ((), np.int32)},
    've': {'label': ((), np.int32)},
    'nlvr2': {'label': ((), np.int32)},
    'rec': {'region_iou': ((R,), np.float32), 'gold_region': ((), np.int32),
            'target_box': ((4,), np.float32)},
    'retrieval': {'itm_label': ((), np.int32)},
}


@pytest.mark.parametrize('task', tasks.TASKS)
def test_shapes_dtypes_text_and_regions(task, config, data_dir, store):
  T, F = config.data.max_text_len, config.model.region_feat_dim
  batches, info = _eval_batches(config, data_dir, task)
  assert info['num_examples'] == SPLITS['val'] and info['num_padded'] == 0
  assert len(batches) == SPLITS['val'] // B
  lead = (B, 2) if task == 'nlvr2' else (B,)
  common = {'input_ids': ((T,), np.int32), 'text_mask': ((T,), np.int32),
            'region_feats': ((R, F), np.float32),
            'region_boxes': ((R, 4), np.float32),
            'region_mask': ((R,), np.int32)}
  expected = dict(EXPECTED[task])
  if task == 'vqa':
    expected['targets'] = ((len(info['answer_vocab']),), np.float32)
  b = batches[0]
  for k, (shape, dtype) in common.items():
    assert b[k].shape == lead + shape and b[k].dtype == dtype, k
  for k, (shape, dtype) in expected.items():
    assert b[k].shape == (B,) + shape and b[k].dtype == dtype, k
  assert b['example_index'].tolist() == list(range(B))
  assert tuple(b['stats']) == tp.stat_keys(task, config)
  assert set(tp.TASK_STAT_KEYS[task]) < set(b['stats'])
  assert all(v.shape == (B,) and v.dtype == np.int32
             for v in b['stats'].values())
  assert not any(v.any() for k, v in b['stats'].items()
                 if k.startswith('skipped_'))  # 'raise': always 0.

  # Text and regions of every example against the tokenizer and the store.
  examples = _examples(data_dir, task, 'val')
  truncated_regions = truncated_text = 0
  for row, i in enumerate(_rows(batches, 'example_index')):
    ex = examples[i]
    if task == 'nlvr2':
      texts, image_ids = [ex['sentence']] * 2, ex['image_ids']
    elif task == 'retrieval':  # Eval: captions[0], unless a negative.
      texts, image_ids = None, [ex['image_id']]
    else:
      field = {'vqa': 'question', 've': 'hypothesis', 'rec': 'expression'}
      texts, image_ids = [ex[field[task]]], [ex['image_id']]
    for k, image_id in enumerate(image_ids):
      pick = lambda key: _rows(batches, key)[row][k] if task == 'nlvr2' else (
          _rows(batches, key)[row])
      if texts is not None:
        ids, n = _ids(texts[k], T)
        np.testing.assert_array_equal(pick('input_ids'), ids)
        assert pick('text_mask').sum() == n
        truncated_text += k == 0 and len(
            load_tokenizer(None).encode(texts[k], 10_000).ids) > T
      rec = store[image_id]
      feats, boxes = _top_regions(rec, R)
      n = len(feats)
      np.testing.assert_array_equal(pick('region_feats')[:n], feats)
      np.testing.assert_array_equal(pick('region_boxes')[:n], boxes)
      assert pick('region_mask').tolist() == [1] * n + [0] * (R - n)
      assert not pick('region_feats')[n:].any()
      truncated_regions += len(rec['region_conf']) > R
  assert _stat(batches, 'examples') == SPLITS['val']
  assert _stat(batches, 'regions_truncated') == truncated_regions > 0
  if task != 'retrieval':
    assert _stat(batches, 'captions_truncated') == truncated_text


# --------------------------------------------------------------------- vqa

def test_vqa_targets_by_hand(config, data_dir):
  batches, info = _eval_batches(config, data_dir, 'vqa')
  vocab = info['answer_vocab']
  train = _examples(data_dir, 'vqa', 'train')
  # The vocabulary: top answers of train by annotator count, ties a-z.
  counts = collections.Counter(task_metrics.normalize_vqa_answer(a)
                               for ex in train for a in ex['answers'])
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  assert vocab == [a for a, _ in ranked[:NUM_ANSWERS]]

  examples = _examples(data_dir, 'vqa', 'val')
  targets = _rows(batches, 'targets')
  no_target = 0
  for row, i in enumerate(_rows(batches, 'example_index')):
    ex = examples[i]
    assert _rows(batches, 'question_id')[row] == ex['question_id']
    expected = np.zeros(len(vocab), np.float32)
    for a, n in collections.Counter(
        task_metrics.normalize_vqa_answer(a) for a in ex['answers']).items():
      if a in vocab:
        expected[vocab.index(a)] = min(n / 3, 1)
    np.testing.assert_allclose(targets[row], expected, rtol=1e-6)
    no_target += not expected.any()
  assert _stat(batches, 'vqa_no_target') == no_target
  # Spot-check one example with disagreeing annotators written out in full.
  row = next(r for r, i in enumerate(_rows(batches, 'example_index'))
             if len(set(examples[i]['answers'])) > 1
             and examples[i]['answers'][0] in vocab)
  answers = examples[_rows(batches, 'example_index')[row]]['answers']
  first = answers[0]
  assert targets[row][vocab.index(first)] == pytest.approx(
      min(answers.count(first) / 3, 1))


def test_vqa_vocab_written_by_train_and_reused(config, data_dir, tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  vocab_file = os.path.join(d, tp.ANSWER_VOCAB_FILE)
  if os.path.exists(vocab_file):  # Another test of the module built it.
    os.remove(vocab_file)
  _, train_info = tp.make_task_dataset(config, d, 'vqa', 'train',
                                       batch_size=B, train=True, seed=0)
  with open(vocab_file) as f:
    saved = json.load(f)
  assert saved['answers'] == train_info['answer_vocab']
  assert saved['num_answers'] == NUM_ANSWERS
  assert saved['num_questions'] == SPLITS['train']
  # A file from another vqa_train (another number of questions) is stale.
  with open(vocab_file, 'w') as f:
    json.dump(dict(saved, answers=['x'], num_questions=1), f)
  assert tp.load_or_build_answer_vocab(d, NUM_ANSWERS) == saved['answers']
  # val reads the file: it works without the train split, and a (fake)
  # vocabulary in the file is what it uses.
  os.remove(tasks.task_path(d, 'vqa', 'train'))
  fake = list(reversed(saved['answers']))
  with open(vocab_file, 'w') as f:
    json.dump(dict(saved, answers=fake), f)
  ds, val_info = tp.make_task_dataset(config, d, 'vqa', 'val', batch_size=B,
                                      train=False, seed=0)
  assert val_info['answer_vocab'] == fake
  assert ds[0]['targets'].shape == (B, len(fake))
  # Another num_answers must rebuild from train, which is gone now.
  config2 = config.copy_and_resolve_references()
  config2.finetune.num_answers = NUM_ANSWERS + 1
  with pytest.raises(FileNotFoundError, match='vqa_train.array_record'):
    tp.make_task_dataset(config2, d, 'vqa', 'val', batch_size=B, train=False,
                         seed=0)


# ------------------------------------------------------------ ve and nlvr2

def test_ve_labels(config, data_dir):
  batches, _ = _eval_batches(config, data_dir, 've')
  examples = _examples(data_dir, 've', 'val')
  expected = [tasks.VE_LABELS.index(examples[i]['label'])
              for i in _rows(batches, 'example_index')]
  assert _rows(batches, 'label').tolist() == expected
  assert len(set(expected)) > 1


def test_nlvr2_pairs_and_flatten(config, data_dir, store):
  batches, _ = _eval_batches(config, data_dir, 'nlvr2')
  examples = _examples(data_dir, 'nlvr2', 'val')
  b = batches[0]
  assert b['label'].tolist() == [
      int(examples[i]['label']) for i in b['example_index']]
  flat = tp.flatten_image_pairs(b)
  T = config.data.max_text_len
  assert flat['input_ids'].shape == (2 * B, T)
  assert flat['region_feats'].shape == (2 * B, R, 64)
  assert flat['label'].shape == (B,)
  for j, i in enumerate(b['example_index']):
    left, right = examples[i]['image_ids']
    for row, image_id in ((2 * j, left), (2 * j + 1, right)):
      feats, boxes = _top_regions(store[image_id], R)
      np.testing.assert_array_equal(flat['region_feats'][row, :len(feats)],
                                    feats)
      np.testing.assert_array_equal(flat['region_boxes'][row, :len(boxes)],
                                    boxes)
      np.testing.assert_array_equal(flat['input_ids'][row],
                                    _ids(examples[i]['sentence'], T)[0])
  # Left and right images differ, so the order is really checked.
  assert not np.array_equal(flat['region_feats'][0], flat['region_feats'][1])


# --------------------------------------------------------------------- rec

def _iou_by_hand(box, target):
  x1, y1 = max(box[0], target[0]), max(box[1], target[1])
  x2, y2 = min(box[2], target[2]), min(box[3], target[3])
  inter = max(x2 - x1, 0) * max(y2 - y1, 0)
  area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
  return inter / (area(box) + area(target) - inter)


def test_rec_iou_gold_and_missed(config, data_dir, store):
  batches, _ = _eval_batches(config, data_dir, 'rec')
  examples = _examples(data_dir, 'rec', 'val')
  ious, golds = _rows(batches, 'region_iou'), _rows(batches, 'gold_region')
  missed = 0
  for row, i in enumerate(_rows(batches, 'example_index')):
    ex = examples[i]
    _, boxes = _top_regions(store[ex['image_id']], R)
    expected = np.zeros(R)
    expected[:len(boxes)] = [_iou_by_hand(bx, ex['target_box'])
                             for bx in boxes.astype(np.float64)]
    np.testing.assert_allclose(ious[row], expected, atol=1e-6)
    assert golds[row] == int(np.argmax(expected))
    np.testing.assert_allclose(_rows(batches, 'target_box')[row],
                               ex['target_box'])
    missed += expected.max() < 0.5
  assert _stat(batches, 'rec_target_missed') == missed
  # Both kinds occur with R = 5 (the detector's or the cut's misses).
  train_batches, _ = _eval_batches(config, data_dir, 'rec', split='train')
  assert 0 < _stat(train_batches, 'rec_target_missed') < SPLITS['train']


# --------------------------------------------------------------- retrieval

def _caption_of(input_ids, examples, T):
  """(example index, caption index) whose encoding input_ids is."""
  hits = [(e, c) for e, ex in enumerate(examples)
          for c, cap in enumerate(ex['captions'])
          if np.array_equal(_ids(cap, T)[0], input_ids)]
  assert hits, 'input_ids match no caption of the split'
  return hits


@pytest.mark.parametrize('train', [False, True])
def test_retrieval_itm(config, data_dir, train):
  T = config.data.max_text_len
  split = 'train' if train else 'val'
  examples = _examples(data_dir, 'retrieval', split)
  ds, _ = tp.make_task_dataset(config, data_dir, 'retrieval', split,
                               batch_size=B, train=train, seed=3)
  n_batches = 2 * SPLITS['train'] // B if train else SPLITS['val'] // B
  batches = [ds[i] for i in range(n_batches)]
  labels = _rows(batches, 'itm_label')
  assert 0.25 < labels.mean() < 0.75
  assert _stat(batches, 'itm_negatives') == (labels == 0).sum()
  seen = collections.defaultdict(set)
  for b in batches:
    batch_images = set(b['example_index'].tolist())
    for j, i in enumerate(b['example_index']):
      hits = _caption_of(b['input_ids'][j], examples, T)
      owners = {e for e, _ in hits}
      if b['itm_label'][j]:
        assert i in owners
        caps = {c for e, c in hits if e == i}
        seen[i] |= caps
        if not train:
          assert 0 in caps  # Eval pairs each image with captions[0].
      else:  # A negative: a caption of another image of the same batch.
        assert i not in owners and owners & (batch_images - {i})
  if train:  # A new random caption per epoch: some image got two.
    assert any(len(c) > 1 for c in seen.values())


# ---------------------------------------------- determinism and processes

def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if k == 'stats':
      _assert_batches_equal(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_determinism_and_epoch_reshuffle(config, data_dir):
  make = lambda seed: tp.make_task_dataset(
      config, data_dir, 'retrieval', 'train', batch_size=B, train=True,
      seed=seed)[0]
  a, b, c = make(0), make(0), make(1)
  per_epoch = SPLITS['train'] // B
  for i in range(2 * per_epoch):
    _assert_batches_equal(a[i], b[i])
  order = lambda ds, e: np.concatenate(
      [ds[i]['example_index'] for i in range(e * per_epoch,
                                             (e + 1) * per_epoch)])
  first, second = order(a, 0), order(a, 1)
  assert sorted(first) == sorted(second) == list(range(SPLITS['train']))
  assert not np.array_equal(first, second)  # Reshuffled.
  assert not np.array_equal(first, order(c, 0))  # Another seed.


@pytest.mark.parametrize('train', [False, True])
def test_process_slices(config, data_dir, train):
  split = 'train' if train else 'val'
  n = SPLITS[split]
  seen = []
  for p in range(2):
    ds, info = tp.make_task_dataset(config, data_dir, 've', split,
                                    batch_size=B, train=train, seed=0,
                                    process_index=p, process_count=2)
    assert info['num_local'] == n // 2
    # One epoch of this process (train: the stream repeats).
    seen.append(np.concatenate([ds[i]['example_index']
                                for i in range(n // 2 // B)]).tolist())
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(n))


@pytest.mark.parametrize('task', ['ve', 'retrieval'])
def test_training_batches_do_not_depend_on_the_process_count(config,
                                                             data_dir, task):
  """Process p feeds its block of every global batch, and retrieval draws
  its captions and negatives per group of rows: 1 process x batch 8 and 2
  processes x batch 4 make the same global batches."""
  c = config.copy_and_resolve_references()
  c.data.itm_group = 4
  one = tp.make_task_dataset(c, data_dir, task, 'train', batch_size=8,
                             train=True, seed=5)[0]
  two = [tp.make_task_dataset(c, data_dir, task, 'train', batch_size=4,
                              train=True, seed=5, process_index=p,
                              process_count=2)[0] for p in range(2)]
  for k in range(3):
    want = one[k]
    for key in want:
      if key == 'stats':
        continue
      np.testing.assert_array_equal(
          np.concatenate([ds[k][key] for ds in two]), want[key],
          err_msg=f'{task} {key} of batch {k}')
  if task == 'retrieval':
    assert 0 < one[0]['itm_label'].sum() < 8  # Negatives were drawn.


def test_eval_pads_to_whole_batches_and_marks_padding(config, data_dir):
  # 16 examples, batch 6: 18 rows, the last two repeat record 15, invalid.
  ds, info = tp.make_task_dataset(config, data_dir, 've', 'val',
                                  batch_size=6, train=False, seed=0)
  assert len(ds) == 3 and info['num_padded'] == 18 - SPLITS['val']
  batches = [ds[i] for i in range(len(ds))]
  index = np.concatenate([b['example_index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  assert index.tolist() == list(range(SPLITS['val'])) + [15, 15]
  assert valid.tolist() == [True] * SPLITS['val'] + [False, False]
  assert sum(int(b['stats']['examples'].sum()) for b in batches) == (
      SPLITS['val'])


def test_eval_padding_splits_evenly_over_processes(config, data_dir):
  # Two processes, batch 3 each: 16 -> 18 rows, 3 batches per process.
  got = []
  for p in range(2):
    ds, info = tp.make_task_dataset(config, data_dir, 've', 'val',
                                    batch_size=3, train=False, seed=0,
                                    process_index=p, process_count=2)
    assert len(ds) == 3 and info['num_padded'] == 2
    got += [(int(i), bool(v)) for b in (ds[j] for j in range(len(ds)))
            for i, v in zip(b['example_index'], b['valid'])]
  assert sorted(i for i, v in got if v) == list(range(SPLITS['val']))


# ------------------------------------------------------------ bad input

def _write_task(directory, task, split, examples):
  records.write_records(tasks.task_path(directory, task, split), examples)


def test_a_split_that_teaches_only_the_prior_is_reported(config, data_dir,
                                                         tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  # The generated splits teach more than the prior: no report.
  for task in ('vqa', 've', 'nlvr2'):
    _, info = tp.make_task_dataset(config, d, task, 'train', batch_size=B,
                                   train=True, seed=0)
    assert info['prior_only'] is None
  assert info['label_counts']['examples'] == SPLITS['train']
  assert len(info['label_counts']['labels']) == 2
  # VQA: every answer outside the (train-built) vocabulary, by writing a
  # vocabulary of answers nobody gave.
  _, info = tp.make_task_dataset(config, d, 'vqa', 'train', batch_size=B,
                                 train=True, seed=0)
  vocab = set(info['answer_vocab'])
  by_hand = sum(any(task_metrics.normalize_vqa_answer(a) in vocab
                    for a in ex['answers'])
                for ex in _examples(d, 'vqa', 'train'))
  assert 0 < by_hand < SPLITS['train']  # NUM_ANSWERS leaves some out.
  assert info['label_counts'] == dict(questions=SPLITS['train'],
                                      answerable=by_hand)
  assert info['prior_only'] is None
  vocab_file = os.path.join(d, tp.ANSWER_VOCAB_FILE)
  with open(vocab_file) as f:
    saved = json.load(f)
  with open(vocab_file, 'w') as f:
    json.dump(dict(saved, answers=['nobody said this']), f)
  _, info = tp.make_task_dataset(config, d, 'vqa', 'train', batch_size=B,
                                 train=True, seed=0)
  assert info['label_counts'] == dict(questions=SPLITS['train'],
                                      answerable=0)
  path = tasks.task_path(d, 'vqa', 'train')
  assert info['prior_only'] == (
      f'{path}: none of the {SPLITS["train"]} questions has an answer in the '
      'answer vocabulary (answer_vocab.json): the model can learn only the '
      'prior.')
  # VE: one label only.
  _write_task(d, 've', 'train', [dict(ex, label='neutral')
                                  for ex in _examples(d, 've', 'train')])
  _, info = tp.make_task_dataset(config, d, 've', 'train', batch_size=B,
                                 train=True, seed=0)
  assert info['label_counts'] == dict(examples=SPLITS['train'],
                                      labels={'neutral': SPLITS['train']})
  assert info['prior_only'] == (
      f'{tasks.task_path(d, "ve", "train")}: the {SPLITS["train"]} examples '
      f"have one label only ('neutral' x {SPLITS['train']}): the model can "
      'learn only the prior.')
  # Evaluation splits are not checked (a test split may be unlabelled).
  _, info = tp.make_task_dataset(config, d, 've', 'val', batch_size=B,
                                 train=False, seed=0)
  assert 'prior_only' not in info


def test_label_counts_skip_bad_records_and_rec_has_none():
  assert tp.label_counts([None, {'label': True}, {'label': False}],
                         'nlvr2') == dict(examples=2,
                                          labels={'True': 1, 'False': 1})
  assert tp.label_counts([{'answers': ['Red', 'red']}, {'answers': []}],
                         'vqa', ['red']) == dict(questions=2, answerable=1)
  assert tp.label_counts([{'target_box': [0, 0, 1, 1]}], 'rec') is None
  assert tp.prior_only_report(None, 'rec', 'x') is None


def test_missing_file(config, data_dir):
  with pytest.raises(FileNotFoundError, match='ve_nosuch.array_record'):
    tp.make_task_dataset(config, data_dir, 've', 'nosuch', batch_size=B,
                         train=False, seed=0)


def test_record_missing_field(config, data_dir, tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  examples = _examples(d, 've', 'val')
  del examples[3]['hypothesis']
  _write_task(d, 've', 'val', examples)
  ds, _ = tp.make_task_dataset(config, d, 've', 'val', batch_size=B,
                               train=False, seed=0)
  path = tasks.task_path(d, 've', 'val')
  with pytest.raises(records.RecordError) as e:
    ds[0]
  assert str(e.value).startswith(f"{path}: record 3: field 'hypothesis': "
                                 'missing')
  ds[1]  # The other batch is fine.
  # The vocabulary builder reads train with the same checks.
  examples = _examples(d, 'vqa', 'train')
  del examples[5]['answers']
  _write_task(d, 'vqa', 'train', examples)
  vocab_file = os.path.join(d, tp.ANSWER_VOCAB_FILE)
  if os.path.exists(vocab_file):  # Copied from data_dir: would be reused.
    os.remove(vocab_file)
  with pytest.raises(records.RecordError, match=r"vqa_train.array_record: "
                     r"record 5: field 'answers'"):
    tp.load_or_build_answer_vocab(d, NUM_ANSWERS)


def test_image_not_in_store(config, data_dir, tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  examples = _examples(d, 'nlvr2', 'val')
  examples[2]['image_ids'][1] = 'no-such-image'
  _write_task(d, 'nlvr2', 'val', examples)
  ds, _ = tp.make_task_dataset(config, d, 'nlvr2', 'val', batch_size=B,
                               train=False, seed=0)
  with pytest.raises(records.RecordError) as e:
    ds[0]
  message = str(e.value)
  path = tasks.task_path(d, 'nlvr2', 'val')
  assert message.startswith(f"{path}: record 2: field 'image_ids': ")
  assert (e.value.path, e.value.index, e.value.field) == (path, 2,
                                                          'image_ids')
  for part in (region_store.store_path(d), "'no-such-image'"):
    assert part in message


@pytest.mark.parametrize('task', ['nlvr2', 'rec'])
def test_text_truncation_counted(config, data_dir, task):
  short = config.copy_and_resolve_references()
  short.data.max_text_len = 8
  batches, _ = _eval_batches(short, data_dir, task)
  field = {'nlvr2': 'sentence', 'rec': 'expression'}[task]
  tok = load_tokenizer(None)
  examples = _examples(data_dir, task, 'val')
  long = sum(len(tok.encode(examples[i][field], 10_000).ids) > 8
             for i in _rows(batches, 'example_index'))
  assert 0 < long  # nlvr2 counts its sentence once, not per image.
  assert _stat(batches, 'captions_truncated') == long
  ids = _rows(batches, 'input_ids')
  assert ids.shape[-1] == 8 and (ids[..., -1] == tok.sep_id).sum() > 0


# ------------------------------------------------- data.on_error='skip'

GARBAGE = b'\xc1\xc1 not msgpack'  # 0xc1 is never used by msgpack.


def _skip(config, on_error='skip'):
  c = config.copy_and_resolve_references()
  c.data.on_error = on_error
  return c


def _bad_ve(directory, split, bad):
  """Writes ve `split` with examples bad as bad[index] says; returns the
  split's path."""
  examples = _examples(directory, 've', split)
  raws = []
  for i, ex in enumerate(examples):
    how = bad.get(i)
    if how == 'garbage':
      raws.append(GARBAGE)
      continue
    if how == 'hypothesis':
      del ex['hypothesis']
    elif how == 'label':
      ex['label'] = 'maybe'
    elif how == 'image_id':
      ex['image_id'] = 'no-such-image'
    elif how == 'region_feats':
      break_region_record(directory, ex['image_id'])
    raws.append(records.encode_record(ex))
  _write_task(directory, 've', split, raws)
  return tasks.task_path(directory, 've', split)


# Train record -> what is wrong with it; none is next to another.
BAD_TRAIN = {3: 'hypothesis', 10: 'label', 17: 'image_id', 25: 'garbage',
             40: 'region_feats'}


def _skipped(batches):
  return {k[len('skipped_'):]: _stat(batches, k)
          for k in batches[0]['stats'] if k.startswith('skipped_')
          and _stat(batches, k)}


def test_skip_in_training_feeds_the_next_good_example_and_counts(
    config, data_dir, tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  _bad_ve(d, 'train', BAD_TRAIN)
  ds, info = tp.make_task_dataset(_skip(config), d, 've', 'train',
                                  batch_size=B, train=True, seed=0)
  epoch = [ds[i] for i in range(SPLITS['train'] // B)]
  # One epoch: every slot fed, a bad record's slot by the record after it.
  fed = _rows(epoch, 'example_index')
  assert not set(fed) & set(BAD_TRAIN)
  assert collections.Counter(fed.tolist()) == collections.Counter(
      [i + 1 if i in BAD_TRAIN else i for i in range(SPLITS['train'])])
  assert _rows(epoch, 'valid').all()
  assert _stat(epoch, 'examples') == SPLITS['train']
  # Counted once each, by the field at fault (the region store's for a bad
  # region record; 'record' for bytes that do not decode).
  assert _skipped(epoch) == {'hypothesis': 1, 'label': 1, 'image_id': 1,
                             'record': 1, 'region_feats': 1}
  assert tuple(epoch[0]['stats']) == tp.stat_keys('ve', config)
  assert pipeline.skip_report(
      {k: _stat(epoch, k) for k in epoch[0]['stats']}) == (
          'Data: skipped 5 bad records for 48 examples (10.42%); by field: '
          'record 1, image_id 1, region_feats 1, hypothesis 1, label 1.')


def test_skip_in_evaluation_leaves_out_and_counts_each_once(config, data_dir,
                                                            tmp_path):
  """Bad eval examples are not replaced (that would count one twice in the
  metric): their rows are invalid, and each is counted once, even two in
  a row; the good ones are all there, with their own index."""
  d = _copy(data_dir, tmp_path / 'd')
  bad = {4: 'image_id', 5: 'hypothesis', 15: 'region_feats'}
  _bad_ve(d, 'val', bad)
  batches, info = _eval_batches(_skip(config), d, 've')
  index, valid = _rows(batches, 'example_index'), _rows(batches, 'valid')
  assert index.tolist() == list(range(SPLITS['val']))
  assert valid.tolist() == [i not in bad for i in range(SPLITS['val'])]
  assert _skipped(batches) == {'image_id': 1, 'hypothesis': 1,
                               'region_feats': 1}
  assert _stat(batches, 'examples') == SPLITS['val'] - len(bad)
  # Padding (batch 6: 18 rows) past a bad last record counts nothing more.
  ds, _ = tp.make_task_dataset(_skip(config), d, 've', 'val', batch_size=6,
                               train=False, seed=0)
  padded = [ds[i] for i in range(len(ds))]
  assert _rows(padded, 'valid').sum() == SPLITS['val'] - len(bad)
  assert _skipped(padded) == _skipped(batches)
  # The examples evaluation reads beside the batches: None where bad.
  examples = tp.read_task_examples(d, 've', 'val', on_error='skip')
  assert [i for i, ex in enumerate(examples) if ex is None] == [5]
  with pytest.raises(records.RecordError, match="record 5: field "
                     "'hypothesis'"):
    tp.read_task_examples(d, 've', 'val')
  items, skipped = tp.load_split(_skip(config), d, 've', 'val')
  assert [it['index'] for it in items] == [i for i in range(SPLITS['val'])
                                           if i not in bad]
  assert skipped == {'image_id': 1, 'hypothesis': 1, 'region_feats': 1}


def test_rec_target_box_outside_the_image_is_bad(config, data_dir, tmp_path):
  d = _copy(data_dir, tmp_path / 'd')
  examples = _examples(d, 'rec', 'val')
  examples[1]['target_box'] = [0.2, 0.1, 1.5, 0.4]
  examples[6]['target_box'] = [0.6, 0.1, 0.2, 0.4]
  _write_task(d, 'rec', 'val', examples)
  path = tasks.task_path(d, 'rec', 'val')
  ds, _ = tp.make_task_dataset(config, d, 'rec', 'val', batch_size=B,
                               train=False, seed=0)
  with pytest.raises(records.RecordError) as e:
    ds[0]
  assert str(e.value) == (f"{path}: record 1: field 'target_box': "
                          'coordinates outside [0, 1]')
  batches, _ = _eval_batches(_skip(config), d, 'rec')
  assert _skipped(batches) == {'target_box': 2}
  with pytest.raises(records.RecordError, match="record 6: field "
                     "'target_box': needs x1 <= x2 and y1 <= y2"):
    tp.validate_task_example(examples[6], 'rec', path=path, index=6)


def test_skip_reasons():
  assert tp.skip_reasons('vqa') == (
      'record', 'question_id', 'image_id', 'question', 'answers',
      'question_type', 'answer_type', 'region_feats', 'region_boxes',
      'region_tags', 'region_conf')
  assert tp.skip_reasons('nlvr2', pixels=True)[:4] == (
      'record', 'identifier', 'image_ids', 'sentence')
  assert tp.skip_reasons('nlvr2', pixels=True)[-1] == 'image'
  reasons = tp.skip_reasons('ve', pixels=True)
  assert tp.skip_reason(image_store.ImageError('a.png: image 1: ...'),
                        reasons) == 'image'
  assert tp.skip_reason(records.RecordError('f', 0, '*', 'x'),
                        reasons) == 'record'
  assert tp.skip_reason(records.RecordError('f', 0, 'extra', 'x'),
                        reasons) == 'record'
  assert tp.skip_reason(records.RecordError('f', 0, 'label', 'x'),
                        reasons) == 'label'
