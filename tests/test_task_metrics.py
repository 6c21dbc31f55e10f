"""Tests for the downstream metrics (cmal_jax/task_metrics.py). Every number
is worked out by hand in a comment next to it."""

import json

import numpy as np
import pytest

from cmal_jax import task_metrics as tm

# ---------------------------------------------------------------------------
# VQA normalisation: the official vqaEval.py behaviour.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('raw, expected', [
    ('Two', '2'),                 # lower-cased, then number word -> digit
    ('none', '0'),                # manualMap: 'none' is a count of 0
    ('ten', '10'),
    ('a dog', 'dog'),             # article removed
    ('The Red Car', 'red car'),
    ('a', ''),                    # an answer that is only an article
    ('an apple', 'apple'),
    ('dont', "don't"),            # contraction restored
    ('isnt', "isn't"),
    ("don't", "don't"),           # the apostrophe is not in the punct list
    ('yes.', 'yes'),              # a period not before a digit goes
    ('2.5', '2.5'),               # ... one before a digit stays
    ('1,000', '1000'),            # a digit comma anywhere: punct deleted
    ('1000', '1000'),
    ('black/white', 'black white'),    # punct touching no space -> space
    ('black / white', 'black white'),  # punct touching a space -> deleted
    ('red, white', 'red white'),
    ('red,white', 'red white'),
    ('yes!', 'yes'),
    ('\tyes\n', 'yes'),           # tabs / newlines to spaces, strip
    ('e.g.', 'eg'),
])
def test_normalize_vqa_answer(raw, expected):
  assert tm.normalize_vqa_answer(raw) == expected


def test_process_punctuation_digit_comma_deletes_all_marks():
  # With '1,000' in the text every mark is deleted, not spaced: official.
  assert tm.process_punctuation('1,000/2') == '10002'
  assert tm.process_punctuation('a/b') == 'a b'


# ---------------------------------------------------------------------------
# VQA accuracy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('k, expected', [
    # k of 10 annotators said 'yes'; leaving one out, the 9 others hold
    # k-1 matches (k subsets) or k matches (10-k subsets):
    (0, 0.0),
    (1, 0.3),   # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = 6/10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = 9/10
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
    (7, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_by_number_of_agreeing_annotators(k, expected):
  answers = ['yes'] * k + ['no'] * (10 - k)
  assert tm.vqa_accuracy('yes', answers) == pytest.approx(expected)


@pytest.mark.parametrize('prediction, answers, expected', [
    ('Two', ['2'] * 10, 1.0),
    ('two', ['2'] * 2 + ['3'] * 8, 0.6),
    ('a dog', ['dog'] * 3 + ['cat'] * 7, 0.9),
    ('dont', ["don't"] * 10, 1.0),
    ('dont', ["don't"] * 1 + ['no'] * 9, 0.3),
    ('yes.', ['yes'] * 10, 1.0),
    ('1,000', ['1000'] * 10, 1.0),
    # Ground truth gets process_punctuation when the answers differ:
    ('1000', ['1,000'] * 9 + ['1000'], 1.0),
    ('dog', ['cat'] * 10, 0.0),
])
def test_vqa_accuracy_normalises(prediction, answers, expected):
  assert tm.vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_mirrors_official_identical_answers_rule():
  # All ten identical: the official script leaves them unprocessed, so
  # '1,000' (ground truth) never equals the prediction's '1000'.
  assert tm.vqa_accuracy('1,000', ['1,000'] * 10) == 0.0
  # And the ground truth gets no lower-casing / number words at all:
  # 'two' stays 'two' and never equals the prediction's '2'.
  assert tm.vqa_accuracy('2', ['two'] * 3 + ['three'] * 7) == 0.0


def test_vqa_accuracy_without_answers_raises():
  with pytest.raises(ValueError, match='no answers'):
    tm.vqa_accuracy('yes', [])
  with pytest.raises(ValueError, match='question 1: .*no answers'):
    tm.vqa_accuracies(['yes', 'no'], [['yes'] * 10, []])


def test_vqa_accuracies():
  acc = tm.vqa_accuracies(
      ['yes', 'Two', 'blue'],
      [['yes'] * 10, ['2'] * 2 + ['3'] * 8, ['red'] * 10])
  np.testing.assert_allclose(acc, [1.0, 0.6, 0.0])
  assert acc.shape == (3,)
  with pytest.raises(ValueError, match='2 predictions but 1'):
    tm.vqa_accuracies(['a', 'b'], [['a']])


# ---------------------------------------------------------------------------
# Answer vocabulary and soft targets.
# ---------------------------------------------------------------------------


def test_build_answer_vocab_order_ties_and_cut():
  answers_list = [
      ['yes'] * 6 + ['no'] * 4,            # yes 6, no 4
      ['Two'] * 3 + ['2'] * 2 + ['3'],     # '2' 5 (merged), '3' 1
      # red 2, blue 2, pink 1; 'a' normalises to '' and is skipped.
      ['red', 'the red', 'pink', 'blue', 'Blue', 'a'],
  ]
  # Counts: yes 6, 2 5, no 4, then ties broken alphabetically (not by
  # first appearance): blue 2, red 2, then 3 1, pink 1.
  assert tm.build_answer_vocab(answers_list, 10) == [
      'yes', '2', 'no', 'blue', 'red', '3', 'pink']
  assert tm.build_answer_vocab(answers_list, 3) == ['yes', '2', 'no']
  # The cut falls inside a tie: '3' < 'pink' alphabetically.
  assert tm.build_answer_vocab(answers_list, 6)[-1] == '3'
  assert tm.build_answer_vocab(answers_list, 4) == ['yes', '2', 'no', 'blue']


def test_soft_targets_scores():
  answers = ['red'] * 7 + ['dark red'] * 2 + ['blue']
  vocab = ['blue', 'green', 'red', 'dark red']
  index = tm.vocab_index(vocab)
  indices, scores = tm.soft_targets(answers, index)
  # blue 1/3, red min(7/3, 1) = 1, dark red 2/3; indices ascending.
  np.testing.assert_array_equal(indices, [0, 2, 3])
  np.testing.assert_allclose(scores, [1 / 3, 1.0, 2 / 3], atol=1e-6)
  assert scores.dtype == np.float32 and indices.dtype == np.int32


def test_soft_targets_normalise_and_skip_out_of_vocab():
  index = tm.vocab_index(['2', 'yes'])
  # 'Two', 'two', '2' are one answer: 3/3 = 1.0; 'maybe' has no class.
  indices, scores = tm.soft_targets(['Two', 'two', '2', 'maybe'], index)
  np.testing.assert_array_equal(indices, [0])
  np.testing.assert_allclose(scores, [1.0])
  indices, scores = tm.soft_targets(['maybe'] * 10, index)
  assert indices.size == 0 and scores.size == 0


def test_soft_target_matrix_and_coverage():
  vocab = ['yes', 'no', 'red']
  targets, covered = tm.soft_target_matrix(
      [['yes'] * 8 + ['no'] * 2,      # yes 1.0, no 2/3
       ['purple'] * 10,               # nothing in the vocabulary
       ['red'],                       # red 1/3
       []],                           # unlabelled
      vocab)
  expected = np.array([[1.0, 2 / 3, 0.0],
                       [0.0, 0.0, 0.0],
                       [0.0, 0.0, 1 / 3],
                       [0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(targets, expected, atol=1e-6)
  assert targets.dtype == np.float32 and targets.shape == (4, 3)
  np.testing.assert_array_equal(covered, [True, False, True, False])
  assert int((~covered).sum()) == 2


def test_vqa_results_json_and_file(tmp_path):
  results = tm.vqa_results_json(np.array([5, 7], np.int64), ['yes', '2'])
  assert results == [{'question_id': 5, 'answer': 'yes'},
                     {'question_id': 7, 'answer': '2'}]
  assert type(results[0]['question_id']) is int
  path = tm.write_vqa_results(str(tmp_path / 'res.json'), [5, 7],
                              ['yes', '2'])
  with open(path) as f:
    assert json.load(f) == results
  with pytest.raises(ValueError):
    tm.vqa_results_json([1, 2], ['yes'])


# ---------------------------------------------------------------------------
# REC.
# ---------------------------------------------------------------------------


def test_box_iou_hand_made():
  a = [[0, 0, 2, 2],    # identical
       [0, 0, 1, 1],    # disjoint
       [0, 0, 1, 1],    # touching edge only
       [0, 0, 2, 2],    # shifted by half: inter 1*2 = 2, union 4+4-2 = 6
       [0, 0, 2, 2],    # b holds half of a: inter 2, union 4
       [0, 0, 2, 1],    # quarter overlap in x: inter 0.5, union 2+2-0.5
       [1, 1, 1, 1],    # two identical zero-area boxes: 0, not NaN
       [2, 2, 0, 0]]    # inverted (degenerate) box: area 0
  b = [[0, 0, 2, 2],
       [2, 2, 3, 3],
       [1, 0, 2, 1],
       [1, 0, 3, 2],
       [0, 0, 1, 2],
       [1.5, 0, 3.5, 1],
       [1, 1, 1, 1],
       [0, 0, 2, 2]]
  iou = tm.box_iou(np.array(a, np.float32), np.array(b, np.float32))
  np.testing.assert_allclose(
      iou, [1.0, 0.0, 0.0, 1 / 3, 0.5, 0.5 / 3.5, 0.0, 0.0], atol=1e-7)
  assert np.all(np.isfinite(iou))


def test_rec_accuracy_threshold_edge():
  gold = [[0, 0, 2, 1]] * 3
  pred = [[0, 0, 1, 1],        # IoU exactly 1/2: counts (>= 0.5)
          [0, 0, 0.99, 1],     # IoU 0.495: does not
          [0, 0, 2, 1]]        # IoU 1
  assert tm.rec_accuracy(pred, gold) == pytest.approx(2 / 3)
  assert tm.rec_accuracy(pred, gold, threshold=0.6) == pytest.approx(1 / 3)
  with pytest.raises(ValueError):
    tm.rec_accuracy(np.zeros((0, 4)), np.zeros((0, 4)))


# ---------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------


def test_recall_at_k_one_gold_with_ties():
  scores = np.array([[0.9, 0.1, 0.5, 0.3],    # gold 0 first: rank 0
                     [0.5, 0.5, 0.2, 0.1],    # gold 1 tied with 0: rank 1
                     [0.1, 0.2, 0.3, 0.4]])   # gold 0 last: rank 3
  gold = np.array([0, 1, 0])
  np.testing.assert_array_equal(tm.gold_ranks(scores, gold), [0, 1, 3])
  assert tm.recall_at_k(scores, gold, ks=(1, 2, 5)) == {
      'r1': pytest.approx(1 / 3), 'r2': pytest.approx(2 / 3), 'r5': 1.0}
  # A plain list of ints is the same thing.
  assert tm.recall_at_k(scores, [0, 1, 0], ks=(1,)) == {
      'r1': pytest.approx(1 / 3)}


def test_recall_at_k_constant_scores_get_no_free_hits():
  # Every item tied: the gold item ranks behind the 9 others.
  scores = np.zeros((4, 10))
  gold = [0, 3, 5, 9]
  np.testing.assert_array_equal(tm.gold_ranks(scores, gold), [9, 9, 9, 9])
  assert tm.recall_at_k(scores, gold) == {'r1': 0.0, 'r5': 0.0, 'r10': 1.0}


def test_recall_at_k_several_correct_captions_per_image():
  # Image -> text: image 0's captions are 0, 1, 2; image 1's are 3, 4, 5.
  scores = np.array([
      # Best gold is caption 1 (0.8); caption 3 (0.9) beats it: rank 1.
      [0.1, 0.8, 0.2, 0.9, 0.3, 0.0],
      # Golds 3 and 4 tie at 0.7 with wrong 0 and 1: both wrong ones go
      # ahead, the other gold does not: rank 2.
      [0.7, 0.7, 0.0, 0.7, 0.7, 0.1]])
  gold = [{0, 1, 2}, [3, 4, 5]]
  np.testing.assert_array_equal(tm.gold_ranks(scores, gold), [1, 2])
  assert tm.recall_at_k(scores, gold, ks=(1, 2, 3)) == {
      'r1': 0.0, 'r2': 0.5, 'r3': 1.0}


def test_recall_at_k_rejects_bad_input():
  scores = np.zeros((2, 3))
  with pytest.raises(ValueError, match='no correct item'):
    tm.recall_at_k(scores, [{0}, set()])
  with pytest.raises(ValueError, match='out of range'):
    tm.recall_at_k(scores, [0, 3])
  with pytest.raises(ValueError, match='gold entries'):
    tm.recall_at_k(scores, [0])
  with pytest.raises(ValueError, match='NaN'):
    tm.recall_at_k(np.array([[0.0, np.nan, 0.0]] * 2), [0, 1])


# ---------------------------------------------------------------------------
# Breakdowns.
# ---------------------------------------------------------------------------


def test_accuracy_by_type():
  values = [1.0, 0.0, 0.5, 0.3]
  types = ['what color', 'yes/no', 'what color', 'how many']
  # what color: (1.0 + 0.5) / 2 = 0.75.
  assert tm.accuracy_by_type(values, types) == {
      'how many': pytest.approx(0.3), 'what color': pytest.approx(0.75),
      'yes/no': 0.0}
  assert list(tm.accuracy_by_type(values, types)) == [
      'how many', 'what color', 'yes/no']
  with pytest.raises(ValueError):
    tm.accuracy_by_type([1.0], ['a', 'b'])
