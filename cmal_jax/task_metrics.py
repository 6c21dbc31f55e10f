"""Downstream metrics (docs/design.md §2 "Downstream heads"): VQA accuracy and
answer vocabulary, REC accuracy, retrieval recall@k, per-type breakdowns.

Pure numpy / Python, no JAX: these run on the host over gathered predictions.

The VQA part follows the official evaluation script, vqaEval.py of the VQA
v2 API (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation,
Python 3 version), quirks included, so that our numbers are comparable with
published ones. Where that script does something surprising, a comment says
so instead of fixing it.
"""

import collections
import json
import re

import numpy as np

# ---------------------------------------------------------------------------
# VQA answer normalisation (vqaEval.py: contractions, manualMap, articles,
# periodStrip, commaStrip, punct, processPunctuation, processDigitArticle).
# ---------------------------------------------------------------------------

# The official table, entry for entry. Some keys can never match (they hold
# capitals, but the text is lower-cased first; or they hold an apostrophe
# that the official punct list keeps, so they are already "contracted"), and
# "somebody'd" maps the wrong way round; all kept as in the script.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

MANUAL_MAP = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3',
    'four': '4', 'five': '5', 'six': '6', 'seven': '7', 'eight': '8',
    'nine': '9', 'ten': '10',
}

ARTICLES = ('a', 'an', 'the')

# As written in the script: "(?!<=\d)" was meant as a look-behind but is a
# look-ahead for the text "<=" + digit, which never follows a '.', so the
# effect is "drop every '.' not followed by a digit" ('2.5' keeps its
# period, 'yes.' and 'a.m' lose theirs).
PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')
COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
# Note: no apostrophe (so "don't" survives) and no ':' in the official list.
PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_',
         '-', '>', '<', '@', '`', ',', '?', '!')
# The script calls periodStrip.sub("", text, re.UNICODE): the flag lands in
# the `count` argument, so at most re.UNICODE (32) periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: each punctuation mark is deleted when it
  touches a space somewhere in the text, or when the text has a comma
  between digits anywhere ('1,000' -> '1000'); otherwise it becomes a space
  ('black/white' -> 'black white'). Then periods not before a digit go.
  The tests look at the original text, the replacements at the running one,
  as in the script."""
  out = text
  has_digit_comma = COMMA_STRIP.search(text) is not None
  for p in PUNCT:
    if p + ' ' in text or ' ' + p in text or has_digit_comma:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return PERIOD_STRIP.sub('', out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lower-case, split on whitespace, number
  words to digits, drop articles, expand contractions, join with spaces."""
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """What the official script does to a predicted answer: newlines and tabs
  to spaces, strip, process_punctuation, then process_digit_article.
  'Two' -> '2', 'a dog' -> 'dog', 'yes.' -> 'yes', 'isnt' -> "isn't"."""
  text = text.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(text))


# ---------------------------------------------------------------------------
# VQA accuracy.
# ---------------------------------------------------------------------------

def _official_gt_answers(answers):
  """The ground truth the official script compares against: the raw
  annotator answers, passed through process_punctuation only, and only
  when they are not all identical. (No lower-casing, number words or
  articles: the script relies on VQA v2's annotations being in canonical
  form already; a task generator must write its answers that way, e.g.
  '2' not 'two'.)"""
  answers = list(answers)
  if len(set(answers)) > 1:
    answers = [process_punctuation(a) for a in answers]
  return answers


def vqa_accuracy(prediction: str, answers) -> float:
  """Official VQA accuracy of one prediction against the annotators'
  answers (VQA v2 has 10): the mean over the leave-one-annotator-out
  subsets of min(#matches among the others / 3, 1). With 10 annotators,
  1/2/3/4+ matching ones give 0.3/0.6/0.9/1.0."""
  gts = _official_gt_answers(answers)
  if not gts:
    raise ValueError('the question has no answers (an unlabelled split?); '
                     'VQA accuracy needs the annotators\' answers')
  pred = normalize_vqa_answer(prediction)
  matches = np.array([g == pred for g in gts])
  # Leaving annotator i out removes its own match (if it matched).
  others = matches.sum() - matches
  return float(np.mean(np.minimum(others / 3.0, 1.0)))


def vqa_accuracies(predictions, answers_list) -> np.ndarray:
  """vqa_accuracy per question: [N] float64, in [0, 1]."""
  if len(predictions) != len(answers_list):
    raise ValueError(f'{len(predictions)} predictions but '
                     f'{len(answers_list)} answer lists')
  out = np.empty(len(predictions), np.float64)
  for i, (pred, answers) in enumerate(zip(predictions, answers_list)):
    try:
      out[i] = vqa_accuracy(pred, answers)
    except ValueError as e:
      raise ValueError(f'question {i}: {e}') from None
  return out


# ---------------------------------------------------------------------------
# Answer vocabulary and soft targets for the BCE head.
# ---------------------------------------------------------------------------

def build_answer_vocab(answers_list, top_n: int) -> list:
  """The top_n normalised answers over a training set, most frequent first.

  Every annotator answer counts once (a question whose 10 annotators said
  'red' 7 times adds 7 to 'red'), so frequent and agreed-on answers win.
  Ties go alphabetically, so the vocabulary is the same on every run and
  host. Answers that normalise to '' are no class and are skipped.
  Returns a list of at most top_n strings.
  """
  counts = collections.Counter()
  for answers in answers_list:
    counts.update(normalize_vqa_answer(a) for a in answers)
  counts.pop('', None)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [answer for answer, _ in ranked[:top_n]]


def vocab_index(vocab) -> dict:
  """answer -> class id."""
  return {answer: i for i, answer in enumerate(vocab)}


def soft_targets(answers, index: dict):
  """BCE targets of one question (UNITER/ALBEF-style VQA heads): answer a
  scores min(#annotators who gave a / 3, 1) (counted after normalisation).

  (The bottom-up-attention recipe uses the leave-one-out average instead,
  0.3/0.6/0.9/1.0; we use the plain n/3 form.) Answers outside the
  vocabulary get no target, so a question none of whose answers is in the
  vocabulary gets empty arrays: callers must count those (see
  soft_target_matrix), not treat them as labelled.
  Returns (indices [M] int32 ascending, scores [M] float32).
  """
  counts = collections.Counter(normalize_vqa_answer(a) for a in answers)
  hits = sorted((index[a], n) for a, n in counts.items() if a in index)
  indices = np.array([i for i, _ in hits], np.int32)
  scores = np.array([min(n / 3.0, 1.0) for _, n in hits], np.float32)
  return indices, scores


def soft_target_matrix(answers_list, vocab):
  """Dense soft targets of a batch of questions.

  Returns (targets [N, V] float32, covered [N] bool): covered[i] is False
  when question i has no answer in the vocabulary (its row is all zeros);
  `(~covered).sum()` is the number of such questions, which a loader
  should report or drop rather than train on as 'no answer is right'.
  """
  index = vocab_index(vocab)
  targets = np.zeros((len(answers_list), len(vocab)), np.float32)
  covered = np.zeros(len(answers_list), bool)
  for row, answers in enumerate(answers_list):
    indices, scores = soft_targets(answers, index)
    targets[row, indices] = scores
    covered[row] = indices.size > 0
  return targets, covered


# ---------------------------------------------------------------------------
# VQA results file (the official submission format).
# ---------------------------------------------------------------------------

def vqa_results_json(question_ids, answers) -> list:
  """[{"question_id": int, "answer": str}], one per question, in order."""
  if len(question_ids) != len(answers):
    raise ValueError(f'{len(question_ids)} question ids but '
                     f'{len(answers)} answers')
  return [{'question_id': int(q), 'answer': str(a)}
          for q, a in zip(question_ids, answers)]


def write_vqa_results(path: str, question_ids, answers) -> str:
  """Writes the results JSON the official evaluation (and EvalAI) reads."""
  with open(path, 'w') as f:
    json.dump(vqa_results_json(question_ids, answers), f)
  return path


# ---------------------------------------------------------------------------
# REC.
# ---------------------------------------------------------------------------

def box_iou(a, b) -> np.ndarray:
  """IoU of paired (x1, y1, x2, y2) boxes: a [N, 4], b [N, 4] -> [N].

  Degenerate boxes (x2 <= x1 or y2 <= y1) have area 0; a pair whose union
  is 0 gets IoU 0, never NaN.
  """
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  if a.shape != b.shape:
    raise ValueError(f'box_iou pairs boxes: got {a.shape} and {b.shape}')

  def area(box):
    return (np.maximum(box[:, 2] - box[:, 0], 0.0) *
            np.maximum(box[:, 3] - box[:, 1], 0.0))

  inter_w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
  inter_h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
  inter = np.maximum(inter_w, 0.0) * np.maximum(inter_h, 0.0)
  union = area(a) + area(b) - inter
  safe = np.where(union > 0, union, 1.0)
  return np.where(union > 0, inter / safe, 0.0)


def rec_accuracy(pred_boxes, gold_boxes, threshold: float = 0.5) -> float:
  """Fraction of referring expressions whose chosen box has IoU >=
  threshold with the gold box (the standard REC criterion, 0.5 inclusive).
  pred_boxes, gold_boxes: [N, 4]."""
  iou = box_iou(pred_boxes, gold_boxes)
  if iou.size == 0:
    raise ValueError('rec_accuracy of no examples')
  return float(np.mean(iou >= threshold))


# ---------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------

def _gold_mask(gold, shape) -> np.ndarray:
  """gold ([Q] item indices, or Q collections of indices) -> [Q, I] bool."""
  num_queries, num_items = shape
  single = isinstance(gold, np.ndarray) or all(
      isinstance(g, (int, np.integer)) for g in gold)
  sets = [[g] for g in np.asarray(gold).reshape(-1)] if single else gold
  if len(sets) != num_queries:
    raise ValueError(f'{len(sets)} gold entries for {num_queries} queries')
  mask = np.zeros(shape, bool)
  for q, items in enumerate(sets):
    items = [int(i) for i in items]
    if not items:
      raise ValueError(f'query {q} has no correct item')
    if min(items) < 0 or max(items) >= num_items:
      raise ValueError(f'query {q}: gold item out of range {items} '
                       f'(num_items {num_items})')
    mask[q, items] = True
  return mask


def gold_ranks(scores, gold) -> np.ndarray:
  """0-based rank of the best-ranked correct item of each query: [Q] int.

  scores: [Q, I], higher is better. gold: [Q] index of the one correct
  item (text -> image), or Q collections of correct indices (image -> text,
  several captions per image). Ties are broken against the query: every
  wrong item whose score equals (or beats) the best correct item's ranks
  ahead of it, so a constant scorer gets no free hits. Correct items tied
  with each other do not push each other back.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [num_queries, num_items], got '
                     f'{scores.shape}')
  if np.isnan(scores).any():
    raise ValueError('scores contain NaN; a NaN never compares, so ranks '
                     'would be silently optimistic')
  mask = _gold_mask(gold, scores.shape)
  best_gold = np.where(mask, scores, -np.inf).max(axis=1)
  return ((scores >= best_gold[:, None]) & ~mask).sum(axis=1)


def recall_at_k(scores, gold, ks=(1, 5, 10)) -> dict:
  """Recall@k: the fraction of queries with a correct item in the top k.

  scores [Q, I], gold as in gold_ranks (ties counted against the query).
  Returns {'r1': ..., 'r5': ..., 'r10': ...} (fractions in [0, 1]).
  """
  ranks = gold_ranks(scores, gold)
  return {f'r{k}': float(np.mean(ranks < k)) for k in ks}


# ---------------------------------------------------------------------------
# Breakdowns.
# ---------------------------------------------------------------------------

def accuracy_by_type(values, types) -> dict:
  """Mean of values [N] per type (e.g. VQA question_type or answer_type):
  {type: mean}, keys sorted."""
  values = np.asarray(values, np.float64)
  if len(values) != len(types):
    raise ValueError(f'{len(values)} values but {len(types)} types')
  groups = collections.defaultdict(list)
  for v, t in zip(values, types):
    groups[t].append(v)
  return {t: float(np.mean(groups[t])) for t in sorted(groups)}
