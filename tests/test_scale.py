"""Scale-out pieces on one device: gradient accumulation, the sharding
config's start-up errors, compile_only, process-count-invariant batches and
the coordinator timeout. (8 devices: test_sharding.py; 2 processes:
test_multihost.py.)"""

import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from cmal_jax import (configlib, jobs, main, objectives, pretraining, sharding,
                      train_step)
from cmal_jax.data import pipeline
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_testutil import SHARED_STEPS, random_batch, shared_tiny, shrink
from configs import pretrain

SPECIALS = objectives.SpecialTokens(0, 101, 102, 103, 30522)


# --------------------------------------------------- gradient accumulation

def test_micro_batches_take_every_kth_row():
  batch = {'x': np.arange(12).reshape(12, 1)}
  micro = train_step.split_micro_batches(batch, 4)['x']
  assert micro.shape == (4, 3, 1)
  np.testing.assert_array_equal(micro[1, :, 0], [1, 5, 9])


def test_accumulating_4_micro_batches_equals_one_batch():
  # Shrunk: accumulation does not reach inside the layers.
  c = shrink(pretrain.get_config('tiny'))
  c.model.dropout = 0.0  # Dropout draws differ per micro-batch by design.
  c.loss.mrc = 0.5  # Every objective but ITC (whose negatives are in-batch).
  B = 16
  batch = random_batch(0, B, c.data.max_text_len, c.data.max_regions,
                       c.data.max_anchors, c.model.region_feat_dim)
  batch.pop('stats')
  model = CMAL(ModelConfig.from_config(c.model, num_tags=10))
  init_inputs, loss = pretraining.pretrain_objectives(model, c, SPECIALS)
  params = model.init(jax.random.key(0), init_inputs(jax.random.key(0)))
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x,
                        params['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  run = jax.jit(lambda p, b, n: train_step.loss_and_grads(
      loss, p, b, jax.random.key(1), n), static_argnums=2)
  grads1, metrics1 = run(params, batch, 1)
  grads4, metrics4 = run(params, batch, 4)
  assert metrics1['amc_anchors'] > 0 and metrics1['loss_mrc'] > 0
  assert set(metrics1) == set(metrics4)
  for k in metrics1:
    np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=1e-5,
                               atol=1e-6, err_msg=k)
  leaves1, leaves4 = jax.tree.leaves(grads1), jax.tree.leaves(grads4)
  # Every parameter's gradient is compared.
  assert len(leaves1) == len(leaves4) == len(jax.tree.leaves(params)) > 30
  scale = max(float(np.max(np.abs(g))) for g in leaves1)
  for g1, g4 in zip(leaves1, leaves4):
    np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------- sharding config errors

def config_with(**fields):
  c = pretrain.get_config('tiny')
  for k, v in fields.items():
    target = c
    *path, last = k.split('__')
    for p in path:
      target = target[p]
    target[last] = v
  return c


@pytest.mark.parametrize('fields,devices,message', [
    (dict(sharding='zero3'), 8, "config.sharding='zero3': no such preset"),
    (dict(sharding='custom'), 8, 'rules are given exactly when'),
    (dict(axis_rules=(('batch', 'data'),)), 8, 'rules are given exactly when'),
    (dict(mesh__shape=(2, 2, 1)), 8, 'needs 4 devices, found 8'),
    (dict(mesh__shape=(3, -1, 1)), 8, '8 devices are not divisible by 3'),
    (dict(mesh__shape=(4, 1, 2)), 8,
     "the tensor axis has 2 devices but config.sharding='dp' maps nothing"),
    (dict(sharding='dp_tp'), 8, "config.sharding='dp_tp' needs "
     'config.mesh.shape'),
    (dict(sharding='dp_tp', mesh__shape=(2, 1, 4)), 8,
     'model.num_heads=2 is not divisible by the 4 devices of mesh axis '
     'tensor'),
    (dict(sharding='fsdp', mesh__shape=(1, 3, 1)), 3,
     'model.hidden_dim=64 is not divisible by the 3 devices of mesh axis '
     'fsdp'),
])
def test_bad_sharding_config_fails_at_start_up(fields, devices, message):
  with pytest.raises(ValueError) as e:
    sharding.check_config(config_with(**fields), devices)
  assert message in str(e.value)


def test_preset_default_shapes_and_custom_rules():
  assert sharding.check_config(config_with(), 8) == (8, 1, 1)
  assert sharding.check_config(config_with(sharding='fsdp'), 8) == (1, 8, 1)
  custom = config_with(sharding='custom', mesh__shape=(-1, 1, 1),
                       axis_rules=(('batch', 'data'), ('embed', None)))
  assert sharding.check_config(custom, 4) == (4, 1, 1)
  assert sharding.rules(custom) == (('batch', 'data'), ('embed', None))
  fsdp_tp = dict(sharding.rules(config_with(sharding='fsdp_tp')))
  assert fsdp_tp['heads'] == fsdp_tp['mlp'] == 'tensor'
  # dp_tp: fsdp_tp's rules (test_sharding.py runs those on 8 devices) with
  # the width whole.
  dp_tp = dict(sharding.rules(config_with(sharding='dp_tp')))
  assert dp_tp == dict(fsdp_tp, embed=None) and fsdp_tp['embed'] == 'fsdp'


def test_batch_not_divisible_by_the_batch_shards():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  assert sharding.per_process_batch_size(32, mesh) == 32
  fake = type('Mesh', (), {'shape': {'data': 3, 'fsdp': 2, 'tensor': 1}})
  with pytest.raises(ValueError, match=r'config.batch_size=32 is not '
                     r'divisible by the 6 batch shards \(data x fsdp\)'):
    sharding.per_process_batch_size(32, fake)


@pytest.mark.parametrize('fields,message', [
    (dict(model__remat='some'), "config.model.remat='some': must be one of"),
    (dict(grad_accum_steps=3), 'config.grad_accum_steps=3: must divide '
     'config.batch_size=32'),
    (dict(grad_accum_steps=0), 'must be a positive integer'),
    (dict(data__itm_group=0), 'config.data.itm_group=0'),
    (dict(mesh__shape=(2, 2)), 'config.mesh.shape=(2, 2): needs 3 entries'),
])
def test_bad_scale_fields_fail_validation(fields, message):
  with pytest.raises(ValueError) as e:
    configlib.validate(config_with(**fields))
  assert message in str(e.value)


def test_itm_group_must_divide_the_process_batch(world_dir, tmp_path):
  c = config_with(data__dir=world_dir, data__itm_group=5)
  with pytest.raises(ValueError, match=r'config.data.itm_group=5 must divide '
                     r'the per-process batch of config.batch_size \(32 rows'):
    jobs.train_and_evaluate(c, str(tmp_path))


# ------------------------------------------------ process-invariant data

def test_global_batches_do_not_depend_on_the_process_count(world_dir):
  c = pretrain.get_config('tiny')
  c.data.itm_group = 4
  one = pipeline.make_dataset(c, world_dir, 'pretrain', batch_size=16,
                              train=True, seed=3)[0]
  four = [pipeline.make_dataset(c, world_dir, 'pretrain', batch_size=4,
                                train=True, seed=3, process_index=p,
                                process_count=4)[0] for p in range(4)]
  for k in (0, 1, 70):  # 70: past the first epoch (1024 / 16 = 64).
    want = one[k]
    for key in ('input_ids', 'region_feats', 'itm_label', 'anchor_region'):
      np.testing.assert_array_equal(
          np.concatenate([ds[k][key] for ds in four]), want[key],
          err_msg=f'{key} of batch {k}')
  assert 0 < one[0]['itm_label'].sum() < 16  # Negatives were drawn.


def test_eval_pass_drops_only_the_last_partial_global_batch(world_dir):
  c = pretrain.get_config('tiny')  # 128 val pairs.
  ds, _, dropped = pipeline.make_dataset(
      c, world_dir, 'val', batch_size=20, train=False, seed=0,
      process_index=1, process_count=2)
  assert dropped == 128 % 40 and len(ds) == 128 // 40


# ----------------------------------------------------------- compile_only

def test_compile_only_reports_memory_and_flops(world_dir, tmp_path,
                                               compilation_cache):
  # The program of the suite's shared tiny runs, loaded from the cache.
  c = shared_tiny(world_dir, compile_only=True)
  report = jobs.train_and_evaluate(c, str(tmp_path))
  assert report['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert report['devices'] == 1 and report['sharding'] == 'dp'
  # Adam's two moments: the state is about three times the parameters.
  assert report['parameters'] * 4 == report['params_bytes']
  assert 3 * report['params_bytes'] < report['state_bytes'] < (
      3.1 * report['params_bytes'])
  assert report['argument_bytes'] >= report['state_bytes']
  assert report['temp_bytes'] > 0 and report['peak_bytes'] > (
      report['state_bytes'])
  assert report['flops_per_step'] > 1e8
  with open(tmp_path / 'compile.json') as f:
    assert json.load(f) == report
  assert not os.path.exists(tmp_path / 'checkpoints')  # Nothing trained.
  # Four micro-batches: the same FLOPs per step (XLA's count of the loop
  # body is not taken as the step's), fewer live activations.
  c = config_with(data__dir=world_dir, total_steps=SHARED_STEPS,
                  compile_only=True, grad_accum_steps=4)
  micro = jobs.train_and_evaluate(c, str(tmp_path / 'micro'))
  assert micro['state_bytes'] == report['state_bytes']
  assert micro['temp_bytes'] < report['temp_bytes']
  np.testing.assert_allclose(micro['flops_per_step'],
                             report['flops_per_step'], rtol=0.1)


# -------------------------------------------------------------- multi-host

def test_unreachable_coordinator_fails_with_its_address():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # Closed again: nothing listens there.
  with pytest.raises(SystemExit) as e:
    main.wait_for_coordinator(f'127.0.0.1:{port}', timeout=1)
  assert f'could not reach the coordinator 127.0.0.1:{port} within 1s' in (
      str(e.value))


# -------------------------------------------------------------- launchers

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'launch')


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'slurm_gpu.sbatch',
                                    'local.sh'])
def test_launch_scripts_parse(script):
  proc = subprocess.run(['bash', '-n', os.path.join(LAUNCH, script)],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'usage: '),
    (['tpu', 'zone', 'runs/x'], 'WORKDIR must be gs://... (shared by all '
     'workers), got runs/x'),
])
def test_tpu_pod_script_checks_its_arguments_before_gcloud(args, message):
  proc = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), *args],
                        capture_output=True, text=True,
                        env=dict(os.environ, PATH='/usr/bin:/bin'))
  assert proc.returncode == 2 and message in proc.stderr
