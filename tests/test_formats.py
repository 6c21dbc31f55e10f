"""Official downstream annotation formats -> task examples (formats/).

Every sample file is hand-written in its official format in tmp_path; the
tests assert the exact examples, the exact error messages and, with
on_error='skip', the exact skip counts.
"""

import json
import os
import pickle
import re

import pytest

from cmal_jax.convert import formats
from cmal_jax.convert.formats import FormatError
from cmal_jax.data.tasks import TASK_FIELDS


def _json(path, data):
  with open(path, 'w') as f:
    json.dump(data, f)
  return str(path)


def _jsonl(path, lines):
  """Writes dicts as JSON lines and str lines as they are (bad JSON)."""
  with open(path, 'w') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + '\n')
  return str(path)


def _exactly(message):
  """A pytest.raises `match` for exactly this message."""
  return '^' + re.escape(message) + '$'


# ---------------------------------------------------------------- VQA v2

def _question(qid, image_id, question):
  return {'question_id': qid, 'image_id': image_id, 'question': question}


def _annotation(qid, image_id, answers, qtype='how many', atype='number'):
  return {'question_id': qid, 'image_id': image_id,
          'answers': [{'answer': a, 'answer_confidence': 'yes',
                       'answer_id': i + 1} for i, a in enumerate(answers)],
          'multiple_choice_answer': answers[0] if answers else '',
          'question_type': qtype, 'answer_type': atype}


# An answer no vocabulary will hold: it must pass through untouched.
ODD_ANSWER = 'roughly two and a half zebras'


def _vqa_files(tmp_path, questions, annotations):
  q = _json(tmp_path / 'v2_OpenEnded_mscoco_val2014_questions.json',
            {'info': {}, 'task_type': 'Open-Ended', 'data_type': 'mscoco',
             'data_subtype': 'val2014', 'questions': questions})
  a = _json(tmp_path / 'v2_mscoco_val2014_annotations.json',
            {'info': {}, 'data_type': 'mscoco', 'data_subtype': 'val2014',
             'annotations': annotations})
  return q, a


def test_vqa_v2_joins_questions_and_annotations(tmp_path):
  q, a = _vqa_files(
      tmp_path,
      [_question(262148000, 262148, 'Where is he looking?'),
       _question(393225000, 393225, 'How many zebras?')],
      # Annotations in another order: the join is by question_id.
      [_annotation(393225000, 393225, ['2', '2', ODD_ANSWER]),
       _annotation(262148000, 262148, ['down', 'at table'], 'none of the '
                   'above', 'other')])
  examples, skipped = formats.read_vqa_v2(q, a)
  assert examples == [
      {'question_id': 262148000, 'image_id': '262148',
       'question': 'Where is he looking?', 'answers': ['down', 'at table'],
       'question_type': 'none of the above', 'answer_type': 'other'},
      {'question_id': 393225000, 'image_id': '393225',
       'question': 'How many zebras?', 'answers': ['2', '2', ODD_ANSWER],
       'question_type': 'how many', 'answer_type': 'number'}]
  assert skipped == {}


def test_vqa_v2_test_split_without_annotations(tmp_path):
  q = _json(tmp_path / 'v2_OpenEnded_mscoco_test2015_questions.json',
            {'questions': [_question(1, 7, 'Is it raining?')]})
  examples, skipped = formats.read_vqa_v2(q, image_ids={'7'})
  assert examples == [{'question_id': 1, 'image_id': '7',
                       'question': 'Is it raining?', 'answers': [],
                       'question_type': '', 'answer_type': ''}]
  assert skipped == {}


# (question, its annotation or None, message after the file name, reason).
# Image '404' is not in the region store {'1', '2', ..., '9'}.
_VQA_BAD = [
    ({'question_id': 11, 'image_id': 1}, _annotation(11, 1, ['a']),
     "Q: question_id 11: field 'question': missing", 'missing_field'),
    (_question(12, '2', 'Why?'), _annotation(12, 2, ['a']),
     "Q: question_id 12: field 'image_id': expected int, got str '2'",
     'bad_type'),
    (_question(13, 3, 'Why?'), _annotation(13, 3, []),
     "A: question_id 13: field 'answers': no answers for a question of a "
     "labelled split", 'no_answers'),
    (_question(14, 4, 'Why?'), None,
     "Q: question_id 14: field 'question_id': no annotation for this "
     "question in A", 'no_annotation'),
    (_question(15, 404, 'Why?'), _annotation(15, 404, ['a']),
     "Q: question_id 15: field 'image_id': image '404' is not in the region "
     "store", 'unknown_image'),
    (_question(16, 6, 'Why?'),
     dict(_annotation(16, 6, ['a']), answers=[{'answer_id': 1}]),
     "A: question_id 16: field 'answers[0].answer': missing",
     'missing_field'),
    (_question(17, 7, 'Why?'), dict(_annotation(17, 7, ['a']),
                                    question_type=None),
     "A: question_id 17: field 'question_type': expected str, got "
     "NoneType None", 'bad_type'),
    ({'image_id': 8, 'question': 'Why?'}, None,
     "Q: questions[1]: field 'question_id': missing", 'missing_field'),
]
_KNOWN_IMAGES = {str(i) for i in range(1, 10)}


def _vqa_bad_files(tmp_path, bad):
  questions = [_question(10, 1, 'Is it good?')]
  annotations = [_annotation(10, 1, ['yes'])]
  for question, annotation, _, _ in bad:
    questions.append(question)
    if annotation is not None:
      annotations.append(annotation)
  return _vqa_files(tmp_path, questions, annotations)


_GOOD_VQA = {'question_id': 10, 'image_id': '1', 'question': 'Is it good?',
             'answers': ['yes'], 'question_type': 'how many',
             'answer_type': 'number'}


@pytest.mark.parametrize('case', range(len(_VQA_BAD)))
def test_vqa_v2_bad_input_names_file_and_question(tmp_path, case):
  q, a = _vqa_bad_files(tmp_path, [_VQA_BAD[case]])
  message = _VQA_BAD[case][2].replace('Q: ', q + ': ', 1).replace(
      'A: ', a + ': ', 1).replace('in A', 'in ' + a)
  with pytest.raises(FormatError, match=_exactly(message)) as e:
    formats.read_vqa_v2(q, a, image_ids=_KNOWN_IMAGES)
  assert e.value.reason == _VQA_BAD[case][3]


def test_vqa_v2_skip_counts_every_bad_question(tmp_path):
  q, a = _vqa_bad_files(tmp_path, _VQA_BAD)
  examples, skipped = formats.read_vqa_v2(q, a, image_ids=_KNOWN_IMAGES,
                                          on_error='skip')
  assert examples == [_GOOD_VQA]
  assert skipped == {'missing_field': 3, 'bad_type': 2, 'no_answers': 1,
                     'no_annotation': 1, 'unknown_image': 1}


def test_vqa_v2_duplicate_annotation(tmp_path):
  q, a = _vqa_files(tmp_path, [_question(10, 1, 'Is it good?')],
                    [_annotation(10, 1, ['yes']), _annotation(10, 1, ['no'])])
  with pytest.raises(FormatError, match=_exactly(
      f"{a}: question_id 10: field 'question_id': repeats an earlier "
      f"annotation's id")):
    formats.read_vqa_v2(q, a)
  # Skipping keeps the first annotation and counts the second.
  assert formats.read_vqa_v2(q, a, on_error='skip') == (
      [_GOOD_VQA], {'duplicate_id': 1})


def test_vqa_v2_bad_files(tmp_path):
  q, _ = _vqa_files(tmp_path, [_question(10, 1, 'Is it good?')], [])
  missing = str(tmp_path / 'nope_annotations.json')
  with pytest.raises(FileNotFoundError, match=_exactly(
      f'{missing}: no such file (VQA v2 annotations JSON)')):
    formats.read_vqa_v2(q, missing)
  broken = tmp_path / 'broken.json'
  broken.write_text('{"questions": [')
  # A whole file that is not JSON raises even when skipping.
  with pytest.raises(FormatError, match='^' + re.escape(
      f'{broken}: file: malformed JSON: ')):
    formats.read_vqa_v2(str(broken), on_error='skip')
  no_list = _json(tmp_path / 'no_list.json', {'annotations': []})
  with pytest.raises(FormatError, match=_exactly(
      f"{no_list}: top level: field 'questions': missing")):
    formats.read_vqa_v2(no_list)
  with pytest.raises(ValueError, match=_exactly(
      "on_error='ignore'; expected one of ['raise', 'skip']")):
    formats.read_vqa_v2(q, on_error='ignore')


# ---------------------------------------------------------------- SNLI-VE

def _ve_line(pair_id, image, hypothesis, label, **extra):
  line = {'Flickr30K_ID': image, 'sentence1': 'Two dogs run.',
          'sentence2': hypothesis, 'gold_label': label,
          'annotator_labels': [label], 'captionID': f'{image}.jpg#0',
          'pairID': pair_id}
  line.update(extra)
  return line


def test_snli_ve_reads_pairs_and_skips_no_gold_label(tmp_path):
  no_pair_id = _ve_line(None, '20', 'Cats sleep.', 'contradiction')
  del no_pair_id['pairID']
  path = _jsonl(tmp_path / 'snli_ve_dev.jsonl', [
      _ve_line('p1', '10', 'Animals run.', 'entailment'),
      _ve_line('p2', '10', 'The dogs are tired.', '-'),
      '',  # A blank line holds no record.
      _ve_line('p3', 11, 'Dogs race.', 'neutral'),
      no_pair_id])
  examples, skipped = formats.read_snli_ve(path, image_ids={'10', '11', '20'})
  assert examples == [
      {'pair_id': 'p1', 'image_id': '10', 'hypothesis': 'Animals run.',
       'label': 'entailment'},
      {'pair_id': 'p3', 'image_id': '11', 'hypothesis': 'Dogs race.',
       'label': 'neutral'},
      {'pair_id': 'snli_ve_dev.jsonl:5', 'image_id': '20',
       'hypothesis': 'Cats sleep.', 'label': 'contradiction'}]
  # '-' is skipped and counted even when bad input raises.
  assert skipped == {'no_gold_label': 1}


# (line, message after `path: line N: `, reason); line 1 is a good pair.
_VE_BAD = [
    ('{"Flickr30K_ID": "10", ', 'malformed JSON: ', 'malformed_json'),
    ('["not", "an", "object"]', 'expected a JSON object, got list',
     'bad_type'),
    (_ve_line('b1', '10', 'Hm.', 'maybe'),
     "field 'gold_label': 'maybe' is not one of ['entailment', 'neutral', "
     "'contradiction']", 'bad_label'),
    ({'Flickr30K_ID': '10', 'gold_label': 'neutral'},
     "field 'sentence2': missing", 'missing_field'),
    (_ve_line('b2', 10.5, 'Hm.', 'neutral'),
     "field 'Flickr30K_ID': expected str or int, got float 10.5",
     'bad_type'),
    (_ve_line(7, '10', 'Hm.', 'neutral'),
     "field 'pairID': expected str, got int 7", 'bad_type'),
    (_ve_line('b3', '404', 'Hm.', 'neutral'),
     "field 'Flickr30K_ID': image '404' is not in the region store",
     'unknown_image'),
]
_GOOD_VE = _ve_line('ok', '10', 'Dogs.', 'entailment')


@pytest.mark.parametrize('case', range(len(_VE_BAD)))
def test_snli_ve_bad_input_names_file_and_line(tmp_path, case):
  line, message, reason = _VE_BAD[case]
  path = _jsonl(tmp_path / 'snli_ve_dev.jsonl', [_GOOD_VE, line])
  prefix = f'{path}: line 2: '
  match = ('^' + re.escape(prefix + message) if reason == 'malformed_json'
           else _exactly(prefix + message))
  with pytest.raises(FormatError, match=match) as e:
    formats.read_snli_ve(path, image_ids={'10'})
  assert (e.value.path, e.value.where, e.value.reason) == (
      path, 'line 2', reason)


def test_snli_ve_skip_counts(tmp_path):
  lines = [_GOOD_VE] + [line for line, _, _ in _VE_BAD] + [
      _ve_line('x', '10', 'Hm.', '-')]
  path = _jsonl(tmp_path / 'snli_ve_dev.jsonl', lines)
  examples, skipped = formats.read_snli_ve(path, image_ids={'10'},
                                           on_error='skip')
  assert examples == [{'pair_id': 'ok', 'image_id': '10',
                       'hypothesis': 'Dogs.', 'label': 'entailment'}]
  assert skipped == {'malformed_json': 1, 'bad_type': 3, 'bad_label': 1,
                     'missing_field': 1, 'unknown_image': 1,
                     'no_gold_label': 1}


def test_snli_ve_missing_file(tmp_path):
  path = str(tmp_path / 'snli_ve_test.jsonl')
  with pytest.raises(FileNotFoundError, match=_exactly(
      f'{path}: no such file (SNLI-VE JSONL)')):
    formats.read_snli_ve(path)


# ---------------------------------------------------------------- NLVR2

def _nlvr2_line(identifier, sentence, label):
  return {'validation': {}, 'sentence': sentence, 'left_url': 'http://x',
          'writer': '103', 'label': label, 'right_url': 'http://y',
          'synset': 'dog', 'query': 'dogs', 'identifier': identifier,
          'extra_validations': {}}


def test_nlvr2_identifier_gives_both_images(tmp_path):
  path = _jsonl(tmp_path / 'dev.json', [
      _nlvr2_line('dev-850-0-0', 'There are two dogs.', 'True'),
      _nlvr2_line('test1-0-1-3', 'No dog is left.', 'False'),
      # JSON booleans are accepted too; a hyphen in the split is kept.
      _nlvr2_line('balanced-dev-12-3-1', 'One dog.', True)])
  examples, skipped = formats.read_nlvr2(path)
  assert examples == [
      {'identifier': 'dev-850-0-0',
       'image_ids': ['dev-850-0-img0', 'dev-850-0-img1'],
       'sentence': 'There are two dogs.', 'label': True},
      {'identifier': 'test1-0-1-3',
       'image_ids': ['test1-0-1-img0', 'test1-0-1-img1'],
       'sentence': 'No dog is left.', 'label': False},
      {'identifier': 'balanced-dev-12-3-1',
       'image_ids': ['balanced-dev-12-3-img0', 'balanced-dev-12-3-img1'],
       'sentence': 'One dog.', 'label': True}]
  assert skipped == {}


_NLVR2_BAD = [
    ('not json at all', 'malformed JSON: ', 'malformed_json'),
    (_nlvr2_line('dev-850-0', 'S.', 'True'),
     "field 'identifier': 'dev-850-0' is not "
     "split-set_id-pair_id-sentence_id", 'bad_identifier'),
    (_nlvr2_line('dev-850-x-0', 'S.', 'True'),
     "field 'identifier': 'dev-850-x-0' is not "
     "split-set_id-pair_id-sentence_id", 'bad_identifier'),
    (_nlvr2_line('dev-851-0-0', 'S.', 'yes'),
     "field 'label': 'yes' is not one of ['True', 'False']", 'bad_label'),
    (_nlvr2_line('dev-852-0-0', 'S.', 1),
     "field 'label': expected str or bool, got int 1", 'bad_type'),
    ({'identifier': 'dev-853-0-0', 'label': 'True'},
     "field 'sentence': missing", 'missing_field'),
    # The right image of dev-9-0 is not in the store.
    (_nlvr2_line('dev-9-0-0', 'S.', 'True'),
     "field 'identifier': image 'dev-9-0-img1' is not in the region store",
     'unknown_image'),
]
_NLVR2_IMAGES = {'dev-1-0-img0', 'dev-1-0-img1', 'dev-9-0-img0'} | {
    f'dev-{s}-0-img{i}' for s in range(850, 854) for i in (0, 1)}


@pytest.mark.parametrize('case', range(len(_NLVR2_BAD)))
def test_nlvr2_bad_input_names_file_and_line(tmp_path, case):
  line, message, reason = _NLVR2_BAD[case]
  path = _jsonl(tmp_path / 'dev.json',
                [_nlvr2_line('dev-1-0-0', 'S.', 'True'), line])
  prefix = f'{path}: line 2: '
  match = ('^' + re.escape(prefix + message) if reason == 'malformed_json'
           else _exactly(prefix + message))
  with pytest.raises(FormatError, match=match) as e:
    formats.read_nlvr2(path, image_ids=_NLVR2_IMAGES)
  assert e.value.reason == reason


def test_nlvr2_skip_counts(tmp_path):
  path = _jsonl(tmp_path / 'dev.json',
                [_nlvr2_line('dev-1-0-0', 'S.', 'True')]
                + [line for line, _, _ in _NLVR2_BAD])
  examples, skipped = formats.read_nlvr2(path, image_ids=_NLVR2_IMAGES,
                                         on_error='skip')
  assert examples == [{'identifier': 'dev-1-0-0',
                       'image_ids': ['dev-1-0-img0', 'dev-1-0-img1'],
                       'sentence': 'S.', 'label': True}]
  assert skipped == {'malformed_json': 1, 'bad_identifier': 2,
                     'bad_label': 1, 'bad_type': 1, 'missing_field': 1,
                     'unknown_image': 1}


# ---------------------------------------------------------------- RefCOCO

def _ref(ref_id, ann_id, image_id, split, sentences):
  return {'ref_id': ref_id, 'ann_id': ann_id, 'image_id': image_id,
          'split': split, 'file_name': f'COCO_train2014_{image_id}_{ann_id}',
          'category_id': 1,
          'sentences': [{'sent': s, 'raw': s.capitalize(),
                         'tokens': s.split(), 'sent_id': sent_id}
                        for sent_id, s in sentences],
          'sent_ids': [sent_id for sent_id, _ in sentences]}


def _instances():
  return {
      'images': [{'id': 1, 'width': 640, 'height': 480,
                  'file_name': 'COCO_train2014_000000000001.jpg'},
                 {'id': 2, 'width': 500, 'height': 400,
                  'file_name': 'COCO_train2014_000000000002.jpg'},
                 {'id': 5, 'width': 0, 'height': 400,
                  'file_name': 'COCO_train2014_000000000005.jpg'}],
      'annotations': [
          {'id': 101, 'image_id': 1, 'bbox': [64.0, 48.0, 320.0, 240.0],
           'category_id': 1, 'area': 76800.0, 'iscrowd': 0},
          # Overhangs the 500-pixel-wide image by 0.5 px: clipped to 1.
          {'id': 201, 'image_id': 2, 'bbox': [250, 0, 250.5, 100],
           'category_id': 1, 'area': 25050.0, 'iscrowd': 0},
          {'id': 202, 'image_id': 2, 'bbox': [0, 0, 600, 100],
           'category_id': 1, 'area': 60000.0, 'iscrowd': 0},
          {'id': 203, 'image_id': 2, 'bbox': [0, 0, 'wide', 100],
           'category_id': 1, 'area': 0.0, 'iscrowd': 0},
          {'id': 501, 'image_id': 5, 'bbox': [0, 0, 1, 1],
           'category_id': 1, 'area': 1.0, 'iscrowd': 0}],
      'categories': [{'id': 1, 'name': 'person', 'supercategory': 'person'}]}


def _refcoco_files(tmp_path, refs, instances=None):
  refs_path = str(tmp_path / 'refs(unc).p')
  with open(refs_path, 'wb') as f:
    pickle.dump(refs, f)
  return refs_path, _json(tmp_path / 'instances.json',
                          instances or _instances())


def test_refcoco_one_example_per_sentence_with_normalised_box(tmp_path):
  refs, instances = _refcoco_files(tmp_path, [
      _ref(0, 101, 1, 'testA', [(10, 'man in red'), (11, 'left guy')]),
      _ref(1, 201, 2, 'train', [(12, 'right one')]),  # Another split.
      _ref(2, 201, 2, 'testA', [(13, 'right one')])])
  examples, skipped = formats.read_refcoco(refs, instances, split='testA')
  # [64, 48, 320, 240] in 640x480 -> x1 0.1, y1 0.1, x2 384/640, y2 288/480.
  box = [0.1, 0.1, 0.6, 0.6]
  assert examples == [
      {'ref_id': 0, 'sent_id': 10, 'image_id': '1',
       'expression': 'man in red', 'target_box': box},
      {'ref_id': 0, 'sent_id': 11, 'image_id': '1',
       'expression': 'left guy', 'target_box': box},
      {'ref_id': 2, 'sent_id': 13, 'image_id': '2',
       'expression': 'right one', 'target_box': [0.5, 0.0, 1.0, 0.25]}]
  assert skipped == {}
  train, _ = formats.read_refcoco(refs, instances, split='train')
  assert [(e['ref_id'], e['sent_id']) for e in train] == [(1, 12)]


# (ref, message after the file name, reason); R: refs, I: instances.
_REF_BAD = [
    (_ref(20, 999, 1, 'val', [(1, 'x')]),
     "R: ref_id 20: field 'ann_id': annotation 999 is not in I",
     'unknown_annotation'),
    (_ref(21, 101, 404, 'val', [(1, 'x')]),
     "R: ref_id 21: field 'image_id': image '404' is not in the region "
     "store", 'unknown_image'),
    (_ref(22, 101, 1, 'val', []),
     "R: ref_id 22: field 'sentences': no referring sentences",
     'no_sentences'),
    (dict(_ref(23, 101, 1, 'val', [(1, 'x')]), ann_id='101'),
     "R: ref_id 23: field 'ann_id': expected int, got str '101'",
     'bad_type'),
    ({'ann_id': 101, 'image_id': 1, 'split': 'val', 'sentences': []},
     "R: refs[5]: field 'ref_id': missing", 'missing_field'),
    (_ref(25, 202, 2, 'val', [(1, 'x')]),
     "I: annotation id 202: field 'bbox': [0, 0, 600, 100] is not a box "
     "inside the 500x400 image 2", 'bad_box'),
    (_ref(26, 203, 2, 'val', [(1, 'x')]),
     "I: annotation id 203: field 'bbox': expected [x, y, w, h] numbers, "
     "got [0, 0, 'wide', 100]", 'bad_box'),
    (_ref(27, 501, 5, 'val', [(1, 'x')]),
     "I: image id 5: field 'width': expected a positive size, got 0",
     'bad_image_size'),
    (dict(_ref(28, 101, 1, 'val', [(1, 'x')]),
          sentences=[{'sent': 'x', 'sent_id': 1}, {'sent_id': 2}]),
     "R: ref_id 28: field 'sentences[1].sent': missing", 'missing_field'),
]


@pytest.mark.parametrize('case', range(len(_REF_BAD)))
def test_refcoco_bad_input_names_file_and_ref(tmp_path, case):
  ref, message, reason = _REF_BAD[case]
  good = _ref(0, 101, 1, 'val', [(0, 'man')])
  # The bad ref is refs[5]: padded with refs of another split.
  others = [_ref(90 + i, 999, 404, 'train', [(9, 'x')]) for i in range(4)]
  refs, instances = _refcoco_files(tmp_path, [good] + others + [ref])
  message = message.replace('R: ', refs + ': ').replace(
      'I: ', instances + ': ').replace('in I', 'in ' + instances)
  with pytest.raises(FormatError, match=_exactly(message)) as e:
    formats.read_refcoco(refs, instances, split='val',
                         image_ids={'1', '2', '5'})
  assert e.value.reason == reason


def test_refcoco_skip_counts(tmp_path):
  refs, instances = _refcoco_files(
      tmp_path, [_ref(0, 101, 1, 'val', [(0, 'man')])]
      + [ref for ref, _, _ in _REF_BAD])
  examples, skipped = formats.read_refcoco(
      refs, instances, split='val', image_ids={'1', '2', '5'},
      on_error='skip')
  assert examples == [{'ref_id': 0, 'sent_id': 0, 'image_id': '1',
                       'expression': 'man',
                       'target_box': [0.1, 0.1, 0.6, 0.6]}]
  assert skipped == {'unknown_annotation': 1, 'unknown_image': 1,
                     'no_sentences': 1, 'bad_type': 1, 'missing_field': 2,
                     'bad_box': 2, 'bad_image_size': 1}


def test_refcoco_bad_files(tmp_path):
  refs, instances = _refcoco_files(tmp_path, [])
  with pytest.raises(ValueError, match=_exactly(
      "split='testC'; RefCOCO splits are ['train', 'val', 'test', 'testA', "
      "'testB']")):
    formats.read_refcoco(refs, instances, split='testC')
  missing = str(tmp_path / 'refs(umd).p')
  with pytest.raises(FileNotFoundError, match=_exactly(
      f'{missing}: no such file (RefCOCO refs pickle)')):
    formats.read_refcoco(missing, instances, split='val')
  not_pickle = tmp_path / 'refs(google).p'
  not_pickle.write_bytes(b'\x80\x04\x95')  # A truncated pickle.
  with pytest.raises(FormatError, match='^' + re.escape(
      f'{not_pickle}: file: not a readable pickle: ')):
    formats.read_refcoco(str(not_pickle), instances, split='val',
                         on_error='skip')


# ---------------------------------------------------------------- Karpathy

def _karpathy_image(split, captions, filename, cocoid=None, imgid=0):
  image = {'filepath': 'val2014', 'sentids': list(range(len(captions))),
           'filename': filename, 'imgid': imgid, 'split': split,
           'sentences': [{'tokens': c.lower().split(), 'raw': c,
                          'imgid': imgid, 'sentid': i}
                         for i, c in enumerate(captions)]}
  if cocoid is not None:
    image['cocoid'] = cocoid
  return image


def _coco_karpathy(tmp_path):
  return _json(tmp_path / 'dataset_coco.json', {'dataset': 'coco', 'images': [
      _karpathy_image('train', ['A cat. ', 'A pet.'],
                      'COCO_train2014_000000000009.jpg', 9),
      _karpathy_image('restval', ['A dog.'],
                      'COCO_val2014_000000000042.jpg', 42),
      _karpathy_image('test', ['A bus.'], 'COCO_val2014_000000000073.jpg',
                      73)]})


def test_karpathy_restval_is_train_by_default(tmp_path):
  path = _coco_karpathy(tmp_path)
  cat = {'image_id': '9', 'captions': ['A cat.', 'A pet.']}
  dog = {'image_id': '42', 'captions': ['A dog.']}
  assert formats.read_karpathy(path, split='train') == ([cat, dog], {})
  assert formats.read_karpathy(path, split='train',
                               restval_as_train=False) == ([cat], {})
  assert formats.read_karpathy(path, split='restval') == ([dog], {})
  assert formats.read_karpathy(path, split='test') == (
      [{'image_id': '73', 'captions': ['A bus.']}], {})


def test_karpathy_flickr30k_ids_from_file_names(tmp_path):
  path = _json(tmp_path / 'dataset_flickr30k.json',
               {'dataset': 'flickr30k', 'images': [
                   _karpathy_image('val', ['Two men.', 'Men talk.'],
                                   '1000092795.jpg')]})
  assert formats.read_karpathy(path, split='val', image_ids={'1000092795'}) \
      == ([{'image_id': '1000092795', 'captions': ['Two men.', 'Men talk.']}],
          {})


_KARPATHY_BAD = [
    (_karpathy_image('dev', ['x'], 'a.jpg', 1),
     "field 'split': 'dev' is not one of ['train', 'val', 'test', "
     "'restval']", 'bad_label'),
    (_karpathy_image('test', [], 'b.jpg', 2),
     "field 'sentences': no captions", 'no_captions'),
    (_karpathy_image('test', ['x'], 'c.jpg', '3'),
     "field 'cocoid': expected int, got str '3'", 'bad_type'),
    (_karpathy_image('test', ['x'], 'd.jpg', 404),
     "field 'cocoid': image '404' is not in the region store",
     'unknown_image'),
    ({'split': 'test', 'sentences': [{'raw': 'x'}]},
     "field 'filename': missing", 'missing_field'),
    (dict(_karpathy_image('test', ['x'], 'f.jpg', 6),
          sentences=[{'raw': 'ok'}, {'raw': 7}]),
     "field 'sentences[1].raw': expected str, got int 7", 'bad_type'),
]


@pytest.mark.parametrize('case', range(len(_KARPATHY_BAD)))
def test_karpathy_bad_input_names_file_and_record(tmp_path, case):
  image, message, reason = _KARPATHY_BAD[case]
  path = _json(tmp_path / 'dataset_coco.json', {'images': [
      _karpathy_image('test', ['ok'], 'ok.jpg', 1), image]})
  with pytest.raises(FormatError, match=_exactly(
      f'{path}: images[1]: {message}')) as e:
    formats.read_karpathy(path, split='test', image_ids={'1', '2', '3', '6'})
  assert e.value.reason == reason


def test_karpathy_skip_counts(tmp_path):
  path = _json(tmp_path / 'dataset_coco.json', {'images': [
      _karpathy_image('test', ['ok'], 'ok.jpg', 1)]
      + [image for image, _, _ in _KARPATHY_BAD]})
  assert formats.read_karpathy(path, split='test',
                               image_ids={'1', '2', '3', '6'},
                               on_error='skip') == (
      [{'image_id': '1', 'captions': ['ok']}],
      {'bad_label': 1, 'no_captions': 1, 'bad_type': 2, 'unknown_image': 1,
       'missing_field': 1})


# ---------------------------------------------------------------- storage

def test_task_split_round_trip(tmp_path):
  directory = str(tmp_path / 'tasks')
  q = _json(tmp_path / 'q.json', {'questions': [
      _question(1, 7, 'Is it raining?'), _question(2, 8, 'What color?')]})
  a = _json(tmp_path / 'a.json', {'annotations': [
      _annotation(1, 7, ['yes'] * 10), _annotation(2, 8, [ODD_ANSWER])]})
  splits = {
      'vqa': formats.read_vqa_v2(q, a)[0],
      'vqa_test': formats.read_vqa_v2(q)[0],  # Empty answer lists.
      'nlvr2': [{'identifier': 'dev-850-0-0',
                 'image_ids': ['dev-850-0-img0', 'dev-850-0-img1'],
                 'sentence': 'Two dogs.', 'label': False}],
      'rec': [{'ref_id': 0, 'sent_id': 3, 'image_id': '1',
               'expression': 'man', 'target_box': [0.1, 0.2, 0.6, 0.7]}],
  }
  for name, examples in splits.items():
    task, split = (name.split('_') + ['val'])[:2]
    path = formats.write_task_split(directory, task, split, examples)
    assert path == os.path.join(directory, f'{task}_{split}.array_record')
    assert formats.read_task_split(directory, task, split) == examples
  assert splits['vqa_test'][0]['answers'] == []


def test_task_split_errors(tmp_path):
  directory = str(tmp_path)
  bad = {f: 'x' for f in TASK_FIELDS['ve'] if f != 'label'}
  with pytest.raises(ValueError, match=_exactly(
      f"{directory}/ve_dev.array_record: example 1: missing ve fields "
      f"['label']")):
    formats.write_task_split(directory, 've', 'dev',
                             [dict(bad, label='neutral'), bad])
  assert not os.path.exists(f'{directory}/ve_dev.array_record')
  # A file of another task's records fails on read, naming the field.
  formats.write_task_split(directory, 'retrieval', 'val',
                           [{'image_id': '1', 'captions': ['a']}])
  os.rename(f'{directory}/retrieval_val.array_record',
            f'{directory}/ve_val.array_record')
  with pytest.raises(ValueError, match=_exactly(
      f"{directory}/ve_val.array_record: record 0: field 'pair_id': "
      f"missing")):
    formats.read_task_split(directory, 've', 'val')
  with pytest.raises(FileNotFoundError, match='ve_test.array_record'):
    formats.read_task_split(directory, 've', 'test')
