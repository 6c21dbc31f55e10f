"""The one-hour baseline (cmal_jax/experiments/one_hour_baseline.py): every
task end to end at `tiny` through its command (data, training, evaluation,
the per-seed JSON and the summary line), its budget taken from the
fine-tuning config, the model's output shapes per task, and that it learns
a label only the image carries (and loses it when the images are shuffled).
"""

import json
import os

import jax
import numpy as np
import pytest

from cmal_jax import configlib, finetune, train_step
from cmal_jax.data import task_pipeline, tasks
from cmal_jax.data.shapes import zero_inputs
from cmal_jax.experiments import one_hour_baseline as baseline
from cmal_jax.world import task_baselines

STEPS = 3
RUNS = [(task, 'regions') for task in tasks.TASKS] + [('rec', 'pixels')]


@pytest.mark.parametrize('task,visual', RUNS)
def test_runs_end_to_end(task, visual, tmp_path, capsys):
  out = str(tmp_path / 'out')
  baseline.main([f'--task={task}', '--size=tiny', '--seeds=0',
                 f'--steps={STEPS}', f'--out={out}', f'--visual={visual}'])
  with open(os.path.join(out, f'{task}_{visual}_s0.json')) as f:
    result = json.load(f)
  config = baseline.baseline_config(task, 'tiny', visual)
  assert (result['task'], result['visual'], result['seed']) == (task, visual,
                                                                0)
  assert result['steps'] == STEPS and result['batch_size'] == 16
  assert result['best_metric'] == configlib.BEST_METRIC[task]
  assert 1 <= result['best_step'] <= STEPS
  # The learning curve: every evaluation's val metric; the best is its max.
  curve = dict(result['val_curve'])
  assert max(curve) == STEPS
  best = result['val'][result['best_metric']]
  assert curve[result['best_step']] == best == max(curve.values())
  # The splits fine-tuning generates for this config, every example of each
  # evaluated, under eval.json's metric names.
  sizes = {'val': config.world.num_eval, 'test': config.world.num_test}
  for split, size in sizes.items():
    metrics = result[split]
    count = 'num_images' if task == 'retrieval' else 'num_examples'
    assert metrics[count] == size and metrics['num_skipped'] == 0
    for name in configlib.TASK_METRICS[task]:
      assert 0.0 <= metrics[name] <= 1.0, (split, name, metrics[name])
  assert result['data_dir'] == os.path.abspath(
      os.path.join(out, 'data', f'{task}-tiny-s0'
                   + ('-pixels' if visual == 'pixels' else '')))
  # Beside each split, the score of a model that never sees the image.
  directory = result['data_dir']
  assert result['blind_baseline'] == task_baselines.blind_baseline_of(
      directory, task, tuple(sizes))
  if task == 'retrieval':
    assert result['blind_baseline']['test'] == 1 / sizes['test']
  summary = capsys.readouterr().out.strip().splitlines()[-1]
  assert summary.startswith(f'one_hour_baseline {task} ({visual}, tiny')
  metric = result['best_metric']
  assert (f'test {metric} {result["test"][metric]:.3f} ± 0.000 (blind '
          f'{result["blind_baseline"]["test"]:.3f})') in summary


def test_budget_is_the_finetuning_configs():
  finetune_config = baseline.config_base.config_module('finetune')
  for task in tasks.TASKS:
    ft = finetune_config.get_config(f'{task},small')
    c = baseline.baseline_config(task, 'small')
    assert (c.total_steps, c.batch_size, c.optim.lr) == (
        ft.total_steps, ft.batch_size, ft.optim.lr)
    assert finetune.splits_of(c) == finetune.splits_of(ft)
    assert c.world.to_dict() == ft.world.to_dict()
  assert baseline.baseline_config('vqa', 'small').total_steps == 1000
  c = baseline.baseline_config('ve', 'small', seed=2, steps=7, lr=3e-3)
  assert (c.seed, c.total_steps, c.optim.lr) == (2, 7, 3e-3)
  with pytest.raises(ValueError, match='visual'):
    baseline.baseline_config('ve', 'tiny', visual='lidar')


@pytest.mark.parametrize('bad,field', [('--seeds=0,x', '--seeds'),
                                       ('--steps=-1', '--steps'),
                                       ('--task=vqa2', '--task')])
def test_bad_flags_name_the_flag(bad, field, tmp_path, capsys):
  argv = ['--task=ve', f'--out={tmp_path}', bad]
  with pytest.raises(SystemExit):
    baseline.parse_args(argv)
  assert field in capsys.readouterr().err


def random_inputs(shapes, rows):
  """Model inputs of task_shapes `shapes` (zero_inputs' keys and dtypes),
  [rows, ...]: 4 words and the first 2 regions real, the rest padding."""
  rng = np.random.default_rng(0)
  inputs = {k: np.array(v) for k, v in zero_inputs(shapes, rows).items()}
  inputs['input_ids'][:, :4] = rng.integers(1000, 2000, (rows, 4))
  inputs['text_mask'][:, :4] = 1
  inputs['region_mask'][:, :2] = 1
  corner = rng.random((rows, 2, 2)) * 0.5
  inputs['region_boxes'][:, :2] = np.concatenate([corner, corner + 0.5], -1)
  if shapes.pixels:
    inputs['images'][:] = rng.integers(0, 256, inputs['images'].shape)
  else:
    inputs['region_feats'][:, :2] = rng.normal(
        size=inputs['region_feats'][:, :2].shape)
  return inputs


@pytest.mark.parametrize('task', tasks.TASKS)
@pytest.mark.parametrize('visual', ['regions', 'pixels'])
def test_output_shapes(task, visual):
  config = baseline.baseline_config(task, 'tiny', visual)
  shapes = task_pipeline.task_shapes(config)
  B, R, V, D = 3, shapes.max_regions, 7, config.model.hidden_dim
  model = baseline.make_model(config, num_answers=V)
  inputs = random_inputs(shapes, 2 * B if task == 'nlvr2' else B)
  params = baseline.init_params(model, config)
  out = jax.tree.map(np.asarray, model.apply({'params': params}, inputs))
  if task == 'retrieval':
    for key in ('itc_text', 'itc_image'):
      assert out[key].shape == (B, D)
      np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0,
                                 rtol=1e-5)
    assert out['itc_log_scale'].shape == ()
    return
  want = {'vqa': (B, V), 've': (B, 3), 'nlvr2': (B, 2), 'rec': (B, R)}
  assert out['logits'].shape == want[task]
  if task == 'rec':  # Padded region slots can never be chosen.
    assert np.all(out['logits'][:, 2:] == -1e9)
    assert np.all(out['logits'][:, :2] > -1e8)


# ------------------------------------------- a label only the image carries

def image_only_batch(rng, prototypes, rows, config):
  """ve batches whose label is which of 3 prototype vectors one of the
  real regions carries (on top of noise); the text is the same '[CLS] a
  [SEP]' in every row, so only the regions tell the label."""
  shapes = task_pipeline.task_shapes(config)
  R, T, F = shapes.max_regions, shapes.max_text_len, shapes.feature_dim
  label = rng.integers(0, 3, rows)
  num_regions = rng.integers(2, R + 1, rows)
  mask = (np.arange(R)[None] < num_regions[:, None]).astype(np.int32)
  feats = rng.normal(size=(rows, R, F)).astype(np.float32)
  slot = (rng.random(rows) * num_regions).astype(int)
  feats[np.arange(rows), slot] += prototypes[label]
  corner = rng.random((rows, R, 2)) * 0.5
  boxes = np.concatenate([corner, corner + 0.5], -1).astype(np.float32)
  ids = np.zeros((rows, T), np.int32)
  ids[:, :3] = (101, 1037, 102)
  return dict(input_ids=ids, text_mask=(ids > 0).astype(np.int32),
              region_feats=feats * mask[..., None],
              region_boxes=boxes * mask[..., None], region_mask=mask,
              label=label.astype(np.int32))


def test_learns_a_label_only_the_image_carries():
  steps = 60
  config = baseline.baseline_config('ve', 'tiny', steps=steps)
  rng = np.random.default_rng(0)
  prototypes = rng.normal(
      size=(3, config.model.region_feat_dim)).astype(np.float32)
  model = baseline.make_model(config)
  params = baseline.init_params(model, config)
  tx, _ = train_step.make_optimizer(config)
  opt_state = tx.init(params)
  step = baseline.make_train_step(model, config, tx)
  losses = []
  for _ in range(steps):
    params, opt_state, metrics = step(
        params, opt_state, image_only_batch(rng, prototypes, 32, config))
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

  held_out = image_only_batch(np.random.default_rng(1), prototypes, 256,
                              config)
  predict = lambda batch: np.argmax(model.apply(
      {'params': params}, finetune.model_inputs(batch, 've'))['logits'], -1)
  accuracy = np.mean(predict(held_out) == held_out['label'])
  # The same texts with each row's regions from another row: the labels no
  # longer follow the image, and neither may the predictions.
  perm = np.random.default_rng(2).permutation(256)
  shuffled = dict(held_out, **{k: held_out[k][perm] for k in (
      'region_feats', 'region_boxes', 'region_mask')})
  shuffled_accuracy = np.mean(predict(shuffled) == held_out['label'])
  assert accuracy > 0.8, accuracy  # Chance is 1/3.
  assert shuffled_accuracy < 0.5, shuffled_accuracy
