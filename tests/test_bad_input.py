"""Bad input fails early with a message that names what is wrong and where;
odd but valid input (long captions, images without regions) works."""

import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import (configlib, jobs, objectives, pretraining, sharding,
                      train_step)
from cmal_jax.data import pipeline, records, region_store
from cmal_jax.world import scenes
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.model.cmal import CMAL, ModelConfig
from configs import pretrain
import cmal_testutil
from cmal_testutil import F, good_pair, write_dataset
from cmal_testutil import tiny_with_data as tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(config, directory, batch_size=2):
  return cmal_testutil.read_all(config, directory, batch_size)


# ------------------------------------------------------------------ config

@pytest.mark.parametrize('override, field, hint', [
    ('--config.no_such_field=1', 'no_such_field', ''),
    ('--config.model.hiden_dim=3', 'hiden_dim',
     'Did you mean "hidden_dim"'),
    ('--config.nosuch.x=1', 'nosuch', ''),
])
def test_cli_unknown_config_field(tmp_path, override, field, hint):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'cmal_jax.main',
       '--config=configs/pretrain.py:tiny', f'--workdir={workdir}', override],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1
  # One line, like absl's own flag errors, naming the flag and the field.
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  flag = override.split('=')[0]
  assert proc.stderr.strip() == (
      f"FATAL Flags parsing error: {flag}: the config has no field "
      f"'{field}'. {hint}".rstrip() + (
          f' instead of "{field}"?' if hint else ''))
  assert not workdir.exists()  # Failed before doing anything.


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    pretrain.get_config('huge')
  with pytest.raises(ValueError, match="'cmcal'"):
    pretrain.get_config('tiny,cmcal')


def test_valid_configs_pass_validation():
  for arg in ('tiny', 'tiny,cmcl', 'small', 'base,cmal'):
    configlib.validate(pretrain.get_config(arg))  # No exception.


@pytest.mark.parametrize('field,value,message', [
    ('cmap.select_prob', 1.5,
     'config.cmap.select_prob=1.5: must be a probability in [0, 1]'),
    ('model.num_heads', 3,
     'config.model.num_heads=3: must divide model.hidden_dim=64'),
    ('data.max_text_len', 0, 'config.data.max_text_len=0'),
    ('loss.amc_targets', 'pair', "config.loss.amc_targets='pair'"),
    ('model.head_input', 'regions', "config.model.head_input='regions': "
     "must be one of ('cls', 'cls_and_regions')"),
])
def test_invalid_config_value(field, value, message):
  c = pretrain.get_config('tiny')
  group, name = field.split('.')
  c[group][name] = value
  with pytest.raises(ValueError) as e:
    configlib.validate(c)
  assert message in str(e.value)


def test_amc_without_cmap_is_rejected():
  c = pretrain.get_config('tiny')
  c.cmap.enabled = False
  with pytest.raises(ValueError, match=r'config\.loss\.amc=1\.0: AMC needs CMAP'):
    configlib.validate(c)


# -------------------------------------------------------------- vocabulary

def test_missing_vocabulary_load_tokenizer():
  with pytest.raises(FileNotFoundError) as e:
    load_tokenizer('/nonexistent/vocab.txt')
  assert '/nonexistent/vocab.txt' in str(e.value)
  assert 'data.vocab_path' in str(e.value)


def test_missing_vocabulary_train(tmp_path, world_dir):
  config = tiny(dir=world_dir, vocab_path='/nonexistent/vocab.txt')
  with pytest.raises(FileNotFoundError) as e:
    jobs.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '/nonexistent/vocab.txt' in str(e.value)
  assert 'data.vocab_path' in str(e.value)
  # It failed before building a model or a checkpoint manager.
  assert not (tmp_path / 'run' / 'checkpoints').exists()


# ------------------------------------------------------------ record files

@pytest.fixture
def world_copy(tmp_path, world_dir):
  d = tmp_path / 'data'
  d.mkdir()
  store = region_store.REGION_STORE_FILE  # The images the captions name.
  for name in ('meta.json', 'pretrain.array_record', store,
               store + region_store.INDEX_SUFFIX):
    shutil.copy(os.path.join(world_dir, name), d / name)
  return d


def test_copy_of_world_reads(world_copy):
  """Control for the two tests below: the intact copy reads fine."""
  ds, vocab, dropped = pipeline.make_dataset(
      tiny(), str(world_copy), 'pretrain', batch_size=256, train=False,
      seed=0)
  assert len(ds) == 4 and dropped == 0
  assert vocab.tags == scenes.WORLD_TAGS


def test_missing_record_file(world_copy):
  path = records.split_path(str(world_copy), 'pretrain')
  os.remove(path)
  with pytest.raises(FileNotFoundError) as e:
    pipeline.make_dataset(tiny(), str(world_copy), 'pretrain', batch_size=4,
                          train=True, seed=0)
  assert path in str(e.value)
  assert 'no such record file' in str(e.value)


def test_truncated_record_file(world_copy):
  path = records.split_path(str(world_copy), 'pretrain')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)
  with pytest.raises(records.RecordError) as e:
    pipeline.make_dataset(tiny(), str(world_copy), 'pretrain', batch_size=4,
                          train=True, seed=0)
  assert str(e.value).startswith(f'{path}: record ')
  assert 'truncated or corrupt' in str(e.value)


def test_meta_feature_dim_mismatch(world_copy):
  config = tiny()
  config.model.region_feat_dim = 32
  with pytest.raises(ValueError) as e:
    pipeline.make_dataset(config, str(world_copy), 'pretrain', batch_size=4,
                          train=True, seed=0)
  assert f'{world_copy}/meta.json' in str(e.value)
  assert 'feature_dim=64' in str(e.value)
  assert 'model.region_feat_dim=32' in str(e.value)


# ------------------------------------------------------------- bad records

def _drop_caption(p):
  del p['caption']


def _nan_feats(p):
  p['region_feats'][0, 5] = np.nan


def _inf_boxes(p):
  p['region_boxes'][-1, 2] = np.inf


def _narrow_feats(p):
  p['region_feats'] = p['region_feats'][:, :F // 2]


def _unknown_tag(p):
  p['region_tags'][0] = 'unicorn'


@pytest.mark.parametrize('corrupt,field,problem', [
    (_drop_caption, 'caption', 'missing'),
    (_nan_feats, 'region_feats', 'contains NaN or Inf'),
    (_inf_boxes, 'region_boxes', 'contains NaN or Inf'),
    (_narrow_feats, 'region_feats',
     f'feature width {F // 2} does not match config '
     f'model.region_feat_dim={F}'),
    (_unknown_tag, 'region_tags', 'tag not in the vocabulary (meta.json)'),
])
def test_bad_record(tmp_path, corrupt, field, problem):
  pairs = [good_pair(i) for i in range(6)]
  corrupt(pairs[3])
  path = write_dataset(tmp_path, pairs)
  with pytest.raises(records.RecordError) as e:
    read_all(tiny(), tmp_path)
  msg = str(e.value)
  assert msg.startswith(f"{path}: record 3: field '{field}': {problem}"), msg
  if corrupt is _unknown_tag:
    assert 'unicorn' in msg
  else:
    assert msg == f"{path}: record 3: field '{field}': {problem}"
  assert (e.value.path, e.value.index, e.value.field) == (path, 3, field)


def test_good_records_read(tmp_path):
  """Control for test_bad_record: the same six pairs, unmodified, read."""
  write_dataset(tmp_path, [good_pair(i) for i in range(6)])
  batches = read_all(tiny(), tmp_path)
  assert len(batches) == 3
  assert sum(int(b['stats']['examples'].sum()) for b in batches) == 6


# ---------------------------------------------------- odd but valid input

LONG = ('a small red circle above a large blue square to the left of a '
        'green triangle next to a yellow star below a purple hexagon and an '
        'orange diamond on a striped background.')


def test_long_caption_is_truncated_and_counted():
  config = tiny()
  shapes = Shapes.from_config(config)
  T = shapes.max_text_len
  tok = load_tokenizer(None)
  assert len(tok.encode(LONG, 1000).ids) > T + 5  # Really too long.
  from cmal_jax.data import anchors
  vocab = anchors.TagVocab(scenes.WORLD_TAGS, scenes.WORLD_SYNONYMS)
  image = pipeline.decode_pair(
      records.encode_record(good_pair(0)), path='x', index=0, shapes=shapes,
      vocab=vocab)

  arrays, stats = pipeline.encode_pair(LONG, image, tok, vocab, shapes)
  assert stats['captions_truncated'] == 1
  assert arrays['input_ids'].shape == (T,)
  assert arrays['text_mask'].tolist() == [1] * T  # Filled to the brim.
  assert arrays['input_ids'][0] == tok.cls_id
  assert arrays['input_ids'][-1] == tok.sep_id
  assert arrays['region_feats'].shape == (shapes.max_regions, F)
  assert arrays['anchor_valid'].shape == (shapes.max_anchors,)
  # Anchors point inside the kept text only.
  pos = arrays['anchor_text_pos'][arrays['anchor_valid']]
  assert np.all((pos > 0) & (pos < T - 1))

  short, stats = pipeline.encode_pair('a red circle.', image, tok, vocab,
                                      shapes)
  assert stats['captions_truncated'] == 0
  assert short['input_ids'].shape == (T,)
  assert short['text_mask'].sum() == len(tok.encode('a red circle.', T).ids)


def test_long_caption_counted_in_batch_stats(tmp_path):
  pairs = [good_pair(i) for i in range(4)]
  for p, caption in zip(pairs, ('a red circle.', 'two blue squares.', LONG,
                                'a star to the left of a ring.')):
    p['caption'] = caption
  write_dataset(tmp_path, pairs)
  config = tiny(itm_neg_prob=0.0)  # Every example keeps its own caption.
  (batch,) = read_all(config, tmp_path, batch_size=4)
  np.testing.assert_array_equal(batch['stats']['captions_truncated'],
                                [0, 0, 1, 0])
  np.testing.assert_array_equal(batch['stats']['examples'], [1, 1, 1, 1])
  np.testing.assert_array_equal(batch['stats']['itm_negatives'], [0] * 4)
  assert batch['input_ids'].shape == (4, config.data.max_text_len)
  assert batch['text_mask'][2].all() and not batch['text_mask'][0].all()


def _no_regions(i):
  p = good_pair(i)
  p.update(region_feats=np.zeros((0, F), np.float32),
           region_boxes=np.zeros((0, 4), np.float32), region_tags=[],
           region_conf=np.zeros((0,), np.float32))
  return p


def test_image_without_regions_trains(tmp_path, compilation_cache):
  config = tiny(itm_neg_prob=0.0)
  # Batches of 8 on the tiny config, jitted as test_reliability's
  # non-finite step test does: one compile for both (session XLA cache).
  pairs = [_no_regions(0)] + [good_pair(i) for i in range(1, 8)]
  pairs += [_no_regions(i) for i in range(8, 16)]
  write_dataset(tmp_path, pairs)
  mixed, empty = read_all(config, tmp_path, batch_size=8)

  # The empty image: a valid example with no regions and so no anchors.
  assert mixed['region_mask'][0].tolist() == [0] * config.data.max_regions
  assert not mixed['anchor_valid'][0].any()
  assert (mixed['region_tags'][0] == -1).all()
  assert (mixed['region_feats'][0] == 0).all()
  assert mixed['text_mask'][0].sum() > 2  # Its caption is still there.
  assert mixed['region_mask'][1:].sum(1).min() > 0  # The others have some.
  assert mixed['anchor_valid'][1:].any()
  assert int(empty['region_mask'].sum()) == 0

  tok = load_tokenizer(None)
  specials = objectives.SpecialTokens.from_tokenizer(tok)
  model = CMAL(ModelConfig.from_config(config.model, len(scenes.WORLD_TAGS)))
  init_inputs, loss_fn = pretraining.pretrain_objectives(model, config,
                                                        specials)
  tx, schedule = train_step.make_optimizer(config)
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules(config)
  state, _ = train_step.create_train_state(
      model, init_inputs, pipeline.STAT_KEYS, tx, config, mesh, rules)
  step = jax.jit(train_step.make_train_step(loss_fn, config, schedule))
  for batch in (mixed, empty):
    batch = jax.tree.map(jnp.asarray, batch)
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    for k, v in metrics.items():
      assert math.isfinite(float(v)), (k, v)
    assert float(metrics['loss']) > 0
    assert float(metrics['grad_norm']) > 0
    leaves = jax.tree.leaves(new_state.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  # The all-empty batch has nothing to pair: no AMC anchors were counted.
  assert float(metrics['amc_anchors']) == 0
