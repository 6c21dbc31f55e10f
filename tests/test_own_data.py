"""Your own data, from download to answer (README, "Your own data").

Files in the official layouts (PNG images, their COCO instances JSON, VQA
v2 questions and annotations: train and val labelled, test-dev questions
only; a RefCOCO refs(unc).p whose boxes are annotations of those
instances) go through the command-line entry points, in-process: convert
coco_instances -> an image folder, convert vqa_v2 -> its vqa splits,
convert refcoco -> its rec splits, inspect finds nothing wrong, a tiny
pixel VQA fine-tune runs a few steps and evaluates, and predict (CLI and
API) answers a question as that evaluation did, and as it does for the
image's id when given its file; --draw writes a PNG that decodes. The
unlabelled test-dev split gets the evaluation server's results file, every
question in it, and no accuracy; as the eval split it is refused before
training (it cannot pick the best checkpoint). A tiny pixel REC fine-tune
on the same folder: predict grounds a test expression in the box that
run's evaluation chose for it. A folder of image files without
annotations converts (image_folder) to grid images.

Two tiny runs (shrunk, 4 steps, batch 4): ~20 s and ~12 s on 2 cores.
"""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from cmal_jax import cli_errors, finetune, jobs, predict, predict_draw
from cmal_jax.convert import cli as convert_cli
from cmal_jax.convert import inspect as convert_inspect
from cmal_jax.convert.formats import FormatError
from cmal_jax.data import image_store
from cmal_testutil import fast_step, finetune_tiny

# COCO image id -> (width, height) of the downloaded images.
IMAGE_SIZES = {9: (80, 60), 25: (40, 50), 30: (64, 64), 42: (50, 70)}
# The questions of each split: (question_id, image_id, question).
QUESTIONS = {
    'train': [(9000, 9, 'What color is the car?'),
              (9001, 9, 'How many cars are there?'),
              (25000, 25, 'Is there a car?'),
              (30000, 30, 'Is it sunny?'),
              (42000, 42, 'What is on the road?'),
              (42001, 42, 'Is the light red?')],
    'val': [(9002, 9, 'Is the car red?'),
            (30001, 30, 'What color is the sky?'),
            (42002, 42, 'How many lights?')],
    'test-dev': [(25001, 25, 'What is this?'),
                 (30002, 30, 'Is it night?'),
                 (42003, 42, 'Where is the car?')],
}
# Ten answers per labelled question, as the annotators gave them.
ANSWERS = ['red', 'yes', 'no', '2', 'car', 'blue']
SPLIT_FILES = {'train': 'train2014', 'val': 'val2014',
               'test-dev': 'test-dev2015'}


def write_json(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


INSTANCES_FILE = 'instances_train2014.json'


def download_images(root):
  """PNGs named as COCO names them, and instances_train2014.json."""
  folder = root / 'train2014'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, (w, h) in IMAGE_SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
        folder / f'COCO_train2014_{i:012d}.png')
  instances = {
      'images': [{'id': i, 'file_name': f'COCO_train2014_{i:012d}.png',
                  'width': w, 'height': h}
                 for i, (w, h) in IMAGE_SIZES.items()],
      'annotations': [
          {'id': 1, 'image_id': 9, 'bbox': [8, 6, 40, 30], 'category_id': 3},
          {'id': 2, 'image_id': 42, 'bbox': [5, 5, 20, 30],
           'category_id': 10},
          {'id': 3, 'image_id': 25, 'bbox': [0, 0, 20, 25], 'category_id': 3},
      ],
      'categories': [{'id': 3, 'name': 'car'},
                     {'id': 10, 'name': 'traffic light'}],
  }
  return write_json(root / INSTANCES_FILE, instances), folder


def download_vqa(root, split):
  """The VQA v2 questions file of a split and, for a labelled one, its
  annotations file (None for test-dev)."""
  subtype = SPLIT_FILES[split]
  questions = [{'question_id': q, 'image_id': i, 'question': text}
               for q, i, text in QUESTIONS[split]]
  q = write_json(root / f'v2_OpenEnded_mscoco_{subtype}_questions.json',
                 {'info': {}, 'task_type': 'Open-Ended',
                  'data_type': 'mscoco', 'data_subtype': subtype,
                  'questions': questions})
  if split == 'test-dev':
    return q, None
  annotations = []
  for n, (qid, image_id, _) in enumerate(QUESTIONS[split]):
    given = [ANSWERS[(n + k // 4) % len(ANSWERS)] for k in range(10)]
    annotations.append({
        'question_id': qid, 'image_id': image_id,
        'answers': [{'answer': a, 'answer_confidence': 'yes',
                     'answer_id': k + 1} for k, a in enumerate(given)],
        'multiple_choice_answer': given[0], 'question_type': 'what',
        'answer_type': 'other'})
  a = write_json(root / f'v2_mscoco_{subtype}_annotations.json',
                 {'info': {}, 'data_type': 'mscoco', 'data_subtype': subtype,
                  'annotations': annotations})
  return q, a


def convert(root):
  """The download converted as README says: the image folder, with
  vqa_train, vqa_val and vqa_test-dev written into it, and rec_train,
  rec_val and rec_test."""
  instances, images = download_images(root)
  data = str(root / 'coco')
  convert_cli.main(['coco_instances', f'--instances={instances}',
                    f'--images={images}', f'--out={data}'])
  for split in QUESTIONS:
    questions, annotations = download_vqa(root, split)
    argv = ['vqa_v2', f'--questions={questions}', f'--split={split}',
            f'--regions={data}']
    if annotations:
      argv.append(f'--annotations={annotations}')
    assert convert_cli.main(argv) == (len(QUESTIONS[split]), {})
  convert_refcoco(root, data)
  return data


def pixel_config(task, data):
  """The tiny pixel fine-tune of `task` on the converted folder: a few
  steps, evaluated at the end on val and on the config's test splits."""
  c = fast_step(finetune_tiny(task, 'cmal', ''))
  c.model.visual.input = 'pixels'
  c.model.dropout = 0.0
  c.data.dir = data
  c.batch_size = c.eval.batch_size = 4
  return c


def pixel_vqa_config(data):
  """The tiny pixel VQA fine-tune, tested on test-dev."""
  c = pixel_config('vqa', data)
  c.finetune.test_splits = ('test-dev',)
  return c


def fine_tune(config, tmp_path_factory, task):
  """(workdir, final results) of a fine-tune on converted downloads."""
  workdir = str(tmp_path_factory.mktemp(f'own_{task}_run') / task)
  return workdir, jobs.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """The downloads, converted; inspect finds nothing wrong."""
  data = convert(tmp_path_factory.mktemp('own_data'))
  assert convert_inspect.main([data]) == 0
  return data


@pytest.fixture(scope='module')
def run(data, tmp_path_factory, compilation_cache):
  """(workdir, final results) of the VQA fine-tune."""
  return fine_tune(pixel_vqa_config(data), tmp_path_factory, 'vqa')


def results_file(workdir, split):
  with open(os.path.join(workdir, finetune.PREDICTIONS_DIR,
                         f'vqa_{split}_results.json')) as f:
    return json.load(f)


def test_evaluation_of_labelled_and_unlabelled_splits(run):
  workdir, results = run
  assert results['val']['num_labelled'] == len(QUESTIONS['val'])
  assert 0 <= results['val']['vqa_accuracy'] <= 1
  # test-dev: every question answered, no accuracy to report (absent, not
  # 0: it has no annotations).
  dev = results['test-dev']
  assert dev['num_examples'] == len(QUESTIONS['test-dev'])
  assert dev['num_labelled'] == 0
  assert not any(k.startswith('vqa_accuracy') for k in dev)
  for split in ('val', 'test-dev'):
    rows = results_file(workdir, split)
    assert [r['question_id'] for r in rows] == [q for q, _, _ in
                                                QUESTIONS[split]]
    assert all(isinstance(r['answer'], str) and r['answer'] for r in rows)


def test_an_unlabelled_eval_split_is_refused_before_training(data,
                                                              tmp_path):
  c = pixel_vqa_config(data)
  c.data.eval_split = 'test-dev'
  with pytest.raises(ValueError, match='vqa_test-dev.array_record has no '
                     'answers .*finetune.test_splits'):
    jobs.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_results_file_answers_every_question(tmp_path):
  """A question evaluation skipped (bad image) gets the most frequent
  training answer; an undecodable record (None) has no id to answer."""
  examples = [{'question_id': 1}, None, {'question_id': 3},
              {'question_id': 4}]
  path = tmp_path / 'vqa_test-dev_results.json'
  finetune.write_vqa_results(path, examples, [True, False, False, True],
                             ['no', 'red', 'red', 'two'], ['yes', 'no'])
  assert json.loads(path.read_text()) == [
      {'question_id': 1, 'answer': 'no'}, {'question_id': 3, 'answer': 'yes'},
      {'question_id': 4, 'answer': 'two'}]


def decoded_size(path):
  """The (width, height) of a PNG file, after checking it decodes."""
  with Image.open(path) as picture:
    assert picture.format == 'PNG'
    picture.verify()
  with Image.open(path) as picture:  # verify() leaves it unusable.
    picture.load()
    assert picture.width > 0 and picture.height > 0
    return picture.size


def test_predict_answers_as_the_evaluation_did(run, capsys, tmp_path):
  workdir, _ = run
  expected = {r['question_id']: r['answer']
              for r in results_file(workdir, 'test-dev')}
  qid, image_id, question = QUESTIONS['test-dev'][0]
  drawn = tmp_path / 'vqa.png'
  predict.main([f'--workdir={workdir}', f'--image={image_id}',
                f'--question={question}', f'--draw={drawn}', '--json'])
  got = json.loads(capsys.readouterr().out)
  assert got['prediction'][0]['answer'] == expected[qid]
  predictor = predict.Predictor.from_workdir(workdir)
  picture = predict_draw.draw_prediction(predictor, question, [str(image_id)],
                                         got['prediction'])
  assert decoded_size(drawn) == picture.size
  images = [str(i) for _, i, _ in QUESTIONS['test-dev']]
  texts = [q for _, _, q in QUESTIONS['test-dev']]
  top = [a[0]['answer'] for a in predictor.answer(images, texts, top_k=1)]
  assert top == [expected[q] for q, _, _ in QUESTIONS['test-dev']]


# ------------------------------------------------- an image file, not an id

def store_entry(data, image_id):
  """(file, entry) of an image id in the converted folder's images.json."""
  path = image_store.store_file(data)
  with open(path) as f:
    entry = json.load(f)[image_id]
  return image_store.ImageStore(path).file_of(image_id), entry


def test_predict_on_a_file_of_the_data_is_its_ids_prediction(run, data,
                                                             tmp_path,
                                                             capsys):
  """Image 30 has no boxes (the grid, as for a file without --boxes); 42
  has one, given as ImageFile boxes and as --boxes."""
  workdir, _ = run
  predictor = predict.Predictor.from_workdir(workdir)
  question = 'What is on the road?'
  grid_file, _ = store_entry(data, '30')
  assert (predictor.answer([grid_file], [question], top_k=3)
          == predictor.answer(['30'], [question], top_k=3))
  boxed_file, entry = store_entry(data, '42')
  assert entry['boxes']
  given = predict.ImageFile(boxed_file, boxes=entry['boxes'],
                            tags=entry['tags'])
  by_id = predictor.answer(['42'], [question], top_k=3)
  assert predictor.answer([given], [question], top_k=3) == by_id
  # Without its boxes the file is read with the grid: another input.
  assert (predictor.image_record(boxed_file)['region_boxes'].shape
          == (0, 4))
  boxes = tmp_path / 'boxes.json'
  boxes.write_text(json.dumps({'boxes': entry['boxes'],
                               'tags': entry['tags']}))
  predict.main([f'--workdir={workdir}', f'--image={boxed_file}',
                f'--boxes={boxes}', f'--question={question}', '--top_k=3',
                '--json'])
  got = json.loads(capsys.readouterr().out)
  assert got['image'] == boxed_file and got['boxes'] == str(boxes)
  assert got['prediction'] == by_id[0]


def file_error(capsys, workdir, image, *flags):
  """The one-line error of predict about an image file."""
  with pytest.raises(SystemExit):
    cli_errors.run_tool('predict', predict.main, [
        f'--workdir={workdir}', f'--image={image}', '--question=What?',
        *flags])
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('predict: error: ')
  return err.strip()


def test_a_missing_or_undecodable_file_is_a_one_line_error(run, tmp_path,
                                                           capsys):
  workdir, _ = run
  missing = tmp_path / 'missing.png'
  err = file_error(capsys, workdir, missing)
  assert err.startswith(f'predict: error: {missing}: no such image file, '
                        'nor an image id of ')
  err = file_error(capsys, workdir, missing, f'--boxes={tmp_path}/b.json')
  assert str(tmp_path / 'b.json') in err  # The boxes file is read first.
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not a png')
  err = file_error(capsys, workdir, broken)
  assert err.startswith(f'predict: error: {broken}: cannot decode the '
                        'image: ')
  boxes = tmp_path / 'boxes.json'
  boxes.write_text(json.dumps([[0, 0, 500, 10]]))  # Outside the image.
  grid_file = tmp_path / 'ok.png'
  Image.new('RGB', (40, 30)).save(grid_file)
  err = file_error(capsys, workdir, grid_file, f'--boxes={boxes}')
  assert err.startswith(f'predict: error: {grid_file}: boxes: [0.0, 0.0, '
                        '500.0, 10.0] is not an (x1, y1, x2, y2) box')
  boxes.write_text(json.dumps({'box': [[0, 0, 5, 5]]}))
  err = file_error(capsys, workdir, grid_file, f'--boxes={boxes}')
  assert err.startswith(f'predict: error: {boxes}: expected a list of ')


# ------------------------------------------------- RefCOCO, on the same images

# The referring expressions of each split: (ref_id, ann_id of the instances
# file, image_id, sentences).
REFS = {
    'train': [(1, 1, 9, ['the car', 'the grey car']),
              (2, 2, 42, ['the traffic light']),
              (3, 3, 25, ['the small car'])],
    'val': [(4, 1, 9, ['the car in the middle']),
            (5, 2, 42, ['the light'])],
    'test': [(6, 3, 25, ['the car on the left']),
             (7, 2, 42, ['the light on the pole', 'a traffic light'])],
}


def download_refcoco(root):
  """refs(unc).p: the official pickle of every split's refs, whose boxes
  are annotations of instances_train2014.json."""
  refs = [{'ref_id': ref_id, 'ann_id': ann_id, 'image_id': image_id,
           'split': split, 'category_id': 3, 'file_name': '',
           'sentences': [{'sent': s, 'raw': s, 'tokens': s.split(),
                          'sent_id': 10 * ref_id + n}
                         for n, s in enumerate(sentences)]}
          for split, rows in REFS.items()
          for ref_id, ann_id, image_id, sentences in rows]
  path = os.path.join(root, 'refs(unc).p')
  with open(path, 'wb') as f:
    pickle.dump(refs, f)
  return path


def convert_refcoco(root, data):
  """rec_train, rec_val and rec_test written into the converted image
  folder `data`, from the refs pickle and the instances file the images
  came with (in `root`)."""
  refs = download_refcoco(root)
  instances = os.path.join(root, INSTANCES_FILE)
  for split, rows in REFS.items():
    n = sum(len(sentences) for *_, sentences in rows)
    assert convert_cli.main(['refcoco', f'--refs={refs}',
                             f'--instances={instances}', f'--split={split}',
                             f'--regions={data}']) == (n, {})


@pytest.fixture(scope='module')
def rec_run(data, tmp_path_factory, compilation_cache):
  """(workdir, final results) of the REC fine-tune (tested on test)."""
  return fine_tune(pixel_config('rec', data), tmp_path_factory, 'rec')


def rec_predictions(workdir, split):
  """sent_id -> the box the run's evaluation chose for that sentence."""
  path = os.path.join(workdir, finetune.PREDICTIONS_DIR, f'rec_{split}.jsonl')
  with open(path) as f:
    return {row['sent_id']: row['box'] for row in map(json.loads, f)}


def test_rec_predict_grounds_as_the_evaluation_did(rec_run, capsys,
                                                    tmp_path):
  workdir, results = rec_run
  assert set(results) >= {'val', 'test'}
  expected = rec_predictions(workdir, 'test')
  assert len(expected) == sum(len(s) for *_, s in REFS['test'])
  ref_id, _, image_id, sentences = REFS['test'][0]
  sent_id = 10 * ref_id
  drawn = tmp_path / 'rec.png'
  predict.main([f'--workdir={workdir}', f'--image={image_id}',
                f'--expression={sentences[0]}', f'--draw={drawn}', '--json'])
  got = json.loads(capsys.readouterr().out)
  # The predictions file rounds to 5 decimals.
  np.testing.assert_allclose(got['prediction']['box'], expected[sent_id],
                             atol=1e-5)
  predictor = predict.Predictor.from_workdir(workdir)
  grounded = predictor.ground([str(image_id)], sentences[:1])[0]
  assert grounded == got['prediction']
  picture = predict_draw.draw_grounding(predictor, str(image_id), grounded)
  assert decoded_size(drawn) == picture.size


# ------------------------------------ a folder of images, no annotations

def photo_folder(root):
  """Three PNGs (one in a sub-folder, passed over) and a text file."""
  folder = root / 'photos'
  (folder / 'more').mkdir(parents=True)
  sizes = {'beach': (30, 20), 'cat': (16, 24), 'dog': (50, 40)}
  for name, size in sizes.items():
    Image.new('RGB', size, (10, 200, 30)).save(folder / f'{name}.png')
  Image.new('RGB', (8, 8)).save(folder / 'more' / 'inner.png')
  (folder / 'notes.txt').write_text('not an image')
  return folder, sizes


def test_image_folder_without_annotations(tmp_path, capsys):
  folder, sizes = photo_folder(tmp_path)
  out = tmp_path / 'store'
  with pytest.raises(FormatError, match=f'{folder / "notes.txt"}: .*image '
                     'notes: cannot read the size of'):
    convert_cli.main(['image_folder', f'--images={folder}', f'--out={out}'])
  assert not out.exists()
  assert convert_cli.main(['image_folder', f'--images={folder}',
                           f'--out={out}', '--skip_bad']) == (
                               3, {'bad_image': 1})
  assert capsys.readouterr().out.strip() == (
      f'Wrote 3 images to {out}; skipped 1: bad_image 1')
  entries = json.loads((out / 'images.json').read_text())
  assert entries == {
      name: {'file': os.path.join('..', 'photos', f'{name}.png'),
             'width': w, 'height': h, 'boxes': [], 'tags': []}
      for name, (w, h) in sizes.items()}
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['tags'] == [] and meta['feature_dim'] is None
  assert meta['source']['format'] == 'image_folder'
  # The grid: no region boxes; the pixels as the file has them.
  record = image_store.ImageStore(image_store.store_file(str(out)))['cat']
  assert record['region_boxes'].shape == (0, 4)
  assert record['image'].shape == (24, 16, 3)
  assert convert_inspect.main([str(out)]) == 0
