"""VQA v2 questions + annotations JSON -> `vqa` task examples.

Questions: `{"questions": [{"question_id", "image_id", "question"}]}`.
Annotations (absent for test splits): `{"annotations": [{"question_id",
"image_id", "answers": [{"answer", "answer_confidence", "answer_id"}],
"multiple_choice_answer", "question_type", "answer_type"}]}`.
"""

from cmal_jax.convert.formats import (Collector, FormatError, Location,
                                   check_image, load_json, record_location,
                                   top_level_list)


def read_vqa_v2(questions_path: str, annotations_path: str | None = None, *,
                image_ids: set[str] | None = None, on_error: str = 'raise'
                ) -> tuple[list[dict], dict[str, int]]:
  """Reads VQA v2 questions, joined with their annotations by question_id.

  Returns (examples, skipped): one `vqa` example per question, in the
  questions file's order; `answers` are every annotator's raw answer
  strings (no vocabulary here). Without `annotations_path` (test splits)
  answers is [] and the question/answer types are ''. `skipped` counts bad
  records per reason when on_error='skip' (see the package docstring).
  """
  collector = Collector(on_error)
  questions = top_level_list(
      questions_path, load_json(questions_path, 'VQA v2 questions JSON'),
      'questions')
  annotations = None
  if annotations_path is not None:
    annotations = _index_annotations(annotations_path, collector)
  for index, record in enumerate(questions):
    loc = record_location(questions_path, 'questions', index, record,
                          'question_id')
    collector.add(_example, loc, record, annotations, annotations_path,
                  image_ids)
  return collector.result()


def _index_annotations(path: str, collector: Collector
                       ) -> dict[int, tuple[Location, dict]]:
  """Returns question_id -> (location, raw annotation).

  Only the id is checked here; the rest is checked when a question uses it,
  so a bad annotation is counted once, as its question's problem. Records
  without a usable id, and repeated ids (the join would be ambiguous; the
  first is kept), go to `collector.bad`.
  """
  records = top_level_list(path, load_json(path, 'VQA v2 annotations JSON'),
                           'annotations')
  by_question = {}
  for index, record in enumerate(records):
    loc = record_location(path, 'annotations', index, record, 'question_id')
    try:
      question_id = loc.field(record, 'question_id', int)
      if question_id in by_question:
        raise loc.error('question_id', 'repeats an earlier annotation\'s id',
                        'duplicate_id')
    except FormatError as e:
      collector.bad(e)
      continue
    by_question[question_id] = (loc, record)
  return by_question


def _example(loc: Location, record: dict, annotations: dict | None,
             annotations_path: str | None, image_ids: set[str] | None
             ) -> dict:
  """One question (+ its annotation) -> a `vqa` example; raises FormatError."""
  question_id = loc.field(record, 'question_id', int)
  image_id = str(loc.field(record, 'image_id', int))
  question = loc.field(record, 'question', str)
  check_image(loc, 'image_id', image_id, image_ids)
  example = {'question_id': question_id, 'image_id': image_id,
             'question': question, 'answers': [], 'question_type': '',
             'answer_type': ''}
  if annotations is None:
    return example
  if question_id not in annotations:
    raise loc.error('question_id', f'no annotation for this question in '
                    f'{annotations_path}', 'no_annotation')
  ann_loc, annotation = annotations[question_id]
  example['answers'] = _answers(ann_loc, annotation)
  example['question_type'] = ann_loc.field(annotation, 'question_type', str)
  example['answer_type'] = ann_loc.field(annotation, 'answer_type', str)
  return example


def _answers(loc: Location, annotation: dict) -> list[str]:
  """Returns every annotator's raw answer; a labelled question needs some."""
  answers = loc.items(annotation, 'answers', what='answers for a question '
                      'of a labelled split', reason='no_answers')
  return [loc.field(answer, 'answer', str, f'answers[{i}].answer')
          for i, answer in enumerate(answers)]
