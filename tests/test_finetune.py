"""Fine-tuning (configs/finetune.py, cmal_jax/finetune.py, train.py's task
path) on the tiny config: the task losses against numpy, retrieval scoring
against the model run directly, one end-to-end run per task whose
eval.json agrees with its own predictions files, init_from a pre-training
checkpoint, bitwise resume, the config checks, and bad task records
(data.on_error: named, or skipped, counted and limited).

The train_and_evaluate runs are the slow part (each task compiles its own
train step, ~15 s with dropout, ~8 s without): every run is made once per
module (fixtures below) and shares the session's XLA cache
(conftest.compilation_cache). Only ve keeps the config's dropout, for the
resume test; the other runs and the pre-training run turn it off.
"""

import ast
import contextlib
import io
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmal_jax import (checkpoint, configlib, finetune, jobs, run_identity,
                      sharding, task_metrics, train, train_step)
from cmal_jax.data import pipeline, records, region_store, task_pipeline, tasks
from cmal_jax.experiments import image_reliance
from cmal_jax.world import scenes, task_baselines, task_examples
from cmal_jax.model.cmal import (CMAL, ENCODER_PARAMS, ModelConfig,
                                 image_feature)
from cmal_testutil import assert_trees_equal, break_region_record, leaf_types
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config

TASKS = tasks.TASKS
F = 64  # The tiny config's region_feat_dim.
TOTAL_STEPS, EVAL_EVERY = 6, 3
NUM_TRAIN, NUM_EVAL, NUM_TEST = 32, 16, 16
CLS_ID = 101  # [CLS] in the BERT uncased vocabulary.


def tiny_config(task, **overrides):
  """configs/finetune.py:TASK,tiny, shrunk to a few steps on a tiny scenes."""
  c = finetune_config.get_config(f'{task},tiny')
  c.total_steps = TOTAL_STEPS
  c.eval.every_steps = EVAL_EVERY
  c.log_every = 3
  c.checkpoint_every = 3
  c.world.num_train, c.world.num_eval, c.world.num_test = (
      NUM_TRAIN, NUM_EVAL, NUM_TEST)
  for k, v in overrides.items():
    c[k] = v
  return c


def read_json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_logged(config, workdir):
  """train_and_evaluate, returning (results, what it printed)."""
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      results = jobs.train_and_evaluate(config, workdir)
  except BaseException:
    print(out.getvalue())
    raise
  return results, out.getvalue()


def init_params(model, config):
  """Fresh parameters of a task model (seed config.seed). Jitted: one
  compile (~3 s) is cheaper than running init op by op the first time."""
  init = jax.jit(lambda rng: nn.unbox(model.init(
      rng, finetune.init_inputs(config)))['params'])
  return jax.device_get(init(jax.random.key(config.seed)))


def random_params(model, inputs, seed):
  """Random values in the shapes of `model`'s parameters, without running
  init (jax.eval_shape): for checks where only shapes and identity
  matter."""
  shapes = jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.key(0), inputs))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)


def flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def load_best_params(workdir):
  best = read_json(workdir, 'best.json')
  manager = ocp.CheckpointManager(checkpoint.best_dir(workdir),
                                  item_names=('params',))
  try:
    return manager.restore(best['step'], args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))['params']
  finally:
    manager.close()


# ------------------------------------------------------------ 1. task_loss

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_vqa_loss_is_summed_bce_averaged_over_questions():
  rng = np.random.default_rng(0)
  B, V = 5, 7
  logits = rng.normal(0, 2, (B, V)).astype(np.float32)
  targets = np.zeros((B, V), np.float32)
  for b in range(B):  # Soft scores min(n / 3, 1) of a few answers.
    idx = rng.choice(V, 2, replace=False)
    targets[b, idx] = rng.choice([1 / 3, 2 / 3, 1.0], 2)
  targets[3] = 0  # A question none of whose answers is in the vocabulary.
  loss, m = finetune.task_loss({'logits': jnp.asarray(logits)},
                               {'targets': jnp.asarray(targets)},
                               tiny_config('vqa'))
  x, t = logits.astype(np.float64), targets.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  expected = bce.sum(-1).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m['loss_vqa']), expected, rtol=1e-5)
  assert float(m['loss']) == float(loss)
  top = targets[np.arange(B), logits.argmax(-1)]
  np.testing.assert_allclose(float(m['acc_vqa']), top.mean(), rtol=1e-6)
  # A non-trivial case: some top answers score, some do not.
  assert 0 < top.mean() < 1, top


@pytest.mark.parametrize('task,classes', [('ve', 3), ('nlvr2', 2)])
def test_classification_loss_is_softmax_cross_entropy(task, classes):
  rng = np.random.default_rng(1)
  B = 6
  logits = rng.normal(0, 2, (B, classes)).astype(np.float32)
  labels = rng.integers(0, classes, B).astype(np.int32)
  labels[0] = logits[0].argmax()  # At least one right, one wrong.
  labels[1] = (logits[1].argmax() + 1) % classes
  loss, m = finetune.task_loss({'logits': jnp.asarray(logits)},
                               {'label': jnp.asarray(labels)},
                               tiny_config(task))
  expected = -np_log_softmax(logits)[np.arange(B), labels].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m[f'loss_{task}']), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m[f'acc_{task}']),
                             np.mean(logits.argmax(-1) == labels), rtol=1e-6)


def test_rec_loss_ignores_examples_without_target_and_counts_iou_hits():
  rng = np.random.default_rng(2)
  B, R = 6, 8
  logits = rng.normal(0, 2, (B, R)).astype(np.float32)
  iou = rng.uniform(0, 0.9, (B, R)).astype(np.float32)
  iou[1] = 0  # No kept region overlaps the target: no weight.
  iou[4] = 0
  iou[2] = 0.1
  iou[2, logits[2].argmax()] = 0.5  # Exactly the threshold: a hit.
  iou[3] = 0.9
  iou[3, logits[3].argmax()] = 0.49  # Just under: a miss.
  gold = iou.argmax(-1).astype(np.int32)
  batch = {'region_iou': jnp.asarray(iou), 'gold_region': jnp.asarray(gold)}
  config = tiny_config('rec')
  loss, m = finetune.task_loss({'logits': jnp.asarray(logits)}, batch, config)
  has = iou.max(-1) > 0
  ce = -np_log_softmax(logits)[np.arange(B), gold]
  np.testing.assert_allclose(float(loss), ce[has].mean(), rtol=1e-5)
  # Changing the targetless examples' logits changes nothing.
  other = logits.copy()
  other[~has] = rng.normal(0, 10, (int((~has).sum()), R))
  loss2, _ = finetune.task_loss({'logits': jnp.asarray(other)}, batch, config)
  assert float(loss2) == float(loss)
  # Accuracy: the share of all examples (targetless ones included, as sure
  # misses) whose argmax region has IoU >= 0.5.
  chosen = iou[np.arange(B), logits.argmax(-1)]
  assert chosen[2] == 0.5 and chosen[3] < 0.5
  np.testing.assert_allclose(float(m['acc_rec']), np.mean(chosen >= 0.5),
                             rtol=1e-6)
  assert 0 < float(m['acc_rec']) < 1


def test_retrieval_loss_adds_weighted_itc():
  rng = np.random.default_rng(3)
  B, D = 6, 16
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  outputs = {'logits': jnp.asarray(rng.normal(size=(B, 2)), jnp.float32),
             'itc_text': jnp.asarray(unit(rng.normal(size=(B, D))),
                                     jnp.float32),
             'itc_image': jnp.asarray(unit(rng.normal(size=(B, D))),
                                      jnp.float32),
             'itc_log_scale': jnp.float32(np.log(1 / 0.07))}
  batch = {'itm_label': jnp.asarray([1, 0, 1, 1, 0, 1], jnp.int32)}
  config = tiny_config('retrieval')
  config.finetune.itc = 0.5
  loss, m = finetune.task_loss(outputs, batch, config)
  itm = -np_log_softmax(outputs['logits'])[np.arange(B),
                                           np.asarray(batch['itm_label'])]
  np.testing.assert_allclose(float(m['loss_itm']), itm.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(loss),
                             float(m['loss_itm']) + 0.5 * float(m['loss_itc']),
                             rtol=1e-6)
  config.finetune.itc = 0.0
  loss0, m0 = finetune.task_loss(outputs, batch, config)
  assert 'loss_itc' not in m0
  np.testing.assert_allclose(float(loss0), itm.mean(), rtol=1e-5)


# ------------------------------------------------------- 2. retrieval scores

NUM_IMAGES = 12  # x 5 captions each.


@pytest.fixture(scope='module')
def retrieval_model(tmp_path_factory, compilation_cache):
  """A random-init tiny retrieval model and a 12-image split: (config,
  model, params, captions, images, caption_image)."""
  d = str(tmp_path_factory.mktemp('retrieval_data'))
  task_examples.generate(d, ['retrieval'], {'val': NUM_IMAGES},
                       scenes.WorldParams(feature_dim=F), seed=0)
  config = tiny_config('retrieval')
  config.data.dir = d
  model = CMAL(ModelConfig.from_config(config.model, num_tags=1),
               task='retrieval')
  params = init_params(model, config)
  # At init the ITM head scores every pair within ~1e-4 of log(1/2), and
  # every caption's [CLS] vector (ITC) is nearly the same. A larger ITM
  # classifier, and a [CLS] input of zeros (its output is then the mix of
  # the caption's tokens that attention gives it), make both scores tell
  # pairs apart, so that the equality and top-k checks mean something.
  params['itm_head']['classifier']['kernel'] = 30.0 * params['itm_head'][
      'classifier']['kernel']
  for table, row in (('word_embeddings', CLS_ID), ('position_embeddings', 0)):
    emb = np.array(params['text_encoder'][table]['embedding'])  # A copy.
    emb[row] = 0.0
    params['text_encoder'][table]['embedding'] = emb
  captions, images, caption_image, image_ids, skipped = (
      finetune.retrieval_inputs(config, d, 'val'))
  assert skipped == {}
  assert captions['input_ids'].shape == (5 * NUM_IMAGES,
                                         config.data.max_text_len)
  assert images['region_feats'].shape == (NUM_IMAGES, config.data.max_regions,
                                          F)
  np.testing.assert_array_equal(caption_image,
                                np.repeat(np.arange(NUM_IMAGES), 5))
  assert (captions['input_ids'][:, 0] == CLS_ID).all()
  assert len(image_ids) == NUM_IMAGES
  return config, model, params, captions, images, caption_image


@pytest.fixture(scope='module')
def retrieval_setup(retrieval_model):
  """(scores(**finetune fields) -> retrieval_scores, every pair's ITM log
  p(match) [captions, images] and the ITC similarity, both from the
  model's own forward passes)."""
  config, model, params, captions, images, caption_image = retrieval_model
  mesh = sharding.mesh_from_config(config)
  axis_rules = sharding.rules(config)

  def scores(**finetune_fields):
    c = config.copy_and_resolve_references()
    for k, v in finetune_fields.items():
      c.finetune[k] = v
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      return finetune.retrieval_scores(model, params, c, captions, images,
                                       mesh)

  # Every pair through the model's own forward pass, directly.
  nc, ni = len(caption_image), NUM_IMAGES
  cap, img = (a.reshape(-1) for a in np.meshgrid(np.arange(nc), np.arange(ni),
                                                  indexing='ij'))
  pair_inputs = {k: captions[k][cap] for k in ('input_ids', 'text_mask')}
  pair_inputs.update({k: images[k][img] for k in images})
  logits = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, method='__call__')['logits'])(params, pair_inputs)
  direct = np.asarray(jax.nn.log_softmax(logits)[:, 1]).reshape(nc, ni)
  # ITC similarity from the model's UMSE outputs (not finetune's numpy).
  text, image = jax.jit(lambda p: (
      model.apply({'params': p}, captions, method='embed_text')[:, 0],
      image_feature(model.apply({'params': p}, images, method='embed_regions'),
                   images['region_mask'])))(params)
  sim = np.asarray(text @ image.T)
  return scores, direct, sim


def test_retrieval_itm_scores_every_pair(retrieval_setup):
  scores, direct, _ = retrieval_setup
  nc, ni = direct.shape
  t2i, i2t, pairs, sim = scores(itc=0.0)
  assert sim is None  # No ITC candidates: no ITC ranking either.
  assert t2i.shape == (nc, ni) == (5 * NUM_IMAGES, NUM_IMAGES)
  assert pairs == nc * ni
  np.testing.assert_allclose(t2i, direct, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(i2t, t2i.T)
  assert direct.std() > 0.05  # The scores tell pairs apart.
  # rerank_k=0 also means every pair.
  t2i0, _, pairs0, _ = scores(itc=1.0, rerank_k=0)
  assert pairs0 == nc * ni
  np.testing.assert_allclose(t2i0, direct, atol=1e-5, rtol=0)


def test_retrieval_rerank_of_every_image_equals_full_itm(retrieval_setup):
  scores, direct, _ = retrieval_setup
  t2i, i2t, pairs, _ = scores(itc=1.0, rerank_k=NUM_IMAGES,
                              rerank_score='itm')
  assert pairs == direct.size
  np.testing.assert_allclose(t2i, direct, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(i2t, t2i.T)


def test_retrieval_rerank_by_itm_and_itc_adds_the_itc_logit(
    retrieval_setup, retrieval_model):
  """rerank_score='itm_and_itc' (the default): each candidate's ITM
  log-probability plus ITC's logit, sim * exp(itc_log_scale); the same
  candidates as 'itm' (ALBEF's)."""
  scores, direct, sim = retrieval_setup
  params = retrieval_model[2]
  k = 3
  itm, _, pairs, _ = scores(itc=1.0, rerank_k=k, rerank_score='itm')
  both, both_i2t, both_pairs, _ = scores(itc=1.0, rerank_k=k)
  assert both_pairs == pairs
  finite = np.isfinite(itm)
  np.testing.assert_array_equal(np.isfinite(both), finite)
  scale = np.exp(float(jax.device_get(nn.meta.unbox(params)['itc_log_scale'])))
  assert scale > 1  # Not 1: the logit, not the cosine, is added.
  np.testing.assert_allclose(both[finite],
                             direct[finite] + scale * sim[finite],
                             atol=1e-4, rtol=0)
  np.testing.assert_array_equal(both_i2t, both.T)
  config = retrieval_model[0].copy_and_resolve_references()
  config.finetune.rerank_score = 'itc'
  with pytest.raises(ValueError, match=r"config\.finetune\.rerank_score="
                     r"'itc': must be one of \('itm', 'itm_and_itc'\)"):
    configlib.validate(config)


def top_k_sets(sim, k, tol=1e-5):
  """([Q, I] bool) the entries surely among each row's top k by `sim`, and
  those that may be: two float computations of the same similarity may
  order values within tol of each other either way. Without such
  near-ties, both are exactly the top k."""
  ranked = -np.sort(-sim, axis=1)
  return sim > ranked[:, k:k + 1] + tol, sim >= ranked[:, k - 1:k] - tol


def test_retrieval_rerank_scores_only_the_itc_top_k(retrieval_setup):
  scores, direct, sim = retrieval_setup
  k = 3
  t2i, i2t, pairs, itc_sim = scores(itc=1.0, rerank_k=k, rerank_score='itm')
  # The ITC ranking it reports is the model's own ITC similarity.
  np.testing.assert_allclose(itc_sim, sim, atol=1e-5, rtol=0)
  finite = np.isfinite(t2i)
  assert (finite.sum(1) >= k).all() and (finite.sum(0) >= k).all()
  np.testing.assert_allclose(t2i[finite], direct[finite], atol=1e-5, rtol=0)
  assert np.all(t2i[~finite] == -np.inf) and (~finite).any()
  assert pairs == finite.sum()
  np.testing.assert_array_equal(i2t, t2i.T)
  # Each caption's top-k images and each image's top-k captions by ITC
  # similarity (ALBEF's candidates), and nothing else.
  t2i_sure, t2i_maybe = top_k_sets(sim, k)
  i2t_sure, i2t_maybe = top_k_sets(sim.T, k)
  sure, maybe = t2i_sure | i2t_sure.T, t2i_maybe | i2t_maybe.T
  assert np.all(finite[sure]), np.argwhere(sure & ~finite)
  assert not np.any(finite & ~maybe), np.argwhere(finite & ~maybe)
  # Near-ties are rare (none at all on this split: the check is exact).
  assert sure.sum() >= 0.95 * maybe.sum(), (sure.sum(), maybe.sum())


def test_hard_negatives_follow_itc_similarity():
  """ALBEF's sampling: never a matching pair (the diagonal, or two rows of
  one image), and with a sharp temperature the most similar non-matching
  partner, both ways."""
  rng = np.random.default_rng(0)
  # Distinct similarities 0.2 apart: x 100 (the sharpest tau), 20 apart.
  sim = (0.2 * rng.permutation(36).reshape(6, 6) - 3.5).astype(np.float32)
  index = np.array([0, 1, 2, 3, 4, 2])  # Rows 2 and 5: one image.
  same = jnp.asarray(index[:, None] == index[None, :])
  picks = [finetune.objectives.mine_hard_negatives(
      jnp.asarray(sim), jnp.log(1 / 0.07), same, jax.random.key(k))
           for k in range(50)]
  for image_of_text, text_of_image in picks:
    assert not np.asarray(same)[np.arange(6), image_of_text].any()
    assert not np.asarray(same)[text_of_image, np.arange(6)].any()
  assert len({tuple(np.asarray(p[0])) for p in picks}) > 1  # It samples.
  sharp = finetune.objectives.mine_hard_negatives(
      jnp.asarray(sim), jnp.float32(np.log(100.0)), same, jax.random.key(0))
  masked = np.where(np.asarray(same), -np.inf, sim)
  np.testing.assert_array_equal(sharp[0], masked.argmax(1))
  np.testing.assert_array_equal(sharp[1], masked.argmax(0))


def test_retrieval_with_mined_negatives_scores_the_picked_pairs(
    retrieval_model, retrieval_setup):
  """finetune.itm_negatives='hard': the loss is ITM over the B matched
  pairs, each caption with its picked image and each image with its picked
  caption (scored as the model's own forward pass scores those pairs),
  plus ITC."""
  config, _, params, captions, images, caption_image = retrieval_model
  _, direct, sim = retrieval_setup  # Every pair: log p(match), ITC sim.
  config = config.copy_and_resolve_references()
  config.finetune.itm_negatives, config.data.itm_neg_prob = 'hard', 0.0
  config.model.dropout = 0.0  # So the training pass equals `direct`'s.
  configlib.validate(config)
  first = np.searchsorted(caption_image, np.arange(NUM_IMAGES))
  batch = {k: captions[k][first] for k in ('input_ids', 'text_mask')}
  batch.update(images, itm_label=np.ones(NUM_IMAGES, np.int32),
               example_index=np.arange(NUM_IMAGES, dtype=np.int32))
  loss, metrics = jax.jit(finetune.make_loss(
      finetune.task_model(config), config).loss)(
          params, batch, jax.random.key(5), None)
  _, pick_rng = jax.random.split(jax.random.key(5))
  image_of_text, text_of_image = finetune.objectives.mine_hard_negatives(
      jnp.asarray(sim[first]), params['itc_log_scale'],
      jnp.eye(NUM_IMAGES, dtype=bool), pick_rng)
  rows = np.arange(NUM_IMAGES)
  match = direct[first]  # [caption of row i, image j]
  log_p = np.concatenate([match[rows, rows],
                          np.log1p(-np.exp(match[rows, image_of_text])),
                          np.log1p(-np.exp(match[text_of_image, rows]))])
  np.testing.assert_allclose(float(metrics['loss_itm']), -log_p.mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(metrics['loss_itm'])
                             + float(metrics['loss_itc']), rtol=1e-6)
  config.data.itm_neg_prob = 0.5
  with pytest.raises(ValueError, match=r"config\.finetune\.itm_negatives="
                     r"'hard': mines its own negatives.*itm_neg_prob=0 "
                     r"\(it is 0\.5\)"):
    configlib.validate(config)


# ------------------------------------------------------ pre-trained inputs

@pytest.fixture(scope='module')
def pretrained(pretrained_tiny):
  """conftest's tiny pre-training run, saved at step 2."""
  return pretrained_tiny


@pytest.fixture(scope='module')
def narrow_checkpoint(tmp_path_factory):
  """A pre-training checkpoint of another width (hidden 32, 2 heads, mlp
  128) in the layout train.py saves (state/params, signature), written
  directly: a second pre-training run would cost a compile."""
  c = pretrain_config.get_config('tiny')
  c.model.hidden_dim, c.model.num_heads, c.model.mlp_dim = 32, 2, 128
  model = CMAL(ModelConfig.from_config(c.model, len(scenes.WORLD_TAGS)))
  inputs = dict(finetune.init_inputs(finetune_config.get_config('ve,tiny')))
  K = c.data.max_anchors
  for k in ('anchor_text_pos', 'anchor_text_end', 'anchor_region',
            'anchor_action'):
    inputs[k] = jnp.zeros((1, K), jnp.int32)
  inputs['mlm_positions'] = jnp.zeros((1, 2), jnp.int32)
  params = random_params(model, inputs, seed=1)  # Only shapes matter.
  workdir = str(tmp_path_factory.mktemp('ft_narrow'))
  manager = ocp.CheckpointManager(
      checkpoint.checkpoint_dir(workdir), item_names=checkpoint.ITEMS,
      options=ocp.CheckpointManagerOptions(create=True,
                                           enable_async_checkpointing=False))
  manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'step': np.int32(1), 'params': params}),
      signature=ocp.args.JsonSave(run_identity.signature(c))))
  manager.wait_until_finished()
  manager.close()
  return workdir


# ------------------------------------------------------ 3. end-to-end runs

class Runs:
  """One train_and_evaluate per task, made on first use (vqa: from the
  pre-trained checkpoint, init_from; the others from random init)."""

  def __init__(self, root):
    self.root, self.done = root, {}

  def __call__(self, task, init_from=''):
    if task not in self.done:
      config = tiny_config(task)
      config.init_from = init_from
      if task != 've':  # ve keeps dropout for the resume test; without,
        config.model.dropout = 0.0  # the train step compiles twice as fast.
      workdir = str(self.root / task)
      results, log = run_logged(config, workdir)
      self.done[task] = dict(workdir=workdir, config=config,
                             results=results, log=log,
                             data=os.path.join(workdir, 'data'))
    assert self.done[task]['config'].init_from == init_from
    return self.done[task]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, compilation_cache):
  return Runs(tmp_path_factory.mktemp('ft_runs'))


METRICS = {'vqa': ('vqa_accuracy',), 've': ('accuracy',),
           'nlvr2': ('accuracy',), 'rec': ('accuracy',),
           'retrieval': configlib.RECALLS + ('mean_recall',)}


@pytest.mark.parametrize('task', TASKS)
def test_finetune_end_to_end(runs, task, request):
  run = runs(task, request.getfixturevalue('pretrained')
             if task == 'vqa' else '')
  workdir, config, data = run['workdir'], run['config'], run['data']
  ev = read_json(workdir, 'eval.json')
  assert ev == json.loads(json.dumps(run['results']))  # Returned = written.
  assert ev['task'] == task
  assert ev['best_metric'] == configlib.BEST_METRIC[task]
  assert ev['step'] == TOTAL_STEPS and ev['nonfinite_skips'] == 0
  assert ev['data_stats']['examples'] == TOTAL_STEPS * config.batch_size
  best = read_json(workdir, 'best.json')
  assert best['metric'] == ev['best_metric']
  assert ev['best_step'] == best['step'] and best['step'] in (3, 6)
  # finish() re-evaluates the best parameters on val: the value that made
  # them the best.
  assert ev['val'][ev['best_metric']] == best['value']
  for split, n in (('val', NUM_EVAL), ('test', NUM_TEST)):
    for metric in METRICS[task]:
      assert 0.0 <= ev[split][metric] <= 1.0, (split, metric)
    if task != 'retrieval':
      assert ev[split]['num_examples'] == n
  check_controls(task, data, ev)
  if task == 'vqa':
    assert 'init_from ' in run['log'] and 'checkpoints/2: ' in run['log']
  else:
    assert 'init_from is empty' in run['log']
  check_predictions[task](workdir, data, ev)


def check_controls(task, data, ev):
  """Each labelled split's metric has its blind baseline beside it, and the
  label tasks' metrics their images-shuffled control (retrieval neither)."""
  metric = configlib.BEST_METRIC[task]
  blind = task_baselines.blind_baseline_of(data, task, ('val', 'test'))
  for split in ('val', 'test'):
    got = ev[split]
    shuffled = {k for k in got if k.endswith(finetune.SHUFFLED)}
    if task == 'retrieval':
      assert 'blind_baseline' not in got and not shuffled
      continue
    assert got['blind_baseline'] == pytest.approx(blind[split], abs=1e-12)
    if task not in finetune.IMAGES_SHUFFLED_TASKS:
      assert not shuffled
      continue
    assert 0.0 <= got[metric + finetune.SHUFFLED] <= 1.0
    if task == 'vqa':  # Per question type too, over the same types.
      by_type = got['vqa_accuracy_by_question_type' + finetune.SHUFFLED]
      assert set(by_type) == set(got['vqa_accuracy_by_question_type'])


def _check_vqa(workdir, data, ev):
  vocab = read_json(data, task_pipeline.ANSWER_VOCAB_FILE)['answers']
  for split in ('val', 'test'):
    examples = task_pipeline.read_task_examples(data, 'vqa', split)
    rows = read_json(workdir, 'predictions', f'vqa_{split}_results.json')
    assert isinstance(rows, list) and len(rows) == len(examples)
    assert [r['question_id'] for r in rows] == [
        ex['question_id'] for ex in examples]
    assert all(isinstance(r['answer'], str) and r['answer'] in vocab
               for r in rows)
    acc = task_metrics.vqa_accuracies([r['answer'] for r in rows],
                                      [ex['answers'] for ex in examples])
    got = ev[split]
    assert got['num_labelled'] == len(examples)
    np.testing.assert_allclose(got['vqa_accuracy'], acc.mean(), rtol=1e-12)
    by_type = got['vqa_accuracy_by_question_type']
    types = [ex['question_type'] for ex in examples]
    assert sorted(by_type) == sorted(set(types))
    for t, v in by_type.items():
      np.testing.assert_allclose(
          v, acc[[x == t for x in types]].mean(), rtol=1e-12)
    assert set(got['vqa_accuracy_by_answer_type']) == {
        ex['answer_type'] for ex in examples}


def _check_classification(task):
  key = 'pair_id' if task == 've' else 'identifier'

  def check(workdir, data, ev):
    for split in ('val', 'test'):
      examples = task_pipeline.read_task_examples(data, task, split)
      rows = read_jsonl(os.path.join(workdir, 'predictions',
                                     f'{task}_{split}.jsonl'))
      assert [r[key] for r in rows] == [ex[key] for ex in examples]
      assert [r['label'] for r in rows] == [ex['label'] for ex in examples]
      labels = tasks.VE_LABELS if task == 've' else (False, True)
      assert all(r['prediction'] in labels for r in rows)
      acc = np.mean([r['prediction'] == r['label'] for r in rows])
      assert ev[split]['accuracy'] == pytest.approx(acc, abs=1e-12)
  return check


def _check_rec(workdir, data, ev):
  for split in ('val', 'test'):
    examples = task_pipeline.read_task_examples(data, 'rec', split)
    rows = read_jsonl(os.path.join(workdir, 'predictions',
                                   f'rec_{split}.jsonl'))
    assert [(r['ref_id'], r['sent_id']) for r in rows] == [
        (ex['ref_id'], ex['sent_id']) for ex in examples]
    correct = np.array([r['correct'] for r in rows])
    assert ev[split]['accuracy'] == pytest.approx(correct.mean(), abs=1e-12)
    iou = np.array([r['iou'] for r in rows])
    np.testing.assert_array_equal(correct, iou >= 0.5)
    # The reported IoU is the chosen box's with the gold box (both rounded
    # to 5 decimals in the file).
    recomputed = task_metrics.box_iou([r['box'] for r in rows],
                                      [ex['target_box'] for ex in examples])
    np.testing.assert_allclose(iou, recomputed, atol=2e-4)


def _check_retrieval(workdir, data, ev):
  for split in ('val', 'test'):
    examples = task_pipeline.read_task_examples(data, 'retrieval', split)
    got = ev[split]
    n_captions = sum(len(ex['captions']) for ex in examples)
    assert got['num_images'] == len(examples) == NUM_EVAL
    assert got['num_captions'] == n_captions
    # rerank_k (16) covers all 16 images: every caption row is scored.
    assert got['pairs_scored'] == n_captions * len(examples)
    assert got['mean_recall'] == pytest.approx(
        np.mean([got[k] for k in configlib.RECALLS]), abs=1e-12)
    # The ITC ranking alone, beside the re-ranked one.
    itc = [got[finetune.ITC_PREFIX + k] for k in configlib.RECALLS]
    assert all(0.0 <= v <= 1.0 for v in itc)
    assert got[finetune.ITC_PREFIX + 'mean_recall'] == pytest.approx(
        np.mean(itc), abs=1e-12)
    # Two images sharing a caption text would tie in i2t, and the ranks
    # (ties count against the query) could disagree with the top-10 order.
    texts = [c for ex in examples for c in set(ex['captions'])]
    assert len(texts) == len(set(texts))
    pred = read_json(workdir, 'predictions', f'retrieval_{split}.json')
    assert pred['images'] == [ex['image_id'] for ex in examples]
    caption_image = np.asarray(pred['caption_image'])
    np.testing.assert_array_equal(caption_image, np.repeat(
        np.arange(len(examples)), [len(ex['captions']) for ex in examples]))
    t2i, i2t = np.asarray(pred['t2i_top10']), np.asarray(pred['i2t_top10'])
    assert t2i.shape == (n_captions, 10) and i2t.shape == (len(examples), 10)
    for k in (1, 5, 10):
      r_t2i = np.mean([caption_image[c] in t2i[c, :k]
                       for c in range(n_captions)])
      r_i2t = np.mean([i in caption_image[i2t[i, :k]]
                       for i in range(len(examples))])
      assert got[f't2i_r{k}'] == pytest.approx(r_t2i, abs=1e-12), k
      assert got[f'i2t_r{k}'] == pytest.approx(r_i2t, abs=1e-12), k


check_predictions = {'vqa': _check_vqa, 've': _check_classification('ve'),
                     'nlvr2': _check_classification('nlvr2'),
                     'rec': _check_rec, 'retrieval': _check_retrieval}


def test_vqa_model_exported_to_pytorch_gives_the_same_answers(runs, pretrained,
                                                              tmp_path):
  """python -m cmal_jax.export --step=best on the fine-tuned VQA run; the
  PyTorch mirror answers every test question as the JAX run's predictions
  file does."""
  import subprocess
  import sys
  import torch
  from cmal_jax.export.torch_model import CMAL as TorchCMAL
  run = runs('vqa', pretrained)
  out = str(tmp_path / 'vqa_export')
  r = subprocess.run([sys.executable, '-m', 'cmal_jax.export',
                      f'--workdir={run["workdir"]}', '--step=best',
                      f'--out={out}'], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert 'Exported vqa model' in r.stdout
  model = TorchCMAL.from_pretrained(out)
  exported = read_json(out, 'config.json')
  vocab = read_json(run['data'], task_pipeline.ANSWER_VOCAB_FILE)['answers']
  assert exported['answers'] == vocab
  assert exported['num_outputs'] == len(vocab)
  config = run['config']
  ds, info = task_pipeline.make_task_dataset(
      config, run['data'], 'vqa', 'test', batch_size=8, train=False,
      seed=0, process_index=0, process_count=1)
  jax_model = CMAL(ModelConfig.from_config(config.model, num_tags=1),
                   task='vqa', num_outputs=len(vocab))
  best = load_best_params(run['workdir'])
  answers = [None] * info['num_examples']
  for batch in ds:
    inputs = finetune.model_inputs(batch, 'vqa')
    with torch.no_grad():
      logits = model({k: torch.from_numpy(np.asarray(v))
                      for k, v in inputs.items()})['logits'].numpy()
    # Not only the argmax: the scores themselves agree.
    np.testing.assert_allclose(
        logits, jax_model.apply({'params': best}, inputs)['logits'],
        atol=1e-5, rtol=0)
    for i, ok, b in zip(batch['example_index'], batch['valid'],
                        logits.argmax(-1)):
      if ok:
        answers[i] = vocab[b]
  jax_rows = read_json(run['workdir'], 'predictions', 'vqa_test_results.json')
  assert answers == [row['answer'] for row in jax_rows]


# ------------------------------------------------------------ 4. init_from

@pytest.fixture(scope='module')
def vqa_data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('vqa_data'))
  task_examples.generate(d, ['vqa'], {'train': NUM_TRAIN, 'val': NUM_EVAL,
                                    'test': NUM_TEST},
                       scenes.WorldParams(feature_dim=F), seed=0)
  return d


def vqa_job(data, workdir, init_from):
  """finetune.make_job of a vqa config with init_from, and parameters for
  its model as train.py would pass them to job.initial_params (random
  values: initial_params only merges)."""
  config = tiny_config('vqa')
  config.data.dir = data
  config.init_from = init_from
  mesh = sharding.mesh_from_config(config)
  job = finetune.make_job(config, str(workdir), mesh, sharding.rules(config),
                          config.batch_size)
  return job, random_params(job.model, finetune.init_inputs(config), seed=2)


def test_init_from_takes_the_pretrained_encoders(vqa_data, pretrained,
                                                tmp_path):
  job, fresh = vqa_job(vqa_data, tmp_path, pretrained)
  saved, where = checkpoint.load_pretrained_params(pretrained)
  assert where == os.path.join(pretrained, 'checkpoints', '2')
  merged = job.initial_params(fresh)
  f_merged, f_saved, f_fresh = flat(merged), flat(saved), flat(fresh)
  assert set(f_merged) == set(f_fresh)
  assert {k.split('/')[0] for k in f_fresh} == set(ENCODER_PARAMS) | {
      'vqa_head'}
  encoder_keys = [k for k in f_merged if k.split('/')[0] in ENCODER_PARAMS]
  assert len(encoder_keys) > 20
  for k in encoder_keys:
    assert f_merged[k].dtype == f_fresh[k].dtype
    np.testing.assert_array_equal(f_merged[k], f_saved[k], err_msg=k)
  assert all(not np.array_equal(f_saved[k], f_fresh[k])
             for k in encoder_keys if f_saved[k].size > 1)
  # The task head is not in the checkpoint and keeps its fresh values.
  assert not any(k.startswith('vqa_head') for k in f_saved)
  head = [k for k in f_merged if k.startswith('vqa_head/')]
  assert head
  for k in head:
    np.testing.assert_array_equal(f_merged[k], f_fresh[k], err_msg=k)


def test_init_from_a_workdir_named_by_a_number(vqa_data, pretrained,
                                               tmp_path):
  numbered = tmp_path / '7'
  os.symlink(pretrained, numbered)  # A pre-training workdir named '7'.
  job, fresh = vqa_job(vqa_data, tmp_path / 'work', str(numbered))
  merged = flat(job.initial_params(fresh))
  saved = flat(checkpoint.load_pretrained_params(pretrained)[0])
  for k, v in merged.items():
    if k.split('/')[0] in ENCODER_PARAMS:
      np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_init_from_a_missing_directory(vqa_data, tmp_path):
  missing = str(tmp_path / 'no_such_pretrain_run')
  job, fresh = vqa_job(vqa_data, tmp_path, missing)
  with pytest.raises(FileNotFoundError) as e:
    job.initial_params(fresh)
  assert missing in str(e.value)


def test_init_from_another_size_names_parameter_and_shapes(
    vqa_data, narrow_checkpoint, tmp_path):
  job, fresh = vqa_job(vqa_data, tmp_path, narrow_checkpoint)
  with pytest.raises(ValueError) as e:
    job.initial_params(fresh)
  message = str(e.value)
  where = os.path.join(narrow_checkpoint, 'checkpoints', '1')
  assert message.startswith(f'init_from: the {where} does not fit this model')
  # e.g. "text_encoder/.../kernel: <where> (64, 32), model (64, 64)".
  problems = message.split('): ', 1)[1].rstrip('; .').split('; ')
  assert len(problems) == 5  # The first five of many.
  flat_fresh = flat(fresh)
  flat_narrow = flat(checkpoint.load_pretrained_params(narrow_checkpoint)[0])
  for problem in problems:
    name, rest = problem.split(': ', 1)
    assert name.split('/')[0] in ENCODER_PARAMS, problem
    assert rest.startswith(f'{where} ('), problem
    saved_shape, model_shape = (ast.literal_eval(x) for x in rest[
        len(where) + 1:].split(', model '))
    assert saved_shape == tuple(flat_narrow[name].shape), problem
    assert model_shape == tuple(flat_fresh[name].shape) != saved_shape


def test_image_reliance_measures_the_best_checkpoint_as_eval_json_does(runs):
  """experiments/image_reliance on the nlvr2 run's best checkpoint: its
  metric and images-shuffled control are eval.json's val figures, its
  attention masses are fractions, and every trained parameter group gets a
  gradient."""
  run = runs('nlvr2')
  ev = read_json(run['workdir'], 'eval.json')['val']
  report = image_reliance.measure(run['workdir'], 'best', grad_batches=1)
  got = report['steps']['best']
  assert report['blind_baseline'] == pytest.approx(ev['blind_baseline'])
  assert got['accuracy'] == pytest.approx(ev['accuracy'], abs=1e-12)
  assert got['accuracy' + finetune.SHUFFLED] == pytest.approx(
      ev['accuracy' + finetune.SHUFFLED], abs=1e-12)
  layers = run['config'].model.unified_layers
  for key in ('cls_on_regions', 'text_on_regions'):
    assert len(got[key]) == layers
    assert all(0.0 < v < 1.0 for v in got[key]), (key, got[key])
  assert 0.0 < got['uniform_share'] < 1.0
  for group in ('text_encoder', 'vision_encoder', 'unified', 'nlvr2_head'):
    assert got['grad_norm'][group] > 0, group
  assert got['grad_norm']['mask_vector'] == 0  # CMAP is off.
  assert got['grad_norm_region_feats'] > 0


# --------------------------------------------------------------- 5. resume

def test_resume_matches_an_uninterrupted_run(runs, tmp_path):
  """ve stopped at step 3 and run again to the end == the e2e ve run."""
  whole = runs('ve')
  workdir = str(tmp_path / 'resumed')
  first, _ = run_logged(tiny_config('ve', stop_at_step=3), workdir)
  assert first is None
  assert not os.path.exists(os.path.join(workdir, 'eval.json'))
  assert read_json(workdir, 'best.json')['step'] == 3
  results, log = run_logged(tiny_config('ve'), workdir)
  assert f'Resumed from {workdir}/checkpoints at step 3.' in log
  a, b = read_json(whole['workdir'], 'eval.json'), read_json(workdir,
                                                             'eval.json')
  assert b == a  # Metrics, best_step, data_stats: all exactly the same.
  assert results['val'] == a['val'] and results['test'] == a['test']
  for split in ('val', 'test'):
    name = os.path.join('predictions', f've_{split}.jsonl')
    assert read_jsonl(os.path.join(workdir, name)) == read_jsonl(
        os.path.join(whole['workdir'], name))
  # The same parameters, bitwise: the best and the final ones.
  assert_trees_equal(load_best_params(workdir),
                     load_best_params(whole['workdir']), min_leaves=20)
  final_a, _ = checkpoint.load_pretrained_params(whole['workdir'],
                                                 TOTAL_STEPS)
  final_b, _ = checkpoint.load_pretrained_params(workdir, TOTAL_STEPS)
  assert_trees_equal(final_b, final_a, min_leaves=20)


def test_a_restored_state_has_the_types_of_a_fresh_one(runs, tmp_path):
  whole = runs('ve')
  config = tiny_config('ve')
  config.data.dir = whole['data']
  mesh, rules = sharding.mesh_from_config(config), sharding.rules(config)
  job = finetune.make_job(config, str(tmp_path), mesh, rules,
                          config.batch_size)
  tx, _ = train_step.make_optimizer(config)
  fresh, _ = train_step.create_train_state(job.model, job.init_inputs,
                                      job.stat_keys, tx, config, mesh, rules)
  def restore_step_3(state):
    manager = checkpoint.make_manager(whole['workdir'], config)
    try:
      return checkpoint.restore(
          manager, state, pipeline.to_iterator(job.train_ds, config), step=3)
    finally:
      manager.close()

  restored = restore_step_3(fresh)
  assert int(restored.step) == 3
  assert leaf_types(restored) == leaf_types(fresh)

  # A checkpoint that predates a data counter (as fine-tuning checkpoints
  # predate the skipped_* ones) restores with it at 0; a counter this job
  # does not keep is dropped.
  saved_stats = jax.device_get(restored.data_stats)
  stats = dict(fresh.data_stats)
  dropped = stats.pop('examples')
  other = fresh.replace(data_stats={**stats, 'counter_added_later': dropped})
  restored = restore_step_3(other)
  assert leaf_types(restored) == leaf_types(other)
  assert jax.device_get(restored.data_stats) == {
      **{k: v for k, v in saved_stats.items() if k != 'examples'},
      'counter_added_later': 0}
  assert saved_stats['examples'] > 0


# --------------------------------------------------------------- 6. config

@pytest.mark.parametrize('task', TASKS)
def test_finetune_configs_validate(task):
  c = finetune_config.get_config(f'{task},tiny')
  configlib.validate(c)
  assert c.task == task and c.init_from == '' and c.size == 'tiny'
  assert c.eval.best_metric == configlib.BEST_METRIC[task]
  assert 'cmap' not in c and 'loss' not in c
  assert tuple(c.finetune.test_splits) == ('test',)


def test_finetune_config_argument_errors():
  with pytest.raises(ValueError, match=r'configs/finetune\.py needs a task: '
                     r"configs/finetune\.py:TASK with TASK one of \['vqa', "):
    finetune_config.get_config('tiny')
  with pytest.raises(ValueError, match=r"unknown config argument 'huge'; "
                     r"tasks are .*, sizes are \['base', 'minilm', 'small', "
                     r"'tiny'\]"):
    finetune_config.get_config('vqa,huge')


def test_finetune_config_rejects_a_pretraining_best_metric():
  c = finetune_config.get_config('ve,tiny')
  c.eval.best_metric = 'itm_acc'
  with pytest.raises(ValueError, match=r"^config\.eval\.best_metric='itm_acc'"
                     r": not a metric this recipe evaluates; one of "
                     r"\['accuracy'\]$"):
    configlib.validate(c)


def test_finetune_config_rejects_a_non_positive_pretrained_lr_mult():
  c = finetune_config.get_config('vqa,tiny')
  c.finetune.pretrained_lr_mult = 0.0
  with pytest.raises(ValueError, match=r'^config\.finetune\.pretrained_lr_mult'
                     r'=0\.0: must be > 0'):
    configlib.validate(c)


@pytest.mark.parametrize('field,value,why', [
    ('data.source', 'tfds:coco_captions/train', 'only pre-training reads it; '
     'fine-tuning reads its task files (ve_<split>.array_record) from '
     'data.dir'),
    ('data.tfds_data_dir', '/data/tfds', 'only pre-training reads it'),
    ('data.tfds_features.caption', 'captions/text',
     'only pre-training reads it'),
    ('init_step', 3, "picks a checkpoint of init_from, which is '': set "
     'init_from or init_step=0'),
])
def test_finetune_config_refuses_options_nothing_reads(field, value, why):
  c = finetune_config.get_config('ve,tiny')
  *sections, name = field.split('.')
  node = c
  for s in sections:
    node = node[s]
  node[name] = value
  with pytest.raises(ValueError) as e:
    configlib.validate(c)
  assert str(e.value).startswith(f'config.{field}={value!r}: {why}')
  if field == 'init_step':  # With a checkpoint to pick from, it means one.
    c.init_from = '/runs/pretrain'
    configlib.validate(c)
  else:  # Pre-training reads them.
    p = pretrain_config.get_config('tiny')
    node = p
    for s in sections:
      node = node[s]
    node[name] = value
    configlib.validate(p)


# ------------------------------------------------------- 7. bad task data

GARBAGE = b'\xc1\xc1 not msgpack'  # 0xc1 is never used by msgpack.
# rec train record -> what is wrong with it; none is next to another, so
# each bad slot is fed the record after it. 6 steps of 16 are 3 epochs of
# the 32 records: each bad one is skipped exactly 3 times.
BAD_REC_TRAIN = {3: 'expression', 7: 'target_box', 12: 'image_id',
                 20: 'record', 26: 'region_feats'}
BAD_REC_EVAL = {'val': {5: 'target_box'}, 'test': {2: 'image_id'}}


def write_rec_data(directory, bad):
  """tiny_config('rec')'s synthetic splits in `directory`, with the records
  bad[split] names broken as it says (break_rec_records)."""
  config = tiny_config('rec')
  task_examples.generate(
      directory, ['rec'], {'train': NUM_TRAIN, 'val': NUM_EVAL,
                           'test': NUM_TEST},
      scenes.WorldParams.from_config(config), seed=config.seed)
  return break_rec_records(directory, bad)


def break_rec_records(directory, bad):
  """Rewrites the rec splits of `directory` with bad[split][index] broken:
  'expression' (missing), 'target_box' (train: past the image; eval: not
  finite), 'image_id' (not in the store), 'record' (not msgpack) or
  'region_feats' (NaN in its image's region record)."""
  for split, broken in bad.items():
    path = tasks.task_path(directory, 'rec', split)
    source = records.open_source(path)
    raws = []
    for i in range(len(source)):
      ex = records.decode_record(source[i])
      how = broken.get(i)
      if how == 'expression':
        del ex['expression']
      elif how == 'target_box':  # Past the image; or not finite.
        ex['target_box'] = ([0.2, 0.2, 1.5, 0.9] if split == 'train'
                            else [0.1, float('nan'), 0.5, 0.5])
      elif how == 'image_id':
        ex['image_id'] = 'no-such-image'
      elif how == 'region_feats':
        break_region_record(directory, ex['image_id'])
      raws.append(GARBAGE if how == 'record' else records.encode_record(ex))
    records.write_records(path, raws)
  return directory


@pytest.fixture(scope='module')
def bad_rec_data(tmp_path_factory):
  return write_rec_data(str(tmp_path_factory.mktemp('bad_rec')),
                        {'train': BAD_REC_TRAIN, **BAD_REC_EVAL})


def bad_rec_config(data, on_error, max_skip_fraction=0.01):
  """runs('rec')'s config (so its compiled programs) on `data`."""
  c = tiny_config('rec')
  c.model.dropout = 0.0
  c.data.dir = data
  c.data.on_error = on_error
  c.data.max_skip_fraction = max_skip_fraction
  return c


def test_bad_task_record_stops_a_raise_run_naming_file_record_field(
    tmp_path, compilation_cache):
  data = write_rec_data(str(tmp_path / 'data'), {})
  config = bad_rec_config(data, 'raise')
  # A record of the first batch, so the run stops before its first step.
  first, _ = task_pipeline.make_task_dataset(
      config, data, 'rec', 'train', batch_size=config.batch_size, train=True,
      seed=config.seed)
  bad = int(first[0]['example_index'][5])
  break_rec_records(data, {'train': {bad: 'image_id'}})
  path = tasks.task_path(data, 'rec', 'train')
  with pytest.raises(records.RecordError) as e:
    run_logged(config, str(tmp_path / 'run'))
  assert (e.value.path, e.value.index, e.value.field) == (path, bad,
                                                          'image_id')
  assert str(e.value).startswith(
      f"{path}: record {bad}: field 'image_id': {data}/regions.array_record: "
      "no regions for image id 'no-such-image' (")


def test_skip_run_counts_reports_and_evaluates_the_good_examples(
    bad_rec_data, tmp_path, compilation_cache):
  """data.on_error=skip: training feeds the next good example in a bad
  one's place and counts it by field (data_stats, metrics.jsonl, the log's
  report); evaluation leaves bad examples out of the metric and its
  predictions, and eval.json counts them per split."""
  workdir = str(tmp_path / 'run')
  # 15 of 96 examples fed were skipped (15.6 %), 1 of 16 per eval split.
  results, log = run_logged(bad_rec_config(bad_rec_data, 'skip', 0.2),
                            workdir)
  ev = read_json(workdir, 'eval.json')
  assert ev == json.loads(json.dumps(results))
  stats = ev['data_stats']
  assert stats['examples'] == TOTAL_STEPS * 16
  assert {k: v for k, v in stats.items() if k.startswith('skipped_') and v} == {
      'skipped_expression': 3, 'skipped_target_box': 3,
      'skipped_image_id': 3, 'skipped_record': 3, 'skipped_region_feats': 3}
  assert set(stats) == set(task_pipeline.stat_keys(
      'rec', bad_rec_config(bad_rec_data, 'skip')))
  assert ('Data: skipped 15 bad records for 96 examples (15.62%); by field: '
          'record 3, image_id 3, region_feats 3, expression 3, target_box 3.'
          in log)
  lines = [json.loads(line) for line in open(os.path.join(workdir,
                                                          'metrics.jsonl'))]
  train_line = [l for l in lines if 'data/examples' in l][-1]
  assert train_line['data/skipped_target_box'] == 3
  assert [l['eval/num_skipped'] for l in lines if 'eval/accuracy' in l] == [
      1, 1]  # Step 3 and the final one, on val.

  for split, (reason, bad_index) in (('val', ('target_box', 5)),
                                     ('test', ('image_id', 2))):
    got = ev[split]
    assert got['num_examples'] == NUM_EVAL - 1
    assert got['num_skipped'] == 1 and got['skipped'] == {reason: 1}
    # The blind baseline is over the examples evaluated, too.
    good = [ex for i, ex in enumerate(task_pipeline.read_task_examples(
        bad_rec_data, 'rec', split, 'skip')) if i != bad_index]
    assert got['blind_baseline'] == pytest.approx(task_baselines.blind_baseline(
        good, 'rec', regions=region_store.RegionStore(
            region_store.store_path(bad_rec_data))), abs=1e-12)
    path = tasks.task_path(bad_rec_data, 'rec', split)
    assert (f'{path}: Data: skipped 1 bad records for 15 examples (6.67%); '
            f'by field: {reason} 1. Left out of the metrics.') in log
    rows = read_jsonl(os.path.join(workdir, 'predictions',
                                   f'rec_{split}.jsonl'))
    examples = task_pipeline.read_task_examples(bad_rec_data, 'rec', split,
                                                on_error='skip')
    good = [ex for i, ex in enumerate(examples) if i != bad_index]
    assert [(r['ref_id'], r['sent_id']) for r in rows] == [
        (ex['ref_id'], ex['sent_id']) for ex in good]
    assert got['accuracy'] == pytest.approx(
        np.mean([r['correct'] for r in rows]), abs=1e-12)


def test_too_many_skips_stop_the_run_during_training(
    bad_rec_data, tmp_path, monkeypatch, compilation_cache):
  # The check runs at every log line once enough examples were read
  # (lowered here from 1000): the run stops at its first, step 1, whose 16
  # examples took 3 skips.
  monkeypatch.setattr(train, 'MIN_EXAMPLES_FOR_SKIP_CHECK', 0)
  config = bad_rec_config(bad_rec_data, 'skip', 0.1)
  config.log_every = 1
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError) as e:
    run_logged(config, workdir)
  assert str(e.value) == (
      'Skipped 3 bad records for 16 examples (18.75%), more than '
      'config.data.max_skip_fraction=0.1 allows; by field: record 1, '
      'region_feats 1, target_box 1. Fix the records (data.on_error=raise '
      'names the first one) or raise data.max_skip_fraction.')
  assert not os.listdir(checkpoint.checkpoint_dir(workdir))


def test_too_many_skips_in_an_eval_split_stop_the_run():
  config = tiny_config('rec')
  config.data.max_skip_fraction = 0.05
  assert finetune.eval_skips(config, '/d', 'val', 16, {'target_box': 0}) == (
      dict(num_skipped=0, skipped={}))
  with pytest.raises(ValueError) as e:
    finetune.eval_skips(config, '/d', 'val', 15, {'target_box': 1})
  assert str(e.value).startswith(
      '/d/rec_val.array_record: Skipped 1 bad records for 15 examples '
      '(6.67%), more than config.data.max_skip_fraction=0.05 allows; by '
      'field: target_box 1.')
  config.data.max_skip_fraction = 0.1
  assert finetune.eval_skips(config, '/d', 'val', 15, {'target_box': 1}) == (
      dict(num_skipped=1, skipped={'target_box': 1}))
