"""The task sub-commands of python -m cmal_jax.convert (convert/tasks_cli.py):
an official downstream release + a converted region store -> a task split.

Each format's input is a hand-written sample of its official layout (VQA v2
questions + annotations JSON, SNLI-VE JSONL, NLVR2 JSON lines, a RefCOCO
refs pickle + COCO instances, Karpathy's dataset_coco.json); the region
store is converted from a bottom-up TSV by the `bottom_up` sub-command, as a
user would (and, once, an image folder by `coco_instances`). The last tests
read a converted folder with python -m cmal_jax.convert.inspect and with the
fine-tuning pipeline.
"""

import dataclasses
import json
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from cmal_jax.convert import cli as convert
from cmal_jax.convert import inspect as inspect_lib
from cmal_jax.convert.formats import FormatError, captions, read_task_split
from cmal_jax.data import task_pipeline
from cmal_jax.data import tasks
from cmal_testutil import F, TSV_IMAGE_SIZE, tsv_row, write_tsv
from configs import finetune

W, H = TSV_IMAGE_SIZE
# The images the store holds: COCO ids (VQA, RefCOCO, Karpathy), a
# Flickr30K id (SNLI-VE) and an NLVR2 image pair.
STORE_IDS = ('9', '25', '1000092795', 'train-10-0-img0', 'train-10-0-img1')
MISSING_ID = 999  # An image no store holds.


@pytest.fixture
def store_dir(tmp_path):
  """A region store (feature width F, the tiny config's) of STORE_IDS."""
  rng = np.random.default_rng(0)
  rows = [tsv_row(image_id, [[10, 20, 330, 260], [0, 0, W, H]],
                  rng.normal(size=(2, F)).astype(np.float32), [0, 1],
                  [0.9, 0.4]) for image_id in STORE_IDS]
  (tmp_path / 'vocab.txt').write_text('dog,puppy\ncat\n')
  out = tmp_path / 'data'
  convert.main(['bottom_up', f'--tsv={write_tsv(tmp_path / "f.tsv", rows)}',
                f'--vocab={tmp_path / "vocab.txt"}', f'--out={out}'])
  return str(out)


def _write_json(path, data):
  path.write_text(json.dumps(data))
  return str(path)


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


# ------------------------------------------------------------ the formats

def _answers(*words):
  return [{'answer': w, 'answer_confidence': 'yes', 'answer_id': i + 1}
          for i, w in enumerate(words)]


VQA_ANNOTATIONS = [
    {'question_id': 90, 'image_id': 9, 'answers': _answers('dog', 'Dog',
                                                           'puppy'),
     'multiple_choice_answer': 'dog', 'question_type': 'what animal is',
     'answer_type': 'other'},
    {'question_id': 250, 'image_id': 25, 'answers': _answers('2', 'two'),
     'multiple_choice_answer': '2', 'question_type': 'how many',
     'answer_type': 'number'}]


def _vqa_files(tmp_path, questions):
  q = _write_json(tmp_path / 'questions.json', {'questions': questions})
  a = _write_json(tmp_path / 'annotations.json',
                  {'annotations': VQA_ANNOTATIONS})
  return q, [f'--questions={q}', f'--annotations={a}']


def _snli_ve_files(tmp_path, lines):
  path = _write_jsonl(tmp_path / 'snli_ve_train.jsonl', lines)
  return path, [f'--input={path}']


def _nlvr2_files(tmp_path, lines):
  path = _write_jsonl(tmp_path / 'train.json', lines)
  return path, [f'--input={path}']


# COCO instances: RefCOCO's boxes and image sizes, and (with the image files)
# the input of the coco_instances sub-command.
REFCOCO_INSTANCES = {
    'images': [{'id': 9, 'width': 640, 'height': 480, 'file_name': '9.png'},
               {'id': 25, 'width': 500, 'height': 400,
                'file_name': '25.png'}],
    'annotations': [{'id': 7, 'image_id': 9, 'bbox': [64, 48, 320, 240],
                     'category_id': 1},
                    {'id': 8, 'image_id': 25, 'bbox': [0, 0, 250, 100],
                     'category_id': 1}],
    'categories': [{'id': 1, 'name': 'dog'}]}


def _refcoco_files(tmp_path, refs):
  path = tmp_path / 'refs(unc).p'
  path.write_bytes(pickle.dumps(refs))
  instances = _write_json(tmp_path / 'instances.json', REFCOCO_INSTANCES)
  return str(path), [f'--refs={path}', f'--instances={instances}']


def _karpathy_files(tmp_path, images):
  path = _write_json(tmp_path / 'dataset_coco.json',
                     {'images': images, 'dataset': 'coco'})
  return path, [f'--input={path}']


def _ref(ref_id, ann_id, image_id, split, *sentences):
  return {'ref_id': ref_id, 'ann_id': ann_id, 'image_id': image_id,
          'split': split, 'category_id': 1,
          'sentences': [{'sent': s, 'raw': s, 'tokens': s.split(),
                         'sent_id': 100 * ref_id + i}
                        for i, s in enumerate(sentences)]}


def _coco_image(cocoid, split, *captions):
  return {'filename': f'COCO_val2014_{cocoid:012d}.jpg', 'imgid': cocoid,
          'split': split, 'cocoid': cocoid,
          'sentences': [{'raw': c, 'tokens': c.split()} for c in captions]}


@dataclasses.dataclass(frozen=True)
class Case:
  """One format: its good records, what they convert to, and a bad record
  and a record on MISSING_ID with where their errors point."""
  command: str
  task: str
  write: object  # (tmp_path, records) -> (the file errors name, flags)
  input_name: str  # That file's name.
  records: list
  expected: list
  skipped: dict  # What the good records skip by standard practice.
  bad: object
  bad_where: str
  bad_field: str
  bad_reason: str
  missing: object
  missing_where: str
  missing_field: str


CASES = {c.command: c for c in [
    Case('vqa_v2', 'vqa', _vqa_files, 'questions.json',
         records=[{'question_id': 90, 'image_id': 9,
                   'question': 'What animal is this?'},
                  {'question_id': 250, 'image_id': 25,
                   'question': 'How many cats?'}],
         expected=[{'question_id': 90, 'image_id': '9',
                    'question': 'What animal is this?',
                    'answers': ['dog', 'Dog', 'puppy'],
                    'question_type': 'what animal is',
                    'answer_type': 'other'},
                   {'question_id': 250, 'image_id': '25',
                    'question': 'How many cats?', 'answers': ['2', 'two'],
                    'question_type': 'how many', 'answer_type': 'number'}],
         skipped={},
         bad={'question_id': 3, 'image_id': 9, 'question': 5},
         bad_where='question_id 3', bad_field='question',
         bad_reason='bad_type',
         missing={'question_id': 4, 'image_id': MISSING_ID,
                  'question': 'Why?'},
         missing_where='question_id 4', missing_field='image_id'),
    Case('snli_ve', 've', _snli_ve_files, 'snli_ve_train.jsonl',
         records=[{'Flickr30K_ID': '1000092795', 'sentence2': 'A man sits.',
                   'gold_label': 'entailment', 'pairID': 'p1'},
                  # No consensus: never an example, always counted.
                  {'Flickr30K_ID': '1000092795', 'sentence2': 'Two dogs.',
                   'gold_label': '-', 'pairID': 'p2'},
                  {'Flickr30K_ID': '1000092795', 'sentence2': 'Nobody.',
                   'gold_label': 'contradiction', 'pairID': 'p3'}],
         expected=[{'pair_id': 'p1', 'image_id': '1000092795',
                    'hypothesis': 'A man sits.', 'label': 'entailment'},
                   {'pair_id': 'p3', 'image_id': '1000092795',
                    'hypothesis': 'Nobody.', 'label': 'contradiction'}],
         skipped={'no_gold_label': 1},
         bad={'Flickr30K_ID': '1000092795', 'sentence2': 'Maybe.',
              'gold_label': 'maybe', 'pairID': 'p4'},
         bad_where='line 4', bad_field='gold_label', bad_reason='bad_label',
         missing={'Flickr30K_ID': str(MISSING_ID), 'sentence2': 'A cat.',
                  'gold_label': 'neutral', 'pairID': 'p5'},
         missing_where='line 4', missing_field='Flickr30K_ID'),
    Case('nlvr2', 'nlvr2', _nlvr2_files, 'train.json',
         records=[{'identifier': 'train-10-0-0', 'sentence': 'Two dogs.',
                   'label': 'True'},
                  {'identifier': 'train-10-0-1', 'sentence': 'No dog.',
                   'label': 'False'}],
         expected=[{'identifier': 'train-10-0-0',
                    'image_ids': ['train-10-0-img0', 'train-10-0-img1'],
                    'sentence': 'Two dogs.', 'label': True},
                   {'identifier': 'train-10-0-1',
                    'image_ids': ['train-10-0-img0', 'train-10-0-img1'],
                    'sentence': 'No dog.', 'label': False}],
         skipped={},
         bad={'identifier': 'train-10-0-2', 'sentence': 'Hm.',
              'label': 'Maybe'},
         bad_where='line 3', bad_field='label', bad_reason='bad_label',
         missing={'identifier': f'train-{MISSING_ID}-0-0', 'sentence': 'A.',
                  'label': 'True'},
         missing_where='line 3', missing_field='identifier'),
    Case('refcoco', 'rec', _refcoco_files, 'refs(unc).p',
         records=[_ref(1, 7, 9, 'train', 'left dog', 'the brown dog'),
                  _ref(2, 8, 25, 'val', 'top cat'),  # Another split.
                  _ref(3, 8, 25, 'train', 'top strip')],
         expected=[{'ref_id': 1, 'sent_id': 100, 'image_id': '9',
                    'expression': 'left dog',
                    'target_box': [0.1, 0.1, 0.6, 0.6]},
                   {'ref_id': 1, 'sent_id': 101, 'image_id': '9',
                    'expression': 'the brown dog',
                    'target_box': [0.1, 0.1, 0.6, 0.6]},
                   {'ref_id': 3, 'sent_id': 300, 'image_id': '25',
                    'expression': 'top strip',
                    'target_box': [0.0, 0.0, 0.5, 0.25]}],
         skipped={},
         bad=_ref(4, 55, 9, 'train', 'no such box'),
         bad_where='ref_id 4', bad_field='ann_id',
         bad_reason='unknown_annotation',
         missing=_ref(5, 7, MISSING_ID, 'train', 'elsewhere'),
         missing_where='ref_id 5', missing_field='image_id'),
    Case('karpathy', 'retrieval', _karpathy_files, 'dataset_coco.json',
         records=[_coco_image(9, 'train', 'A dog. ', 'A puppy.'),
                  _coco_image(1, 'test', 'Not in the store, not train.'),
                  _coco_image(25, 'restval', 'A cat.')],
         expected=[{'image_id': '9', 'captions': ['A dog.', 'A puppy.']},
                   {'image_id': '25', 'captions': ['A cat.']}],
         skipped={},
         bad=_coco_image(9, 'train'),  # No captions.
         bad_where='images[3]', bad_field='sentences',
         bad_reason='no_captions',
         missing=_coco_image(MISSING_ID, 'train', 'Gone.'),
         missing_where='images[3]', missing_field='cocoid'),
]}


def _run(case, tmp_path, store_dir, records, *flags):
  """Writes the case's input with `records`; returns cli.main's (written,
  skipped) of its sub-command on it."""
  _, input_flags = case.write(tmp_path, records)
  return convert.main([case.command, *input_flags, '--split=train',
                       f'--regions={store_dir}', *flags])


def _summary(case, store_dir, n, skipped):
  return f'Wrote {n} {case.task} train examples to {store_dir}; {skipped}'


# ------------------------------------------------------------ conversion

@pytest.mark.parametrize('command', sorted(CASES))
def test_converts_and_reports(command, tmp_path, store_dir, capsys):
  case = CASES[command]
  n, skipped = _run(case, tmp_path, store_dir, case.records)
  assert (n, skipped) == (len(case.expected), case.skipped)
  got = read_task_split(store_dir, case.task, 'train')
  if case.task == 'rec':  # Float boxes: compared apart, to float32.
    boxes = [ex.pop('target_box') for ex in got]
    np.testing.assert_allclose(
        boxes, [ex['target_box'] for ex in case.expected], rtol=1e-6)
    got = [dict(ex, target_box=want['target_box'])
           for ex, want in zip(got, case.expected)]
  assert got == case.expected
  counts = ', '.join(f'{r} {c}' for r, c in sorted(skipped.items()))
  said = f'skipped {sum(skipped.values())}: {counts}' if skipped else (
      'skipped none')
  out = capsys.readouterr().out.splitlines()
  assert _summary(case, store_dir, n, said) in out
  shown = {i for ex in case.expected
           for i in task_pipeline.image_ids_of(ex, case.task)}
  stored = len(captions.open_store(store_dir)[0].image_ids())
  assert f'Images: {len(shown)} of the {stored} in {store_dir}' in out


@pytest.mark.parametrize('command', sorted(CASES))
def test_bad_record_names_file_record_and_field(command, tmp_path,
                                                store_dir):
  case = CASES[command]
  with pytest.raises(FormatError) as e:
    _run(case, tmp_path, store_dir, case.records + [case.bad])
  path = tmp_path / case.input_name
  assert str(e.value).startswith(
      f"{path}: {case.bad_where}: field '{case.bad_field}': ")
  assert e.value.reason == case.bad_reason
  assert not os.path.exists(tasks.task_path(store_dir, case.task, 'train'))


@pytest.mark.parametrize('command', sorted(CASES))
def test_skip_bad_counts_the_bad_record(command, tmp_path, store_dir,
                                        capsys):
  case = CASES[command]
  n, skipped = _run(case, tmp_path, store_dir, case.records + [case.bad],
                    '--skip_bad')
  want = dict(case.skipped)
  want[case.bad_reason] = want.get(case.bad_reason, 0) + 1
  assert (n, skipped) == (len(case.expected), want)
  assert len(read_task_split(store_dir, case.task, 'train')) == n
  assert f'; skipped {sum(want.values())}: ' in capsys.readouterr().out


@pytest.mark.parametrize('command', sorted(CASES))
def test_image_missing_from_the_store(command, tmp_path, store_dir):
  case = CASES[command]
  records = case.records + [case.missing]
  with pytest.raises(FormatError, match=re.escape(
      f"{case.missing_where}: field '{case.missing_field}': image ")) as e:
    _run(case, tmp_path, store_dir, records)
  assert e.value.reason == 'unknown_image'
  n, skipped = _run(case, tmp_path, store_dir, records, '--skip_bad')
  assert n == len(case.expected)
  assert skipped == dict(case.skipped, unknown_image=1)


def test_vqa_answers_line_and_stale_vocabulary(tmp_path, store_dir, capsys):
  case = CASES['vqa_v2']
  stale = os.path.join(store_dir, task_pipeline.ANSWER_VOCAB_FILE)
  _write_json(tmp_path / 'stale', {})
  os.replace(tmp_path / 'stale', stale)
  _run(case, tmp_path, store_dir, case.records)
  out = capsys.readouterr().out.splitlines()
  # dog, Dog -> dog; puppy; 2, two -> 2: three after normalisation.
  assert out[2].startswith('Answers: 3 distinct; ')
  assert out[3].startswith(f'Removed {stale} ')
  assert not os.path.exists(stale)


def test_vqa_without_annotations_is_unlabelled(tmp_path, store_dir, capsys):
  case = CASES['vqa_v2']
  questions = _write_json(tmp_path / 'q.json', {'questions': case.records})
  n, _ = convert.main(['vqa_v2', f'--questions={questions}', '--split=test',
                       f'--regions={store_dir}'])
  assert n == 2
  got = read_task_split(store_dir, 'vqa', 'test')
  assert [(ex['answers'], ex['question_type']) for ex in got] == [([], '')] * 2
  assert capsys.readouterr().out.splitlines()[-1] == (
      'Answers: none (no --annotations: an unlabelled split)')


def test_karpathy_without_restval(tmp_path, store_dir):
  case = CASES['karpathy']
  _run(case, tmp_path, store_dir, case.records, '--without_restval')
  assert read_task_split(store_dir, 'retrieval', 'train') == case.expected[:1]


def test_out_elsewhere_is_refused(tmp_path, store_dir):
  case = CASES['snli_ve']
  with pytest.raises(ValueError, match='is not the --regions folder'):
    _run(case, tmp_path, store_dir, case.records, f'--out={tmp_path}/other')
  # The same folder by another name is fine.
  _run(case, tmp_path, store_dir, case.records, f'--out={store_dir}/.')


def test_no_examples_writes_nothing(tmp_path, store_dir):
  case = CASES['refcoco']
  path, flags = case.write(tmp_path, case.records)
  with pytest.raises(ValueError, match='no rec testA examples in the input '
                     r'\(skipped: none\), so nothing was written'):
    convert.main(['refcoco', *flags, '--split=testA',
                  f'--regions={store_dir}'])
  assert not os.path.exists(tasks.task_path(store_dir, 'rec', 'testA'))


def test_image_folder_as_the_visual_side(tmp_path):
  """RefCOCO on raw images: coco_instances turns the same instances.json
  and the image files into an image folder; refcoco writes beside it."""
  images = tmp_path / 'train2014'
  images.mkdir()
  for image in REFCOCO_INSTANCES['images']:
    Image.new('RGB', (image['width'], image['height'])).save(
        images / image['file_name'])
  case = CASES['refcoco']
  _, flags = case.write(tmp_path, case.records + [case.missing])
  folder = str(tmp_path / 'coco')
  convert.main(['coco_instances', f'--instances={tmp_path}/instances.json',
                f'--images={images}', f'--out={folder}'])
  with pytest.raises(FormatError, match="field 'image_id': image '999' "):
    convert.main(['refcoco', *flags, '--split=train', f'--regions={folder}'])
  n, skipped = convert.main(['refcoco', *flags, '--split=train',
                             f'--regions={folder}', '--skip_bad'])
  assert (n, skipped) == (3, {'unknown_image': 1})
  report = inspect_lib.inspect_path(folder)
  assert report['num_errors'] == 0
  assert [f['task'] for f in report['files'] if f['kind'] == 'task'] == [
      'rec']


# ------------------------------------------------------------ reading back

def _convert_all(tmp_path, store_dir):
  for case in CASES.values():
    _run(case, tmp_path, store_dir, case.records)


def test_inspect_reads_the_converted_folder_clean(tmp_path, store_dir,
                                                  capsys):
  _convert_all(tmp_path, store_dir)
  report = inspect_lib.inspect_path(store_dir)
  assert report['num_errors'] == 0
  by_task = {f['task']: f for f in report['files'] if f['kind'] == 'task'}
  assert sorted(by_task) == sorted(tasks.TASKS)
  for case in CASES.values():
    assert by_task[case.task]['records'] == len(case.expected)
  assert inspect_lib.main([store_dir]) == 0


def test_finetuning_pipeline_reads_the_converted_folder(tmp_path, store_dir):
  _convert_all(tmp_path, store_dir)
  config = finetune.get_config('ve,tiny')
  assert config.model.region_feat_dim == F
  ds, info = task_pipeline.make_task_dataset(
      config, store_dir, 've', 'train', batch_size=2, train=False, seed=0)
  assert info['num_examples'] == 2
  batch = ds[0]
  assert batch['label'].tolist() == [
      tasks.VE_LABELS.index('entailment'),
      tasks.VE_LABELS.index('contradiction')]
  assert batch['region_feats'].shape[-1] == F
  # VQA: the answer vocabulary is built from the converted vqa_train.
  _, info = task_pipeline.make_task_dataset(
      finetune.get_config('vqa,tiny'), store_dir, 'vqa', 'train',
      batch_size=2, train=False, seed=0)
  assert info['answer_vocab'] == ['2', 'dog', 'puppy']
