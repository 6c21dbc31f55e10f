"""cmal_jax.predict: a fine-tuned workdir's model asked about one image.

Two tiny fine-tuning runs (cmal_testutil.finetune_tiny: vqa and rec, 4
steps, made once per module) answer their test split's questions as their
own evaluation did (its predictions files); the CLI prints what the API
returns; wrong task, missing image and missing checkpoint errors name what
is wrong. ve, nlvr2 and retrieval run on random parameters over the vqa
run's images (no more fine-tuning: only their output form is checked).
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from cmal_jax import (cli_errors, finetune, jobs, predict, predict_anchors,
                      predict_draw)
from cmal_jax.data import anchors, pipeline, task_pipeline, tasks
from cmal_jax.export import export
from cmal_testutil import finetune_tiny


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, compilation_cache):
  """{task: workdir} of tiny vqa and rec runs (random init, no dropout)."""
  root = tmp_path_factory.mktemp('predict_runs')
  workdirs = {}
  for task in ('vqa', 'rec'):
    c = finetune_tiny(task, 'cmal', '')
    c.model.dropout = 0.0
    workdirs[task] = str(root / task)
    assert jobs.train_and_evaluate(c, workdirs[task])['task'] == task
  return workdirs


@pytest.fixture(scope='module')
def vqa(runs):
  return predict.Predictor.from_workdir(runs['vqa'])


@pytest.fixture(scope='module')
def rec(runs):
  return predict.Predictor.from_workdir(runs['rec'])


def split_examples(workdir, task):
  return task_pipeline.read_task_examples(os.path.join(workdir, 'data'),
                                          task, 'test')


# ------------------------------------------------------- the predictions

def test_answer_is_what_the_run_predicted(vqa, runs):
  examples = split_examples(runs['vqa'], 'vqa')
  images = [ex['image_id'] for ex in examples]
  questions = [ex['question'] for ex in examples]
  got = vqa.answer(images, questions, top_k=3)
  rows = json.load(open(os.path.join(runs['vqa'], 'predictions',
                                     'vqa_test_results.json')))
  assert [g[0]['answer'] for g in got] == [r['answer'] for r in rows]
  assert vqa.where.endswith(os.path.join('best', '4'))
  for top in got:
    scores = [s['score'] for s in top]
    assert len(top) == 3 and scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)
    assert all(s['answer'] in vqa.answer_vocab for s in top)
  # One compile per batch size, reused by later calls of that size.
  again = vqa.answer(images, questions, top_k=3)
  assert again == got
  vqa.answer(images[:1], questions[:1])
  assert vqa.compiles == {len(examples): 1, 1: 1}


def test_ground_is_the_box_the_run_chose(rec, runs):
  examples = split_examples(runs['rec'], 'rec')
  got = rec.ground([ex['image_id'] for ex in examples],
                   [ex['expression'] for ex in examples])
  rows = read_jsonl(os.path.join(runs['rec'], 'predictions',
                                 'rec_test.jsonl'))
  # The file rounds to 5 decimals.
  np.testing.assert_allclose([g['box'] for g in got],
                             [r['box'] for r in rows], atol=1e-5)
  R = rec.shapes.max_regions
  assert all(0 < g['score'] <= 1 and 0 <= g['region'] < R for g in got)


def random_predictor(task, like):
  """A Predictor of `task` with random parameters, over the images of the
  Predictor `like`'s workdir."""
  config = finetune_tiny(task, 'cmal', '')
  model = finetune.task_model(config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), finetune.init_inputs(config)))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype),
                        shapes)
  return predict.Predictor(config, params, workdir=like.workdir,
                           where='random')


def test_entail_compare_rank_outputs(vqa):
  images = vqa.store.image_ids()[:3]
  ve = random_predictor('ve', vqa)
  for p in ve.entail(images, ['a red cube.'] * 3):
    assert tuple(p) == tasks.VE_LABELS
    assert sum(p.values()) == pytest.approx(1.0)
  nlvr2 = random_predictor('nlvr2', vqa)
  got = nlvr2.compare(images, images[::-1], ['both show a cube.'] * 3)
  assert all(0 < p < 1 for p in got) and got[0] != got[1]
  retrieval = random_predictor('retrieval', vqa)
  ranked = retrieval.rank('a red cube.', images)
  scores = [r['score'] for r in ranked]
  assert sorted(r['image'] for r in ranked) == sorted(images)
  assert scores == sorted(scores, reverse=True)
  assert [r['image'] for r in retrieval.rank('a red cube.', images, 2)] == [
      r['image'] for r in ranked[:2]]


# ---------------------------------------------------------------- the CLI

def run_cli(capsys, *argv):
  predict.main(list(argv))
  return capsys.readouterr().out


def test_cli_prints_what_the_api_returns(vqa, runs, capsys):
  ex = split_examples(runs['vqa'], 'vqa')[0]
  argv = (f'--workdir={runs["vqa"]}', f'--image={ex["image_id"]}',
          f'--question={ex["question"]}', '--top_k=2')
  expected = vqa.answer([ex['image_id']], [ex['question']], top_k=2)[0]
  lines = run_cli(capsys, *argv).splitlines()
  assert lines[0] == f'vqa ({vqa.where}): {ex["question"]}'
  assert lines[1:] == [f'{s["score"]:.4f}  {s["answer"]}' for s in expected]
  got = json.loads(run_cli(capsys, *argv, '--json'))
  assert got['task'] == 'vqa' and got['checkpoint'] == vqa.where
  assert got['image'] == ex['image_id'] and got['question'] == ex['question']
  assert [s['answer'] for s in got['prediction']] == [
      s['answer'] for s in expected]
  np.testing.assert_allclose([s['score'] for s in got['prediction']],
                             [s['score'] for s in expected], rtol=1e-6)


def test_cli_rec_json(rec, runs, capsys):
  ex = split_examples(runs['rec'], 'rec')[0]
  got = json.loads(run_cli(capsys, f'--workdir={runs["rec"]}', '--json',
                           f'--image={ex["image_id"]}',
                           f'--expression={ex["expression"]}'))
  expected = rec.ground([ex['image_id']], [ex['expression']])[0]
  assert got['prediction']['region'] == expected['region']
  np.testing.assert_allclose(got['prediction']['box'], expected['box'])


def cli_error(capsys, *argv):
  """The one-line error of a failing command line."""
  with pytest.raises(SystemExit) as e:
    cli_errors.run_tool('predict', predict.main, list(argv))
  assert e.value.code not in (0, None)
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  return err.strip() if err.strip() else str(e.value.code)


# ------------------------------------------------------------- the errors

def test_wrong_task(rec, runs, capsys):
  with pytest.raises(ValueError, match=(
      f'{runs["rec"]} is a rec workdir; answer\\(\\) needs a vqa one')):
    rec.answer(['x'], ['what?'])
  err = cli_error(capsys, f'--workdir={runs["rec"]}', '--image=x',
                  '--question=what?')
  assert err == (f'predict: error: {runs["rec"]} is a rec workdir; '
                 '--question needs a vqa one (a rec workdir takes '
                 '--expression)')
  with pytest.raises(ValueError, match='--question needs a vqa one'):
    cli_errors.run_tool('predict', predict.main, [
        f'--workdir={runs["rec"]}', '--image=x', '--question=a', '--verbose'])


def test_lists_of_other_lengths_or_empty(rec):
  with pytest.raises(ValueError, match='got lengths \\[2, 1\\]'):
    rec.ground(['a', 'b'], ['the cube'])
  with pytest.raises(ValueError, match='got lengths \\[0, 0\\]'):
    rec.ground([], [])


def test_missing_image(rec, runs, capsys):
  with pytest.raises(ValueError, match="no regions for image id 'no-such'"):
    rec.ground(['no-such'], ['the cube'])
  err = cli_error(capsys, f'--workdir={runs["rec"]}', '--image=no-such',
                  '--expression=the cube')
  assert err.startswith('predict: error: ') and "'no-such'" in err
  assert 'regions.array_record' in err


def test_an_image_file_needs_a_pixel_model(rec, runs, tmp_path, capsys):
  photo = tmp_path / 'photo.png'
  Image.new('RGB', (32, 24)).save(photo)
  store = os.path.join(runs['rec'], 'data', 'regions.array_record')
  err = cli_error(capsys, f'--workdir={runs["rec"]}', f'--image={photo}',
                  '--expression=the cube')
  assert err == (f'predict: error: {photo}: the model of {runs["rec"]} reads '
                 'region features, not pixels: give an image id of its '
                 f'region store {store}')
  with pytest.raises(ValueError, match='reads region features'):
    rec.ground([predict.ImageFile(str(photo), boxes=[[0, 0, 8, 8]])],
               ['the cube'])


def test_checkpoint_steps_and_missing_checkpoints(runs, tmp_path):
  workdir = runs['rec']
  assert predict.Predictor.from_workdir(workdir, 4).where.endswith(
      os.path.join('checkpoints', '4'))
  assert predict.Predictor.from_workdir(workdir, 'latest').where.endswith(
      os.path.join('checkpoints', '4'))
  with pytest.raises(FileNotFoundError, match='holds no checkpoint at step 3'):
    predict.Predictor.from_workdir(workdir, 3)
  bare = tmp_path / 'bare'
  bare.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), bare)
  with pytest.raises(FileNotFoundError, match=str(bare / 'best.json')):
    predict.Predictor.from_workdir(str(bare))
  with pytest.raises(FileNotFoundError, match=f'{bare}.*holds no checkpoint'):
    predict.Predictor.from_workdir(str(bare), 'latest')


def test_pretraining_workdir_and_checkpoint_are_refused(rec, runs,
                                                        tmp_path, capsys):
  config = export.read_run_config(runs['rec'])
  pre = tmp_path / 'pre'
  pre.mkdir()
  (pre / 'config.json').write_text(json.dumps(dict(config.to_dict(),
                                                   task='pretrain')))
  with pytest.raises(ValueError, match=f'{pre} is a pre-training workdir'):
    predict.Predictor.from_workdir(str(pre))
  err = cli_error(capsys, f'--workdir={pre}', '--question=a cube?',
                  '--image=0')
  assert err == (f'predict: error: {pre} is a pretrain workdir; --question '
                 'needs a fine-tuned one (a pretrain workdir takes '
                 '--caption and --image: its anchors)')
  encoders = {k: v for k, v in rec.params.items() if k != 'rec_head'}
  with pytest.raises(ValueError, match='runs/x/checkpoints/2 holds a '
                     'pre-training checkpoint \\(no rec_head\\)'):
    predict.Predictor(config, encoders, workdir=runs['rec'],
                      where='runs/x/checkpoints/2')
  pretrained = dict(rec.params, pairing_head={})
  with pytest.raises(ValueError, match='holds a pre-training checkpoint '
                     '\\(a pairing_head\\)'):
    predict.Predictor(config, pretrained, workdir=runs['rec'],
                      where='runs/x/checkpoints/2')


# ------------------------------------------------------------ the drawing

def test_draw_rec_chosen_box(rec, runs, capsys, tmp_path):
  ex = split_examples(runs['rec'], 'rec')[0]
  out = tmp_path / 'rec.png'
  run_cli(capsys, f'--workdir={runs["rec"]}', f'--image={ex["image_id"]}',
          f'--expression={ex["expression"]}', f'--draw={out}')
  grounded = rec.ground([ex['image_id']], [ex['expression']])[0]
  picture = np.asarray(Image.open(out).convert('RGB'))
  # A region store: no pixels, a grey square.
  size = predict_draw.CANVAS_SIZE
  assert picture.shape == (size, size, 3)
  x1, y1, x2, y2 = predict_draw.pixel_box(grounded['box'], size, size)
  # The left, right and bottom edges (the label may cover the top one).
  mid_y = (y1 + y2) // 2
  for x, y in ((x1, mid_y), (x2, mid_y), ((x1 + x2) // 2, y2)):
    assert tuple(picture[y, x]) == predict_draw.CHOSEN_COLOUR, (x, y)
  gold = ex['target_box']
  drawn = np.asarray(predict_draw.draw_grounding(rec, ex['image_id'],
                                                 grounded, gold_box=gold))
  gx1, gy1, gx2, gy2 = predict_draw.pixel_box(gold, size, size)
  if not np.allclose(gold, grounded['box']):  # Else the chosen one covers it.
    assert predict_draw.GOLD_COLOUR in {
        tuple(drawn[(gy1 + gy2) // 2, x]) for x in (gx1, gx2)}


def test_attention_heat_map(vqa, runs, capsys, tmp_path):
  ex = split_examples(runs['vqa'], 'vqa')[0]
  (attended,) = vqa.region_attention([ex['question']], [[ex['image_id']]])
  ((weights, boxes, mask),) = attended
  regions = len(vqa.store[ex['image_id']]['region_conf'])
  assert int(mask.sum()) == min(regions, vqa.shapes.max_regions)
  assert weights.sum() == pytest.approx(1.0, abs=1e-5)
  assert (weights >= 0).all() and (weights[mask == 0] == 0).all()
  assert boxes.shape == (vqa.shapes.max_regions, 4)
  out = tmp_path / 'vqa.png'
  run_cli(capsys, f'--workdir={runs["vqa"]}', f'--image={ex["image_id"]}',
          f'--question={ex["question"]}', f'--draw={out}')
  size = predict_draw.CANVAS_SIZE
  picture = np.asarray(Image.open(out).convert('RGB'))
  assert picture.shape == (size, size, 3)
  # The most attended region is tinted towards the heat colour.
  x1, y1, x2, y2 = predict_draw.pixel_box(boxes[np.argmax(weights)], size,
                                          size)
  inside = picture[(y1 + y2) // 2, (x1 + x2) // 2].astype(int)
  assert inside[0] > predict_draw.GREY[0] > inside[2]


def test_draw_two_images_and_pixels(vqa):
  images = vqa.store.image_ids()[:2]
  nlvr2 = random_predictor('nlvr2', vqa)
  (pair,) = nlvr2.region_attention(['both show a cube.'], [images])
  assert len(pair) == 2
  assert all(w.sum() == pytest.approx(1.0, abs=1e-5) for w, _, _ in pair)
  p = nlvr2.compare(images[:1], images[1:], ['both show a cube.'])[0]
  picture = predict_draw.draw_prediction(nlvr2, 'both show a cube.', images,
                                         p)
  size, gap = predict_draw.CANVAS_SIZE, 8
  assert picture.size == (2 * size + gap, size)
  retrieval = random_predictor('retrieval', vqa)
  ranked = retrieval.rank('a red cube.', images)
  picture = predict_draw.draw_prediction(retrieval, 'a red cube.', images,
                                         ranked)
  assert picture.size == (size, size)
  # A model that reads pixels: the picture is the image, scaled.
  pixels = np.zeros((40, 80, 3), np.uint8)
  assert predict_draw.background({'image': pixels}).size == (size, size // 2)


# ------------------------------------------- a pre-training workdir's anchors

def test_anchors_of_a_pretraining_pair(pretrained_tiny, capsys, tmp_path):
  finder = predict_anchors.AnchorFinder.from_workdir(pretrained_tiny)
  # The first val pairs whose caption has anchors (the world's mostly do).
  indices = [i for i in range(8) if len(finder.encode(
      [i], [finder.pair(i)['caption']])['anchor_valid'][0].nonzero()[0])][:2]
  pairs = [finder.pair(i) for i in indices]
  captions = [p['caption'] for p in pairs]
  got = finder.anchors(indices, captions)
  tokenizer, shapes = finder.tokenizer, finder.shapes
  for pair, caption, found in zip(pairs, captions, got):
    keep = pipeline.keep_regions(len(pair['region_conf']), pair['region_conf'],
                                 shapes.max_regions)
    expected = anchors.detect_anchors(
        caption, tokenizer.encode(caption, shapes.max_text_len).offsets,
        pair['region_tag_ids'][keep], pair['region_conf'][keep],
        finder.vocab, shapes.max_anchors)
    assert [a['word'] for a in found] == expected.words and found
    assert all(0 <= a['region'] < len(keep) for a in found)
    assert all(0 < a['score'] <= 1 for a in found)
  out = tmp_path / 'anchors.png'
  lines = run_cli(capsys, f'--workdir={pretrained_tiny}', '--step=latest',
                  f'--image={indices[0]}', f'--caption={captions[0]}',
                  f'--draw={out}').splitlines()
  assert lines[0] == f'pretrain ({finder.where}): {captions[0]}'
  assert [line.split(' -> region ')[0] for line in lines[1:]] == [
      a['word'] for a in got[0]]
  assert lines[1].startswith(f'{got[0][0]["word"]} -> region '
                             f'{got[0][0]["region"]} (box [')
  size = predict_draw.CANVAS_SIZE
  assert Image.open(out).size == (size, size)
  with pytest.raises(ValueError, match='no pair 100000 in'):
    finder.anchors([100000], ['a cube'])
