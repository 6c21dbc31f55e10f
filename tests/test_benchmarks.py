"""The benchmark's PyTorch step computes what the JAX step computes (losses
and gradients of every pre-training objective), and a one-step smoke run of
`python -m cmal_jax.benchmarks` on tiny writes its table and JSON. No
timing is asserted here."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from flax import traverse_util

from cmal_jax import objectives, train_step
from cmal_jax.benchmarks import convert_memory, run, torch_step
from cmal_jax.data import pipeline
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.export import export, torch_model, torch_objectives
from cmal_jax.model import torch_names
from cmal_jax.model.cmal import CMAL, ModelConfig
from configs import pretrain


def tiny_config(world_dir, **loss):
  c = pretrain.get_config('tiny')
  c.data.dir = world_dir
  c.model.dropout = 0.0  # Deterministic in both frameworks.
  c.loss.update(loss)
  return c


def corrupted_batch(config, world_dir):
  """A real pipeline batch of 8, corrupted as in training (CMAP on)."""
  ds, vocab, _ = pipeline.make_dataset(config, world_dir, 'pretrain',
                                       batch_size=8, train=False, seed=0)
  batch = {k: v for k, v in ds[0].items() if k != 'stats'}
  specials = objectives.SpecialTokens.from_tokenizer(load_tokenizer())
  inputs, targets = jax.device_get(objectives.prepare_inputs(
      batch, jax.random.key(3), config, specials))
  return inputs, targets, vocab.num_tags


@pytest.mark.parametrize('loss', [dict(), dict(mrc=1.0, itc=1.0,
                                                amc_targets='pairing')])
def test_torch_losses_and_gradients_match_jax(world_dir, loss):
  config = tiny_config(world_dir, **loss)
  inputs, targets, num_tags = corrupted_batch(config, world_dir)
  assert np.sum(targets['amc_weights']) > 0  # Anchors are swapped.
  model = CMAL(ModelConfig.from_config(config.model, num_tags))
  params = jax.jit(lambda r: nn.unbox(model.init(r, inputs)['params']))(
      jax.random.key(0))

  def jax_loss(p):
    return objectives.compute_losses(model.apply({'params': p}, inputs),
                                     targets, config)
  (loss_j, metrics_j), grads_j = jax.jit(
      jax.value_and_grad(jax_loss, has_aux=True))(params)

  mirror = torch_model.CMAL(export.export_config(config, params))
  mirror.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in
                          torch_names.to_torch_state(params).items()})
  mirror.train()  # Dropout is 0, so train mode computes the same.
  loss_t, metrics_t = torch_objectives.compute_losses(
      mirror(torch_step.to_torch(inputs)), torch_step.to_torch(targets),
      config.loss)
  loss_t.backward()

  assert set(metrics_t) == set(metrics_j)
  expected = {'loss_amc_pair', 'loss_mlm', 'loss_itm'} | (
      {'loss_mrc', 'loss_itc'} if 'itc' in loss else {'loss_amc_label'})
  assert {k for k in metrics_j if k.startswith('loss_')} == expected
  for k in metrics_j:
    np.testing.assert_allclose(metrics_t[k].item(), float(metrics_j[k]),
                               atol=1e-5, rtol=1e-5, err_msg=k)
  torch_grads = {n: p.grad.numpy() for n, p in mirror.named_parameters()
                 if p.grad is not None}
  jax_grads = torch_names.to_torch_state(jax.device_get(grads_j))
  assert set(torch_grads) <= set(jax_grads)
  # Parameters the losses do not reach have zero gradients in JAX.
  for name, g in jax_grads.items():
    np.testing.assert_allclose(torch_grads.get(name, np.zeros_like(g)), g,
                               atol=2e-5, rtol=1e-4, err_msg=name)
  assert len(torch_grads) > 50


def test_no_decay_matches_the_jax_decay_mask(world_dir):
  config = tiny_config(world_dir)
  inputs, _, num_tags = corrupted_batch(config, world_dir)
  params = nn.unbox(jax.eval_shape(  # Names and shapes are enough.
      CMAL(ModelConfig.from_config(config.model, num_tags)).init,
      jax.random.key(0), inputs)['params'])
  decays = {torch_names.torch_name(k)[0]: d for k, d in traverse_util.flatten_dict(
      train_step.decay_mask(params), sep='/').items()}
  assert {n for n, d in decays.items() if not d} == {
      n for n in decays if torch_step.no_decay(n)}
  assert sum(not d for d in decays.values()) > 10


# A whole benchmark run (~33 s of the default suite's 10 minutes): with the
# other whole runs, under `pytest -m slow`.
@pytest.mark.slow
def test_benchmark_smoke_run_writes_the_table(world_dir, tmp_path,
                                              compilation_cache):
  # The cache serves the paper estimate's compile of the same step.
  out = tmp_path / 'out'
  run.main(['--sizes=tiny', '--steps=1', '--warmup=0', '--peak_n=128',
            # CMAP off is the same JaxStep on another config; skipping its
            # compile keeps the suite inside its time budget.
            '--no-torch_compile', '--no-cmap_off', '--no-default_program',
            '--pipeline_sizes=tiny',
            '--pipeline_batches=2', '--paper_size=tiny',
            '--predict_sizes=tiny',
            f'--records={world_dir}', f'--data_dir={tmp_path / "data"}',
            f'--out_dir={out}'])
  result = json.loads((out / 'BENCHMARKS.json').read_text())
  rows = {(r['name'], r['size']): r for r in result['measurements']}
  for name in ('jax_step_time', 'jax_examples_per_sec', 'jax_mfu',
               'flops_per_step', 'jax_compile_time',
               'torch_eager_examples_per_sec', 'jax_over_torch_eager',
               'pipeline_examples_per_sec',
               'pipeline_over_step_consumption', 'paper_flops_per_step',
               'paper_H100 SXM_step_time_roofline'):
    assert (name, 'tiny') in rows, name
    assert isinstance(rows[name, 'tiny']['value'], float), name
  assert rows['flops_per_step', 'tiny']['value'] > 1e6
  assert rows['jax_examples_per_sec', 'tiny']['value'] > 0
  # Timed at the CPU batch, estimated at the config batch (32 both, tiny).
  assert rows['jax_step_time', 'tiny']['batch'] == 32
  assert rows['paper_flops_per_step', 'tiny']['batch'] == 32
  # predict: latency at batch 1, questions/s at 1 and at eval.batch_size.
  got = {(r['name'], r['batch']): r['value'] for r in result['measurements']
         if r['name'].startswith('predict_')}
  assert set(got) == {('predict_first_call_time', 1), ('predict_latency', 1),
                      ('predict_questions_per_sec', 1),
                      ('predict_questions_per_sec', 16),
                      ('predict_batch_over_batch_1', 16)}
  assert all(v > 0 for v in got.values())
  assert result['machine']['cores'] == os.cpu_count()
  table = (out / 'BENCHMARKS.md').read_text()
  assert '| jax_over_torch_eager | tiny |' in table
  assert '**Machine:**' in table


def test_convert_memory_measures_a_fresh_conversion(tmp_path):
  # The TSV it writes is converted in a child process that reports its RSS.
  rows = convert_memory.run([3], num_boxes=4, feature_dim=8,
                            directory=str(tmp_path), float16=True, keep=True)
  assert len(rows) == 1
  row = rows[0]
  assert (row['images'], row['skipped'], row['num_boxes'],
          row['feature_dim'], row['float16']) == (3, {}, 4, 8, True)
  assert row['peak_rss_mb'] >= row['rss_after_import_mb'] > 0
  assert row['tsv_gb'] * 1e9 == os.path.getsize(tmp_path / 'features_3.tsv')
  assert (tmp_path / 'store_3').is_dir()


def test_convert_memory_refuses_what_the_disk_cannot_hold(tmp_path):
  with pytest.raises(SystemExit, match='need ~.* GB free: lower --feature_dim'):
    convert_memory.run([10**9], num_boxes=36, feature_dim=2048,
                       directory=str(tmp_path), float16=False, keep=False)


def test_interleaved_times_the_last_step_of_each_turn():
  """Each turn runs `rewarm` untimed steps, then the timed one; warm-up
  rounds are not timed; every contender gets the same number of turns."""
  calls = {'a': [], 'b': []}

  def step(name):
    def run_once():
      calls[name].append(len(calls[name]))
      return float(len(calls[name]))  # 1, 2, 3, ... per contender.
    return run_once

  t = run.interleaved({n: step(n) for n in calls}, rounds=3, warmup=1,
                      pause=0.0, rewarm=1)
  assert {n: len(c) for n, c in calls.items()} == {'a': 8, 'b': 8}
  # Timed: the 2nd step of turns 2-4, i.e. call numbers 4, 6, 8.
  assert t['a'] == t['b'] == dict(median=6.0, min=4.0, max=8.0)
