"""SemVLP (configs/pretrain.py:tiny,semvlp): the cross-attention sub-layer
of the unified encoder, the two-stream masks, the schedule that alternates
single- and two-stream steps, the config checks, and one short pre-training
run fine-tuned from.

The model-level tests share one tiny pre-training model (D = 16, a 512-word
vocabulary) whose parameters are initialised once (module fixture); every
program is compiled once. The end-to-end runs use the tiny config with
fewer layers (shrink), as test_semmim.py.
"""

import functools
import json
import math
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import checkpoint, configlib, jobs, objectives, pretraining
from cmal_jax.model.cmal import CMAL, ENCODER_PARAMS, ModelConfig
from cmal_jax.model.unified import two_stream_masks
from cmal_jax.recipes import semvlp
from cmal_testutil import (CLS, MASK, PAD, SEP, fast_step, finetune_tiny,
                            random_batch, shrink)
from configs import pretrain

VOCAB_SIZE = 512  # A small vocabulary: the heads compile fast.
SPECIALS = objectives.SpecialTokens(PAD, CLS, SEP, MASK, VOCAB_SIZE)
B, T, R, K, F = 4, 12, 6, 3, 8
UNIFIED_LAYERS = 2
CROSS = ('cross_attention', 'cross_attention_norm')
# Pre-training outputs read from the text slots of the unified encoder.
TEXT_OUTPUTS = ('mlm_logits', 'itm_logits', 'amc_word_logits')


def model_config(cross_attention, two_stream=False):
  return ModelConfig(hidden_dim=16, num_heads=2, mlp_dim=32, text_layers=0,
                     vision_layers=0, unified_layers=UNIFIED_LAYERS,
                     dropout=0.1, vocab_size=VOCAB_SIZE, num_tags=10,
                     max_position=32, cross_attention=cross_attention,
                     two_stream=two_stream)


def host_batch(seed, empty_row=None):
  """random_batch with word ids in the small vocabulary; empty_row: that
  row's image has no regions at all."""
  batch = random_batch(seed, B, T, R, K, F)
  del batch['stats']
  ids = batch['input_ids']
  batch['input_ids'] = np.where(ids >= 1000, 110 + ids % 400, ids).astype(
      np.int32)
  if empty_row is not None:
    for key, fill in (('region_feats', 0), ('region_boxes', 0),
                      ('region_mask', 0), ('region_tags', -1),
                      ('anchor_valid', False), ('anchor_region', 0)):
      batch[key][empty_row] = fill
  return batch


@functools.lru_cache(maxsize=None)
def _jitted_prepare():
  config = pretrain.get_config('tiny,semvlp')
  return jax.jit(lambda batch, rng: objectives.prepare_inputs(
      batch, rng, config, SPECIALS))


def make_inputs(seed=0, empty_row=None):
  """(inputs, targets) of the semvlp recipe's corruption (MLM + MRC)."""
  return jax.device_get(_jitted_prepare()(host_batch(seed, empty_row),
                                          jax.random.key(seed)))


@pytest.fixture(scope='module')
def semvlp_model():
  """(model with the cross-attention sub-layer, its params, inputs)."""
  model = CMAL(model_config(True))
  inputs, _ = make_inputs()
  params = jax.jit(lambda rng: nn.unbox(model.init(rng, inputs))['params'])(jax.random.key(0))
  return model, jax.device_get(params), inputs


def without_cross(params):
  """The parameters of the same model without the sub-layer."""
  unified = {name: {k: v for k, v in layer.items() if k not in CROSS}
             for name, layer in params['unified'].items()}
  return {**params, 'unified': unified}


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, two_stream):
  """One compilation per (model, mode), reused across tests."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x,
                                          two_stream=two_stream))


def changed(a, b):
  """Whether b differs from a beyond float32 rounding: by 1e-4 of a's scale
  (at init the heads' logits are small: ITM's are ~5e-3)."""
  return float(np.abs(a - b).max()) > 1e-4 * float(np.abs(a).max())


def run(model, params, inputs, two_stream):
  """The pre-training heads' outputs, as host arrays."""
  return jax.device_get(_jitted_apply(model, two_stream)(params, inputs))


# ------------------------------------------------------------- the model

def test_init_creates_the_cross_attention_sub_layer(semvlp_model):
  _, params, _ = semvlp_model
  for i in range(UNIFIED_LAYERS):
    layer = params['unified'][f'layer_{i}']
    assert set(CROSS) <= set(layer), sorted(layer)
    # Its own parameters, shaped as self-attention's.
    assert jax.tree.map(np.shape, layer['cross_attention']) == jax.tree.map(
        np.shape, layer['attention'])
  # The sub-layer lives in the unified encoder only.
  assert 'cross_attention' not in str(jax.tree_util.tree_structure(
      params['vision_encoder']))


def test_single_stream_is_exactly_the_model_without_cross_attention(
    semvlp_model):
  model, params, inputs = semvlp_model
  with_cross = run(model, params, inputs, two_stream=False)
  plain_model = CMAL(model_config(False))
  # two_stream=None: the config's mode, single-stream here.
  plain = run(plain_model, without_cross(params), inputs, two_stream=None)
  assert set(with_cross) == set(plain) and 'mrc_logits' in plain
  for key in plain:
    np.testing.assert_array_equal(with_cross[key], plain[key], err_msg=key)
  # The plain model has no sub-layer to run two-stream with.
  with pytest.raises(ValueError, match='cross_attention=False'):
    jax.eval_shape(lambda p: plain_model.apply({'params': p}, inputs,
                                               two_stream=True),
                   without_cross(params))


def test_two_stream_differs_and_the_config_picks_the_mode(semvlp_model):
  model, params, inputs = semvlp_model
  single = run(model, params, inputs, False)
  two = run(model, params, inputs, True)
  for key in TEXT_OUTPUTS + ('mrc_logits',):
    assert np.isfinite(two[key]).all(), key
    assert changed(two[key], single[key]), key
  # A model whose config says two-stream runs it when the call does not say.
  two_model = CMAL(model_config(True, two_stream=True))
  by_config = run(two_model, params, inputs, None)
  for key in two:
    np.testing.assert_array_equal(by_config[key], two[key], err_msg=key)


def test_two_stream_masks_on_a_small_example():
  text_mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  region_mask = jnp.array([[1, 0], [0, 0]])
  self_mask, cross_mask = map(np.asarray,
                              two_stream_masks(text_mask, region_mask))
  assert self_mask.shape == cross_mask.shape == (2, 5, 5)
  # Every query row: self = the real keys of its own modality, cross = those
  # of the other one (slots 0-2 text, 3-4 regions).
  expected_self = np.array([
      [[1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 0]] * 2,
      [[1, 0, 0, 0, 0]] * 3 + [[0, 0, 0, 0, 0]] * 2])
  expected_cross = np.array([
      [[0, 0, 0, 1, 0]] * 3 + [[1, 1, 0, 0, 0]] * 2,
      [[0, 0, 0, 0, 0]] * 3 + [[1, 0, 0, 0, 0]] * 2])
  np.testing.assert_array_equal(self_mask, expected_self)
  np.testing.assert_array_equal(cross_mask, expected_cross)
  # Together they allow exactly what single-stream's key mask does.
  keys = np.concatenate([text_mask, region_mask], 1)
  np.testing.assert_array_equal(self_mask + cross_mask,
                                np.broadcast_to(keys[:, None], (2, 5, 5)))


def test_two_stream_text_sees_regions_only_through_cross_attention(
    semvlp_model):
  model, params, inputs = semvlp_model
  # Other images: each row's region features are another row's.
  other = dict(inputs, region_feats=inputs['region_feats'][::-1])

  def text_change(p, two_stream):
    """Per text output: (changed beyond rounding, largest change)."""
    a, b = run(model, p, inputs, two_stream), run(model, p, other, two_stream)
    return {k: (changed(a[k], b[k]), float(np.abs(a[k] - b[k]).max()))
            for k in TEXT_OUTPUTS}

  # The sub-layer on: the caption reads the image.
  assert all(c for c, _ in text_change(params, True).values())
  # The sub-layer's output projection zeroed: it adds nothing, and the text
  # slots no longer depend on the regions at all (self-attention stays
  # within the caption), bitwise.
  silent = jax.tree.map(lambda x: x, params)  # New dicts, same arrays.
  for i in range(UNIFIED_LAYERS):
    cross = silent['unified'][f'layer_{i}']['cross_attention']
    cross['out_kernel'] = np.zeros_like(cross['out_kernel'])
    cross['out_bias'] = np.zeros_like(cross['out_bias'])
  assert all(d == 0.0 for _, d in text_change(silent, True).values())
  # Single-stream with the same parameters mixes them in self-attention.
  assert all(c for c, _ in text_change(silent, False).values())


def test_image_without_regions_has_finite_gradients_in_two_stream_mode(
    semvlp_model):
  """Regression: the caption's cross-attention to an image with no regions
  used to read the padding slots, whose zero-variance LayerNorm inputs sent
  gradients of ~1e20."""
  model, params, _ = semvlp_model
  inputs, targets = make_inputs(seed=1, empty_row=0)
  assert int(inputs['region_mask'][0].sum()) == 0
  config = pretrain.get_config('tiny,semvlp')

  def loss(p):
    out = model.apply({'params': p}, inputs, two_stream=True)
    return objectives.compute_losses(out, targets, config)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert math.isfinite(float(value))
  assert all(np.isfinite(g).all() for g in leaves)
  biggest = max(float(np.abs(g).max()) for g in leaves)
  assert biggest < 1e3, biggest


# ----------------------------------------------------- schedule and config

def test_two_stream_step_alternates():
  assert [bool(semvlp.two_stream_step(s, 2)) for s in range(6)] == [
      False, True, False, True, False, True]
  assert [bool(semvlp.two_stream_step(s, 3)) for s in range(6)] == [
      False, False, True, False, False, True]
  # Traced steps (as in the jitted train step) give the same.
  steps = jnp.arange(6, dtype=jnp.int32)
  np.testing.assert_array_equal(
      jax.jit(lambda s: semvlp.two_stream_step(s, 2))(steps),
      [False, True, False, True, False, True])


def test_prepared_batch_carries_the_mode_of_the_step():
  config = pretrain.get_config('tiny,semvlp')
  assert config.two_stream_every == 2 and config.model.cross_attention
  model = CMAL(model_config(True))
  _, loss = pretraining.pretrain_objectives(model, config, SPECIALS)
  batch = host_batch(0)
  # The state as the train step passes it; only its step is read here.
  prepare = jax.jit(lambda batch, step: loss.prepare(
      batch, jax.random.key(0),
      types.SimpleNamespace(step=step, extra=None)))
  for step in range(4):
    prepared = prepare(batch, jnp.int32(step))
    assert set(prepared) == {'inputs', 'targets', 'two_stream'}
    np.testing.assert_array_equal(prepared['two_stream'], [step % 2 == 1] * B)
  # Outside a train step (no state): the config's mode, single-stream.
  no_state = jax.eval_shape(loss.prepare, batch, jax.random.key(0), None)
  assert no_state['two_stream'].shape == (B,)
  np.testing.assert_array_equal(
      jax.jit(lambda b: loss.prepare(b, jax.random.key(0), None)[
          'two_stream'])(batch), [False] * B)
  # Without the schedule the prepared batch carries no mode.
  config.two_stream_every = 0
  _, plain = pretraining.pretrain_objectives(model, config, SPECIALS)
  assert 'two_stream' not in jax.eval_shape(plain.prepare, batch,
                                            jax.random.key(0), None)


def test_config_checks_name_the_field():
  config = pretrain.get_config('tiny,semvlp')
  configlib.validate(config)  # The recipe itself is valid.
  for value in (True, False):  # Two-stream evaluation is allowed too.
    config.model.two_stream = value
    configlib.validate(config)

  c = pretrain.get_config('tiny,cmal')
  assert not c.model.cross_attention and 'two_stream_every' not in c
  c.model.two_stream = True
  with pytest.raises(ValueError, match=r'config\.model\.two_stream=True.*'
                     'cross_attention=True'):
    configlib.validate(c)

  c = pretrain.get_config('tiny,semvlp')
  c.model.cross_attention = False
  with pytest.raises(ValueError, match=r'config\.two_stream_every=2.*'
                     'cross_attention=True'):
    configlib.validate(c)
  c = pretrain.get_config('tiny,semvlp')
  c.two_stream_every = -1
  with pytest.raises(ValueError, match=r'config\.two_stream_every=-1'):
    configlib.validate(c)


# ------------------------------------------------------------ end to end

STEPS = 20
LOG_EVERY = 5


@pytest.fixture(scope='module')
def semvlp_pretrained(tmp_path_factory):
  """(workdir, results) of 20 steps of tiny,semvlp (shrunk) on a 256-pair
  world of its own."""
  workdir = str(tmp_path_factory.mktemp('semvlp'))
  c = fast_step(shrink(pretrain.get_config('tiny,semvlp')))
  c.total_steps, c.log_every, c.checkpoint_every = STEPS, LOG_EVERY, STEPS
  c.world.num_train, c.world.num_eval = 256, 32
  c.eval.batch_size, c.eval.retrieval_images = 32, 8
  return workdir, jobs.train_and_evaluate(c, workdir)


# Slow (a whole SemVLP run and a fine-tune from it): the default run covers
# both stream modes, their masks and the step's alternation above.
@pytest.mark.slow
def test_semvlp_pretraining_learns_and_alternates(semvlp_pretrained):
  workdir, results = semvlp_pretrained
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f if '"loss"' in l]
  assert len(lines) == STEPS // LOG_EVERY, lines
  first, last = lines[0]['loss'], lines[-1]['loss']
  print(f'semvlp: loss {first:.3f} -> {last:.3f}')
  assert last < first - 0.5, (first, last)
  # Half the steps ran two-stream: 5-step windows hold 2 or 3 of them.
  shares = [l['two_stream'] for l in lines]
  assert all(s == pytest.approx(0.4) or s == pytest.approx(0.6)
             for s in shares), shares
  assert np.mean(shares) == pytest.approx(0.5)
  for key in ('loss_mlm', 'loss_itm', 'loss_mrc'):
    assert all(math.isfinite(l[key]) for l in lines), key
  assert 0 <= results['itm_acc'] <= 1 and 0 <= results['mlm_acc'] <= 1
  # The checkpoint holds the sub-layer.
  params, _ = checkpoint.load_pretrained_params(workdir)
  assert 'cross_attention' in params['unified']['layer_0']


@pytest.mark.slow
def test_rec_finetunes_from_the_semvlp_checkpoint(semvlp_pretrained,
                                                  tmp_path, capsys):
  workdir, _ = semvlp_pretrained
  c = finetune_tiny('rec', 'semvlp', workdir)
  assert c.model.cross_attention and not c.model.two_stream
  assert 'two_stream_every' not in c
  capsys.readouterr()
  results = jobs.train_and_evaluate(c, str(tmp_path))
  log = capsys.readouterr().out
  for split in ('val', 'test'):
    assert 0 <= results[split]['accuracy'] <= 1
    assert results[split]['num_examples'] == 16
  # init_from took every encoder array, the sub-layer's included.
  pretrained, _ = checkpoint.load_pretrained_params(workdir)
  expected = sum(len(jax.tree.leaves(pretrained[n])) for n in ENCODER_PARAMS)
  match = re.search(r'init_from \S+/checkpoints/20: (\d+) parameter arrays',
                    log)
  assert match, log[-3000:]
  assert int(match.group(1)) == expected
  tuned, _ = checkpoint.load_pretrained_params(str(tmp_path))
  assert set(tuned['unified']['layer_0']) == set(
      pretrained['unified']['layer_0'])
