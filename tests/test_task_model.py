"""Downstream heads on the shared encoder, and init_from: fine-tuning starts
from a pre-training checkpoint's encoders (issue 3's model side)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import checkpoint, train_step
from cmal_jax.model import cmap
from cmal_jax.model.cmal import (CMAL, ENCODER_PARAMS, ModelConfig,
                                 pretrained_param_names)
from cmal_testutil import random_batch
from configs import finetune as finetune_config
from configs import pretrain

B = 4


def tiny_model(task='pretrain', num_outputs=0, **model_overrides):
  c = pretrain.get_config('tiny')
  for k, v in model_overrides.items():
    c.model[k] = v
  return CMAL(ModelConfig.from_config(c.model, num_tags=10), task=task,
              num_outputs=num_outputs), c


def task_inputs(c, batch_size=B, seed=0):
  """A batch without anchors (CMAP is off when fine-tuning)."""
  d = c.data
  b = random_batch(seed, batch_size, d.max_text_len, d.max_regions,
                   d.max_anchors, c.model.region_feat_dim)
  return {k: jnp.asarray(b[k]) for k in (
      'input_ids', 'text_mask', 'region_feats', 'region_boxes',
      'region_mask')}


def init(model, inputs):
  """Plain parameter dict (logical-axis boxes removed). Run op by op: for
  these one-off calls that is faster than compiling them."""
  return nn.unbox(model.init(jax.random.key(0), inputs))['params']


def param_shapes(model, inputs):
  """{name: shape} tree without running anything (jax.eval_shape)."""
  return jax.tree.map(np.shape, jax.eval_shape(lambda: init(model, inputs)))


def logits_of(model, params, inputs):
  return np.asarray(model.apply({'params': params}, inputs)['logits'])


@pytest.mark.parametrize('task,num_outputs,shape', [
    ('vqa', 7, (B, 7)), ('ve', 0, (B, 3)), ('rec', 0, (B, 8)),
    ('retrieval', 0, (B, 2)), ('nlvr2', 0, (B // 2, 2))])
def test_task_heads_output_shapes(task, num_outputs, shape):
  model, c = tiny_model(task, num_outputs)
  inputs = task_inputs(c)
  params = init(model, inputs)
  logits = logits_of(model, params, inputs)
  assert logits.shape == shape and logits.dtype == np.float32
  assert np.all(np.isfinite(logits))
  # Every task shares the pre-training model's encoder parameters exactly.
  pre, _ = tiny_model()
  pre_shapes = param_shapes(pre, dict(inputs, **_no_anchors(c, B)))
  for name in ENCODER_PARAMS:
    assert jax.tree.map(np.shape, params[name]) == pre_shapes[name], name
  # Task models carry no pre-training heads.
  assert not {'vocab_head', 'tag_head', 'pairing_head'} & set(params)


def _no_anchors(c, batch_size):
  K = c.data.max_anchors
  z = jnp.zeros((batch_size, K), jnp.int32)
  return dict(anchor_text_pos=z, anchor_text_end=z, anchor_region=z,
              anchor_action=z, mlm_positions=jnp.zeros((batch_size, 2),
                                                       jnp.int32))


def test_rec_scores_only_real_regions():
  model, c = tiny_model('rec')
  inputs = task_inputs(c)
  params = init(model, inputs)
  logits = logits_of(model, params, inputs)
  mask = np.asarray(inputs['region_mask']) > 0
  assert np.all(logits[~mask] == -1e9) and (~mask).any()
  assert np.all(np.abs(logits[mask]) < 1e3)


def test_nlvr2_pairs_the_two_passes_of_an_example():
  """Rows 2b and 2b + 1 are example b's left and right images: swapping
  them changes only that example's logits; moving rows across examples
  moves the logits with them."""
  model, c = tiny_model('nlvr2', dropout=0.0)
  inputs = task_inputs(c, batch_size=2 * B)
  params = init(model, inputs)
  out = logits_of(model, params, inputs)
  order = np.arange(2 * B)
  order[[2, 3]] = order[[3, 2]]  # Example 1: left <-> right.
  out2 = logits_of(model, params, jax.tree.map(lambda x: x[order], inputs))
  others = [b for b in range(B) if b != 1]
  np.testing.assert_allclose(out2[others], out[others], rtol=1e-5, atol=1e-6)
  assert np.abs(out2[1] - out[1]).max() > 1e-4
  pairs = np.array([2, 3, 0, 1] + list(range(4, 2 * B)))  # Examples 0 <-> 1.
  out3 = logits_of(model, params, jax.tree.map(lambda x: x[pairs], inputs))
  np.testing.assert_allclose(out3[[1, 0]], out[[0, 1]], rtol=1e-5, atol=1e-6)


def test_encode_without_anchors_equals_cmap_doing_nothing():
  """Fine-tuning inputs have no anchors; that must equal the pre-training
  path with every anchor action NONE."""
  model, c = tiny_model()
  inputs = task_inputs(c)
  with_none = dict(inputs, **_no_anchors(c, B))
  assert (with_none['anchor_action'] == cmap.NONE).all()
  params = init(model, with_none)
  x1 = model.apply({'params': params}, inputs, method=CMAL.encode)[0]
  x2 = model.apply({'params': params}, with_none, method=CMAL.encode)[0]
  np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))


def test_unknown_task_and_vqa_without_answers_fail():
  model, c = tiny_model('caption')
  with pytest.raises(ValueError, match="CMAL has no head for task 'caption'"):
    init(model, task_inputs(c))
  model, _ = tiny_model('vqa', 0)
  with pytest.raises(ValueError, match='vqa head needs num_outputs'):
    init(model, task_inputs(c))


# -------------------------------------------------------------- init_from

@pytest.fixture(scope='module')
def pretrained(pretrained_tiny):
  """conftest's tiny pre-training run, saved at step 2 (its encoders differ
  from a fresh model's)."""
  return pretrained_tiny


@pytest.mark.parametrize('task', ['vqa', 'retrieval'])
def test_init_from_takes_the_encoders_and_keeps_fresh_heads(pretrained, task):
  saved, where = checkpoint.load_pretrained_params(pretrained)
  assert where.endswith('checkpoints/2')
  model, c = tiny_model(task, 5)
  fresh = init(model, task_inputs(c))
  names = pretrained_param_names(task)
  merged, taken = checkpoint.merge_pretrained(fresh, saved, names)
  flat = flax.traverse_util.flatten_dict(merged, sep='/')
  flat_saved = flax.traverse_util.flatten_dict(saved, sep='/')
  flat_fresh = flax.traverse_util.flatten_dict(fresh, sep='/')
  assert taken == sum(k.split('/')[0] in names for k in flat) > 20
  for k, v in flat.items():
    if k.split('/')[0] in names:
      np.testing.assert_array_equal(v, flat_saved[k])  # Bitwise.
    else:
      np.testing.assert_array_equal(v, flat_fresh[k])
  # The retrieval model starts from the pre-trained ITM head; vqa's head is new.
  assert ('itm_head/pooler/kernel' in flat) == (task == 'retrieval')
  # The merged parameters run.
  assert np.all(np.isfinite(logits_of(model, merged, task_inputs(c))))


def test_init_from_a_step_folder_and_bad_paths(pretrained, tmp_path):
  _, where = checkpoint.load_pretrained_params(
      f'{pretrained}/checkpoints/2')
  assert where.endswith('checkpoints/2')
  with pytest.raises(FileNotFoundError, match=r'init_from: .*/nowhere is not '
                     r'a directory'):
    checkpoint.load_pretrained_params(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match=r'holds no checkpoint at step '
                     r"7 \(steps: \[2\]\)"):
    checkpoint.load_pretrained_params(pretrained, step=7)


def test_init_from_a_different_size_names_the_parameter(pretrained):
  saved, _ = checkpoint.load_pretrained_params(pretrained)
  model, c = tiny_model('ve')
  fresh = init(model, task_inputs(c))
  # A checkpoint of another width: two of its parameters, reshaped.
  other = jax.tree.map(np.asarray, saved)
  other['mask_vector'] = np.zeros(32, np.float32)
  other['slots']['location']['kernel'] = np.zeros((7, 32), np.float32)
  with pytest.raises(ValueError) as e:
    checkpoint.merge_pretrained(fresh, other, ENCODER_PARAMS)
  assert str(e.value) == (
      'init_from: the checkpoint does not fit this model (2 parameter(s)): '
      'mask_vector: checkpoint (32,), model (64,); '
      'slots/location/kernel: checkpoint (7, 32), model (7, 64)')
  del other['unified']['layer_0']  # And 16 parameters are missing.
  with pytest.raises(ValueError, match=r'\(18 parameter\(s\)\): .*'
                     r'unified/layer_0/attention/key_bias: missing in the '
                     r'checkpoint; .*; \.\.\.$'):
    checkpoint.merge_pretrained(fresh, other, ENCODER_PARAMS)


def test_vqa_head_starts_at_the_rare_answer_prior():
  """Every VQA answer starts at logit -log(N) (sigmoid ~ 1/N), the other
  heads at 0."""
  model, c = tiny_model('vqa', 50)
  params = init(model, task_inputs(c))
  np.testing.assert_allclose(params['vqa_head']['classifier']['bias'],
                             np.full(50, -np.log(50), np.float32), rtol=1e-6)
  model, c = tiny_model('ve')
  params = init(model, task_inputs(c))
  assert np.all(params['ve_head']['classifier']['bias'] == 0)


# A loaded encoder part and a fresh head, for the optimizer tests.
OPTIMIZER_PARAMS = {'unified': {'kernel': jnp.ones((3, 2))},
                    'vqa_head': {'kernel': jnp.ones((3, 2))}}


@pytest.mark.parametrize('init_from,mult,expected', [
    ('runs/pretrain', 0.1, 0.1), ('', 0.1, 1.0), ('runs/pretrain', 1.0, 1.0)])
def test_pretrained_lr_mult_scales_the_steps_of_loaded_parameters(
    init_from, mult, expected):
  """With init_from, the parameters it loads (here `unified`) step
  `pretrained_lr_mult` times as far as the fresh head for the same
  gradient; without init_from everything steps alike."""
  c = finetune_config.get_config('vqa,tiny')
  c.init_from, c.finetune.pretrained_lr_mult = init_from, mult
  c.optim.warmup_fraction = 0.0
  tx, _ = train_step.make_optimizer(c)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), OPTIMIZER_PARAMS)
  updates, _ = tx.update(grads, tx.init(OPTIMIZER_PARAMS), OPTIMIZER_PARAMS)
  head, loaded = updates['vqa_head']['kernel'], updates['unified']['kernel']
  assert float(jnp.abs(head).min()) > 0
  np.testing.assert_allclose(loaded, expected * head, rtol=1e-6)


def test_optimizer_state_has_one_structure_whatever_the_multiplier():
  """A fine-tuning run resumes after init_from or pretrained_lr_mult
  changed: the optimizer state's tree is the same, as is pre-training's."""
  structures = set()
  for init_from, mult in (('', 1.0), ('runs/pretrain', 1.0),
                          ('runs/pretrain', 0.2)):
    c = finetune_config.get_config('vqa,tiny')
    c.init_from, c.finetune.pretrained_lr_mult = init_from, mult
    tx, _ = train_step.make_optimizer(c)
    structures.add(jax.tree.structure(tx.init(OPTIMIZER_PARAMS)))
  tx, _ = train_step.make_optimizer(pretrain.get_config('tiny'))
  structures.add(jax.tree.structure(tx.init(OPTIMIZER_PARAMS)))
  assert len(structures) == 1
