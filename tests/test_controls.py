"""The shortcuts of AMC and ITM are closed, and the controls that expose them
(cmal_jax/controls.py) do what they say. Each shortcut test also runs the
ablation that reopens it, so it fails if the fix stops working."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax import configlib, controls, finetune, objectives, train_step
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.model.cmap import MASK as MASK_ACTION
from cmal_jax.model.cmap import NONE, SWAP
from cmal_testutil import CLS, MASK, PAD, SEP, VOCAB, random_batch
from configs.pretrain import get_config

SPECIALS = objectives.SpecialTokens(PAD, CLS, SEP, MASK, VOCAB)
B, T, R, K, F = 8, 16, 6, 3, 64


def config_with(moved_place='none', **cmap):
  c = get_config('tiny')
  c.model.moved_place = moved_place
  c.model.region_feat_dim = F
  c.model.vocab_size = VOCAB
  c.cmap.update(cmap)
  return c


def model_of(config):
  return CMAL(ModelConfig.from_config(config.model, num_tags=10))


@pytest.fixture(scope='module')
def batch():
  return jax.tree.map(jnp.asarray, {k: v for k, v in random_batch(
      3, B, T, R, K, F).items() if k != 'stats'})


@pytest.fixture(scope='module')
def params(batch):
  c = config_with()
  inputs, _ = objectives.prepare_inputs(batch, jax.random.key(0), c,
                                        SPECIALS, actions='all_swapped')
  return model_of(c).init(jax.random.key(1), inputs)['params']


def apply(config, params, inputs):
  return jax.jit(lambda p, x: model_of(config).apply({'params': p}, x))(
      params, inputs)


def swapped_inputs(config, batch):
  return objectives.prepare_inputs(batch, jax.random.key(0), config,
                                   SPECIALS, actions='all_swapped',
                                   corrupt=False)


@pytest.mark.parametrize('moved_place', ['none', 'carried'])
def test_a_moved_feature_carries_no_place(batch, params, moved_place):
  """With moved_place='none' the outputs do not change when the place the
  moved features came from is scrambled; 'carried' (the paper's single
  pass) is the ablation where they do."""
  c = config_with(moved_place)
  inputs, targets = swapped_inputs(c, batch)
  assert int(targets['amc_weights'].sum()) >= B  # Anchors to move.
  scrambled = controls.place_scrambled(inputs, jax.random.key(5))
  a, b = apply(c, params, inputs), apply(c, params, scrambled)
  same = all(np.array_equal(a[k], b[k]) for k in
             ('amc_t2r_logits', 'amc_r2t_logits', 'itm_logits'))
  assert same == (moved_place == 'none')


def test_scrambled_places_permute_the_real_slots_only(batch):
  order = np.asarray(controls.shuffled_real_slots(jax.random.key(2),
                                                  batch['region_mask']))
  mask = np.asarray(batch['region_mask'])
  for row, m in zip(order, mask):
    n = int(m.sum())
    assert sorted(row[:n]) == list(range(n))  # A permutation of the real.
    assert list(row[n:]) == list(range(n, R))  # Padding stays in place.


def test_next_anchor_is_a_cycle_over_the_valid_anchors():
  valid = jnp.asarray([[True, True, True], [True, False, True],
                       [False, True, False]])
  got = np.asarray(controls.next_anchor(valid))
  assert list(got[0]) == [1, 2, 0]
  assert got[1, 0] == 2 and got[1, 2] == 0  # 0 -> 2 -> 0, 1 is not valid.
  assert got[2, 1] == 1  # The only anchor maps to itself.


def content_partners(inputs, moved, targets):
  """[B, K] int: the anchor a model pairing by content picks from each word
  slot p_k: CMAP puts there the moved region of k's region slot; its word
  is the anchor a whose region that is, and the pick is the anchor j whose
  region slot o_j holds a's word (moved input id at p_j). -1: none."""
  ids = np.asarray(moved.get('input_ids', inputs['input_ids']))
  feats = np.asarray(moved.get('region_feats', inputs['region_feats']))
  pos, region = np.asarray(inputs['anchor_text_pos']), np.asarray(
      inputs['anchor_region'])
  valid, word = np.asarray(targets['amc_weights']), np.asarray(
      targets['amc_word'])
  own = np.asarray(inputs['region_feats'])
  picks = np.full(valid.shape, -1)
  for b, k in zip(*np.nonzero(valid)):
    # The anchor whose (unmoved) region the moved feature at o_k is.
    a = [i for i in np.nonzero(valid[b])[0]
         if np.array_equal(feats[b, region[b, k]], own[b, region[b, i]])][0]
    hits = [j for j in np.nonzero(valid[b])[0]
            if ids[b, pos[b, j]] == word[b, a]]
    picks[b, k] = hits[0] if hits else -1
  return picks


def test_place_only_puts_another_anchors_word_in_each_place(batch):
  c = config_with('carried')
  inputs, targets = swapped_inputs(c, batch)
  exchanged, weights = controls.place_only(inputs, targets)
  moved, w = exchanged['moved'], np.asarray(weights)
  assert w.sum() >= 2
  # Only the words move: positions, boxes and region content stay.
  assert set(moved) == {'input_ids'}
  source = np.asarray(controls.next_anchor(targets['amc_weights']))
  pos = np.asarray(inputs['anchor_text_pos'])
  ids = np.asarray(inputs['input_ids'])
  changed = moved['input_ids'] != ids
  for b, k in zip(*np.nonzero(w)):
    assert moved['input_ids'][b, pos[b, k]] == ids[b, pos[b, source[b, k]]]
  assert changed.sum() == len(set(
      (b, pos[b, k]) for b, k in zip(*np.nonzero(w))))
  # A model pairing by content gets every all-swapped anchor right and every
  # place-only anchor wrong: the control tells content from place.
  valid = np.asarray(targets['amc_weights'])
  own = content_partners(inputs, {}, targets)
  for b, k in zip(*np.nonzero(valid)):
    assert own[b, k] == k
  picks = content_partners(inputs, moved, targets)
  for b, k in zip(*np.nonzero(w)):
    assert picks[b, k] != k
  chance_sum, count = controls.pairing_chance(targets['amc_weights'],
                                              weights)
  assert count == w.sum() and 0 < chance_sum / count <= 0.5
  # With every anchor scored (evaluate's amc_pair_chance_all_swapped): the
  # mean over anchors of 1 / the anchors of their example.
  valid = np.asarray(targets['amc_weights']) > 0
  per_example = valid.sum(axis=1, keepdims=True)
  all_sum, all_count = controls.pairing_chance(targets['amc_weights'],
                                               targets['amc_weights'])
  assert all_count == valid.sum()
  np.testing.assert_allclose(
      all_sum, np.sum(valid / np.maximum(per_example, 1)), rtol=1e-6)


@pytest.mark.parametrize('hide', [True, False])
def test_a_masked_anchor_word_never_reaches_the_encoders(batch, params,
                                                         hide):
  """Every selected anchor masked: changing the anchors' words (and their
  regions' features) changes no output when cmap.hide_inputs; without it
  (the ablation) the neighbours carry them."""
  c = config_with(select_prob=1.0, swap_prob=0.0, mask_prob=1.0,
                  hide_inputs=hide)
  cover = objectives.anchor_text_cover(batch)
  regions = objectives.anchor_region_cover(batch)
  other = dict(batch,
               input_ids=jnp.where(cover, 1234, batch['input_ids']),
               region_feats=jnp.where(regions[..., None], 7.0,
                                      batch['region_feats']))
  outs = []
  for b in (batch, other):
    inputs, targets = objectives.prepare_inputs(b, jax.random.key(0), c,
                                                SPECIALS, corrupt=False)
    assert np.all((np.asarray(inputs['anchor_action']) == MASK_ACTION)
                  == np.asarray(batch['anchor_valid']))
    outs.append(apply(c, params, inputs))
  same = all(np.array_equal(outs[0][k], outs[1][k]) for k in
             ('amc_t2r_logits', 'amc_tag_logits', 'mlm_logits', 'itm_logits'))
  assert same == hide


@pytest.mark.parametrize('itm_inputs', ['label_blind', 'corrupted'])
def test_itm_reads_inputs_that_do_not_depend_on_the_anchors(batch, params,
                                                           itm_inputs):
  """Label-blind ITM: the ITM loss is the same for a batch whose anchors
  were detected differently (negatives have fewer); 'corrupted' ITM (the
  ablation) reads CMAP's swaps."""
  c = config_with()
  c.loss.amc = 1.0
  c.cmap.enabled = True
  c.loss.itm_inputs = itm_inputs
  loss = objectives.pretraining_loss(model_of(c), c, SPECIALS)
  fewer = dict(batch, anchor_valid=batch['anchor_valid'].at[:, 1:].set(False))
  itm = []
  for b in (batch, fewer):
    prepared = loss.prepare(b, jax.random.key(0))
    assert ('itm_inputs' in prepared) == (itm_inputs == 'label_blind')
    if 'itm_inputs' in prepared:
      assert not {'anchor_action', 'moved'} & set(prepared['itm_inputs'])
    _, metrics = jax.jit(loss.loss)(params, prepared, jax.random.key(1),
                                    loss.denominators(prepared))
    itm.append(float(metrics['loss_itm']))
  assert (itm[0] == itm[1]) == (itm_inputs == 'label_blind')


def test_itm_warmup_reads_the_cmap_pass_then_the_label_blind_one(batch,
                                                                 params):
  """loss.itm_corrupted_warmup=0.5 of 10 steps: ITM's loss depends on the
  detected anchors at steps 0-4 (it reads the CMAP pass), not from step 5."""
  c = config_with()
  c.loss.amc = 1.0
  c.cmap.enabled = True
  c.total_steps, c.loss.itm_corrupted_warmup = 10, 0.5
  loss = objectives.pretraining_loss(model_of(c), c, SPECIALS)
  fewer = dict(batch, anchor_valid=batch['anchor_valid'].at[:, 1:].set(False))
  step_loss = jax.jit(loss.loss)
  for step, reads_cmap in ((0, True), (4, True), (5, False), (9, False)):
    state = types.SimpleNamespace(step=jnp.int32(step))
    itm = []
    for b in (batch, fewer):
      prepared = loss.prepare(b, jax.random.key(0), state)
      assert np.all(np.asarray(prepared['itm_reads_corrupted']) == reads_cmap)
      _, metrics = step_loss(params, prepared, jax.random.key(1),
                             loss.denominators(prepared))
      itm.append(float(metrics['loss_itm']))
    assert (itm[0] != itm[1]) == reads_cmap, (step, itm)

  # The label-blind pass is one branch of a switch between gradients (not
  # computed and selected away, nor a switch inside the differentiated loss,
  # which fills the other branch's residuals with zeros): during the warm-up
  # a step runs neither it nor its backward pass, and no dot runs outside
  # the switch.
  jaxpr = jax.make_jaxpr(lambda p, b: train_step.loss_and_grads(
      loss, p, b, jax.random.key(1), state=state))(params, batch).jaxpr
  dots_in = lambda eqns: sum(e.primitive.name == 'dot_general' for e in eqns)
  conds = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
  assert len(conds) == 1 and dots_in(jaxpr.eqns) == 0
  warmup, label_blind = (dots_in(b.jaxpr.eqns)
                         for b in reversed(conds[0].params['branches']))
  assert warmup > 10 and label_blind > 1.5 * warmup, (warmup, label_blind)


@pytest.mark.parametrize('tag_at', ['unswapped', 'all'])
def test_the_tag_is_not_scored_where_the_word_took_the_slot(batch, tag_at):
  c = config_with(select_prob=1.0)
  c.loss.amc_tag_at = tag_at
  _, t = objectives.prepare_inputs(batch, jax.random.key(4), c, SPECIALS)
  action = np.asarray(
      objectives.prepare_inputs(batch, jax.random.key(4), c,
                                SPECIALS)[0]['anchor_action'])
  tagged = (action != NONE) & (np.asarray(t['amc_tag']) >= 0)
  want = tagged & ((action != SWAP) | (tag_at == 'all'))
  assert (action == SWAP).any() and (tagged & (action != SWAP)).any()
  np.testing.assert_array_equal(t['amc_tag_weights'], want)


@pytest.mark.parametrize('field,value', [('model.moved_place', 'both'),
                                         ('loss.amc_tag_at', 'word'),
                                         ('loss.itm_inputs', 'clean'),
                                         ('loss.itm_corrupted_warmup', 1.5)])
def test_a_bad_setting_names_its_field(field, value):
  c = get_config('tiny')
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r}"):
    configlib.validate(c)


def test_same_anchor_negatives_match_the_positives_anchor_count():
  counts = np.array([[2, 1, 2, 0],
                     [0, 1, 1, 1],
                     [3, 3, 1, 2],
                     [1, 2, 2, 0]])  # Caption 3 has no anchor of its own.
  picks = controls.same_anchor_negatives(counts, seed=0)
  assert picks[0] == 2
  assert picks[1] in (2, 3)
  assert picks[2] == -1  # No other image gives caption 2 one anchor.
  assert picks[3] == -1
  # The seed decides among the qualifying images; the rule holds for all.
  for seed in range(5):
    p = controls.same_anchor_negatives(counts, seed)
    assert p[1] in (2, 3) and p[0] == 2 and p[2] == p[3] == -1


def test_same_anchor_itm_is_balanced_over_the_captions_scored():
  counts = np.array([[1, 1, 0], [0, 2, 2], [0, 1, 1]])
  picks = controls.same_anchor_negatives(counts, seed=0)
  assert list(picks) == [1, 2, 1]
  scores = np.full((3, 3), np.log(0.9))  # Everything predicted a match.
  got = controls.same_anchor_itm(scores, counts, seed=0)
  assert got == dict(itm_acc_same_anchors=0.5, itm_pairs_same_anchors=3.0)
  scores[0, 1] = scores[1, 2] = np.log(0.2)  # Two negatives rejected.
  scores[2, 2] = np.log(0.4)  # One positive missed.
  got = controls.same_anchor_itm(scores, counts, seed=0)
  assert got['itm_acc_same_anchors'] == pytest.approx(4 / 6)


def test_an_itm_warmup_with_corrupted_itm_is_refused():
  """The warm-up reads the CMAP pass before label-blind ITM's own; ITM on
  the corrupted pass reads it throughout, so a warm-up means nothing."""
  c = get_config('tiny')
  c.loss.itm_inputs = 'corrupted'
  with pytest.raises(ValueError) as e:
    configlib.validate(c)
  assert str(e.value) == (
      "config.loss.itm_corrupted_warmup=0.5: the warm-up only applies to "
      "label-blind ITM; with loss.itm_inputs='corrupted' ITM reads the CMAP "
      'pass throughout: set loss.itm_corrupted_warmup=0')
  c.loss.itm_corrupted_warmup = 0.0
  configlib.validate(c)


def test_paper_behaviour_opens_the_four_shortcuts():
  from configs import pretrain
  fixed, paper = get_config('tiny'), get_config('tiny,cmal,paper')
  got = lambda c: {p: c[p.split('.')[0]][p.split('.')[1]]
                   for p in pretrain.PAPER_BEHAVIOUR}
  assert got(paper) == pretrain.PAPER_BEHAVIOUR
  assert got(fixed) == {'model.moved_place': 'none', 'cmap.hide_inputs': True,
                        'loss.amc_tag_at': 'unswapped',
                        'loss.itm_inputs': 'label_blind',
                        'loss.itm_corrupted_warmup': 0.5}
  configlib.validate(paper)  # A valid config.
  with pytest.raises(ValueError, match="behaviours are \\['fixed', 'paper'\\]"):
    get_config('tiny,shortcuts')


# ------------------------------------------- fine-tuning: images shuffled

def test_next_valid_row_is_a_cycle_over_the_valid_rows():
  valid = jnp.array([True, False, True, True, False, True])
  np.testing.assert_array_equal(controls.next_valid_row(valid),
                                [2, 1, 3, 5, 4, 0])
  np.testing.assert_array_equal(
      controls.next_valid_row(jnp.array([False, True, False])), [0, 1, 2])


class _ReadsTheImage:
  """A stand-in model whose logits are the first region feature's first
  3 values: its prediction is whatever the image says."""

  def apply(self, variables, inputs):
    del variables
    return {'logits': inputs['region_feats'][:, 0, :3]}


def test_images_shuffled_scores_each_example_on_the_next_ones_image():
  """VE through finetune.make_predict_step: a model that answers from the
  image alone predicts the next valid example's label under the control,
  and its own without; the text, labels and padding rows stay put."""
  labels = np.array([0, 1, 2, 1, 0])
  valid = np.array([True, True, True, True, False])
  feats = np.zeros((5, 2, 4), np.float32)
  feats[np.arange(5), 0, labels] = 1.0
  batch = {'input_ids': jnp.arange(5 * 3).reshape(5, 3),
           'text_mask': jnp.ones((5, 3), jnp.int32),
           'region_feats': jnp.asarray(feats),
           'region_boxes': jnp.asarray(np.random.rand(5, 2, 4), jnp.float32),
           'region_mask': jnp.ones((5, 2), jnp.int32),
           'label': jnp.asarray(labels), 'valid': jnp.asarray(valid)}
  config = types.SimpleNamespace(task='ve')
  own = finetune.make_predict_step(_ReadsTheImage(), config)(None, batch)
  shuffled = finetune.make_predict_step(
      _ReadsTheImage(), config, controls.images_shuffled)(None, batch)
  np.testing.assert_array_equal(own['prediction'], labels)
  np.testing.assert_array_equal(shuffled['prediction'], [1, 2, 1, 0, 0])
  moved = controls.images_shuffled(batch)
  for k in ('input_ids', 'text_mask', 'label', 'valid'):
    np.testing.assert_array_equal(moved[k], batch[k])
  np.testing.assert_array_equal(moved['region_boxes'][:4],
                                np.asarray(batch['region_boxes'])[[1, 2, 3, 0]])


def test_images_shuffled_moves_an_nlvr2_image_pair_together():
  images = jnp.arange(3 * 2 * 5, dtype=jnp.float32).reshape(3, 2, 5, 1)
  moved = controls.images_shuffled(
      {'region_feats': images, 'valid': jnp.ones(3, bool)})
  np.testing.assert_array_equal(
      moved['region_feats'], np.asarray(images)[[1, 2, 0]])
