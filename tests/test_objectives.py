"""Tests for input corruption and the loss helpers (cmal_jax/objectives.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_testutil import CLS, MASK, PAD, SEP, VOCAB, random_batch
from cmal_jax import objectives
from cmal_jax.model.cmap import NONE, SWAP
from cmal_jax.model import xent
from configs.pretrain import get_config

SPECIALS = objectives.SpecialTokens(PAD, CLS, SEP, MASK, VOCAB)


def expected_counts(eligible, prob):
    """Allowed numbers of picks per row: round(prob * n), at least 1 where
    n > 0; at an exact .5 tie either neighbour is accepted."""
    out = []
    for n in eligible.sum(1):
        x = prob * n
        if n == 0:
            out.append({0})
        elif abs(x - math.floor(x) - 0.5) < 1e-6:
            out.append({max(1, math.floor(x)), max(1, math.ceil(x))})
        else:
            out.append({max(1, round(x))})
    return out


@pytest.mark.parametrize('prob,L', [(0.15, 24), (0.15, 20), (0.5, 9),
                                    (0.3, 13), (0.01, 10), (1.0, 7)])
def test_choose_positions(prob, L):
    rng = np.random.default_rng(int(prob * 100) + L)
    B = 40
    density = rng.random((B, 1))
    eligible = rng.random((B, L)) < density
    eligible[0] = False  # A row with nothing eligible.
    eligible[1] = True  # A row with everything eligible.
    eligible[2] = False
    eligible[2, L - 1] = True  # Exactly one, at the end.
    choose = jax.jit(objectives.choose_positions, static_argnums=2)
    hits = np.zeros((B, L))
    for seed in range(20):
        pos, w = map(np.asarray, choose(jax.random.key(seed),
                                        jnp.asarray(eligible), prob))
        M = max(1, math.ceil(prob * L))
        assert pos.shape == w.shape == (B, M)
        assert pos.dtype == np.int32 and w.dtype == bool
        for b, allowed in enumerate(expected_counts(eligible, prob)):
            picked = pos[b][w[b]]
            assert len(picked) in allowed, (b, eligible[b].sum(), picked)
            assert len(set(picked.tolist())) == len(picked)  # Distinct.
            assert np.all(eligible[b, picked])  # Never ineligible.
            # Weighted entries come first (the loss only reads weights, but
            # the count semantics rely on a prefix).
            assert not np.any(w[b, len(picked):])
            hits[b, picked] += 1
    assert np.all(hits[~eligible] == 0)
    assert hits[2, L - 1] == 20 and hits[0].sum() == 0
    # Random: with a partial pick, more than one choice is seen over seeds.
    partial = [b for b in range(B)
               if 0 < max(expected_counts(eligible[b:b + 1], prob)[0])
               < eligible[b].sum()]
    for b in partial:
        assert (hits[b] > 0).sum() > max(expected_counts(
            eligible[b:b + 1], prob)[0])


def test_choose_positions_static_shape_examples():
    e = jnp.ones((2, 24), bool)
    assert objectives.choose_positions(jax.random.key(0), e, 0.15)[0].shape == (2, 4)
    assert objectives.choose_positions(jax.random.key(0), e, 0.0)[0].shape == (2, 1)
    pos, w = objectives.choose_positions(jax.random.key(0), e, 0.5)
    assert pos.shape == (2, 12) and bool(jnp.all(w))


@pytest.fixture(scope='module')
def config():
    """The tiny config with hidden anchors read as they are, so that what
    MLM and MRC corrupt is all that changes in the inputs (cmap.hide_inputs
    is tested in test_controls.py)."""
    c = get_config('tiny')
    c.cmap.hide_inputs = False
    return c


@pytest.fixture(scope='module')
def batch(config):
    return random_batch(0, 32, config.data.max_text_len,
                        config.data.max_regions, config.data.max_anchors,
                        config.model.region_feat_dim)


_JITTED = {}


def prep(config, batch, seed, **kw):
    """prepare_inputs, jitted once per (config, options), on the host."""
    key = (config.to_json(), tuple(sorted(kw.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda b, r: objectives.prepare_inputs(
            b, r, config, SPECIALS, **kw))
    return jax.device_get(_JITTED[key](batch, jax.random.key(seed)))


def anchor_cover(batch):
    B, T = batch['input_ids'].shape
    cover = np.zeros((B, T), bool)
    for b in range(B):
        for k in np.flatnonzero(batch['anchor_valid'][b]):
            cover[b, batch['anchor_text_pos'][b, k]:batch['anchor_text_end'][b, k]] = True
    return cover


def test_batch_generator_is_realistic(batch):
    assert np.all(batch['input_ids'][:, 0] == CLS)
    assert np.all((batch['input_ids'] == SEP).sum(1) == 1)
    assert batch['itm_label'].min() == 0 and batch['itm_label'].max() == 1
    assert batch['anchor_valid'].sum() > 20
    assert anchor_cover(batch).sum() > batch['anchor_valid'].sum()  # Multi-piece.


def test_prepare_inputs_mlm_masks_only_eligible_tokens(config, batch):
    ids = batch['input_ids']
    special = np.isin(ids, [CLS, SEP, PAD])
    cover = anchor_cover(batch)
    positive = batch['itm_label'] > 0
    eligible = (batch['text_mask'] > 0) & ~special & ~cover
    n_masked = n_weighted = n_changed = 0
    n_changed_neg = 0
    for seed in range(10):
        inputs, targets = prep(config, batch, seed)
        new = inputs['input_ids']
        changed = new != ids
        assert not np.any(changed & ~eligible), np.argwhere(changed & ~eligible)
        assert np.all(new[special] == ids[special])
        assert np.all(new[cover] == ids[cover])
        pos, w = inputs['mlm_positions'], targets['mlm_weights']
        # Negatives are corrupted too (else [MASK] would reveal itm_label)
        # but never scored: their caption does not describe the image.
        assert not np.any(w[~positive])
        n_changed_neg += changed[~positive].sum()
        rows = np.broadcast_to(np.arange(len(ids))[:, None], pos.shape)
        assert np.all(eligible[rows[w], pos[w]])
        # Targets are the original tokens; every changed slot of a positive
        # is a target.
        np.testing.assert_array_equal(targets['mlm_targets'][w],
                                      ids[rows[w], pos[w]])
        picked = np.zeros_like(changed)
        picked[rows[w], pos[w]] = True
        assert not np.any(changed[positive] & ~picked[positive])
        for b, allowed in enumerate(expected_counts(eligible, 0.15)):
            if positive[b]:
                assert w[b].sum() in allowed, (b, w[b].sum(), allowed)
        n_weighted += w.sum()
        n_masked += (new[rows[w], pos[w]] == MASK).sum()
        n_changed += changed.sum()
        # Everything else passes through untouched.
        for k in ('text_mask', 'region_boxes', 'region_mask', 'anchor_text_pos',
                  'anchor_text_end', 'anchor_region'):
            np.testing.assert_array_equal(inputs[k], batch[k])
    # About 80 % of the picked tokens become [MASK].
    assert n_weighted > 100
    assert 0.7 < n_masked / n_weighted < 0.9
    assert n_changed >= n_masked
    assert n_changed_neg > 50


def test_prepare_inputs_mrc_masks_only_eligible_regions(config, batch):
    config = config.copy_and_resolve_references()
    config.loss.mrc = 1.0
    region_cover = np.zeros(batch['region_mask'].shape, bool)
    for b in range(len(region_cover)):
        region_cover[b, batch['anchor_region'][b][batch['anchor_valid'][b]]] = True
    eligible = ((batch['region_mask'] > 0) & (batch['region_tags'] >= 0)
                & ~region_cover)
    positive = batch['itm_label'] > 0
    zeroed_total = zeroed_neg = 0
    for seed in range(5):
        inputs, targets = prep(config, batch, seed)
        zeroed = np.any(inputs['region_feats'] != batch['region_feats'], -1)
        assert not np.any(zeroed & ~eligible)
        assert np.all(inputs['region_feats'][zeroed] == 0)
        w = targets['mrc_weights']
        assert not np.any(w[~positive])  # Zeroed like positives, not scored.
        zeroed_neg += zeroed[~positive].sum()
        rows = np.broadcast_to(np.arange(len(w))[:, None], w.shape)
        np.testing.assert_array_equal(
            targets['mrc_targets'][w],
            batch['region_tags'][rows[w], targets['mrc_positions'][w]])
        assert np.all(targets['mrc_targets'][w] >= 0)
        zeroed_total += zeroed.sum()
    assert zeroed_total > 0 and zeroed_neg > 0


def test_mlm_modifier_prob_picks_the_word_before_each_anchor(config, batch):
    """loss.mlm_modifier_prob=1: MLM takes the eligible word just before
    every valid anchor first (the rest of its share at random), and the
    number it picks per caption is unchanged."""
    cover = anchor_cover(batch)
    ids = batch['input_ids']
    eligible = ((batch['text_mask'] > 0) & ~np.isin(ids, [CLS, SEP, PAD])
                & ~cover)
    modifier = np.zeros_like(eligible)
    for b in range(len(ids)):
        for k in np.flatnonzero(batch['anchor_valid'][b]):
            modifier[b, batch['anchor_text_pos'][b, k] - 1] = True
    modifier &= eligible
    np.testing.assert_array_equal(
        np.asarray(objectives.anchor_modifier_slots(batch)) & eligible,
        modifier)
    assert modifier.sum() > 10
    c = config.copy_and_resolve_references()
    c.loss.mlm_modifier_prob = 1.0
    positive = batch['itm_label'] > 0
    for seed in range(3):
        inputs, targets = prep(c, batch, seed)
        _, uniform = prep(config, batch, seed)
        pos, w = inputs['mlm_positions'], targets['mlm_weights']
        picked = np.zeros_like(modifier)
        rows = np.broadcast_to(np.arange(len(ids))[:, None], pos.shape)
        picked[rows[w], pos[w]] = True
        np.testing.assert_array_equal(w.sum(1),
                                      uniform['mlm_weights'].sum(1))
        for b in np.flatnonzero(positive):
            # Modifiers first: all of them, or as many as the share takes.
            assert (picked[b] & modifier[b]).sum() == min(
                modifier[b].sum(), w[b].sum()), b


def test_mask_anchors_lets_mlm_and_mrc_pick_anchors(config, batch):
    """loss.mask_anchors (SemVLP, SemMIM: CMAP off): anchor words and
    regions are eligible; they were never picked without it (above)."""
    config = config.copy_and_resolve_references()
    config.cmap.enabled, config.loss.amc = False, 0.0
    config.loss.mrc, config.loss.mask_anchors = 1.0, True
    region_cover = np.zeros(batch['region_mask'].shape, bool)
    for b in range(len(region_cover)):
        region_cover[b, batch['anchor_region'][b][batch['anchor_valid'][b]]] = True
    text_hits = region_hits = 0
    for seed in range(5):
        inputs, _ = prep(config, batch, seed)
        text_hits += (inputs['input_ids'] != batch['input_ids'])[
            anchor_cover(batch)].sum()
        zeroed = np.any(inputs['region_feats'] != batch['region_feats'], -1)
        region_hits += zeroed[region_cover].sum()
    assert text_hits > 10 and region_hits > 5, (text_hits, region_hits)


def test_prepare_inputs_all_swapped_swaps_exactly_the_valid_anchors(config,
                                                                    batch):
    valid = batch['anchor_valid']
    for seed in range(3):
        inputs, targets = prep(config, batch, seed, actions='all_swapped')
        np.testing.assert_array_equal(inputs['anchor_action'],
                                      np.where(valid, SWAP, NONE))
        np.testing.assert_array_equal(targets['amc_weights'], valid)
    # AMC targets: the anchor word's first piece and its region's tag.
    rows = np.broadcast_to(np.arange(len(valid))[:, None], valid.shape)
    np.testing.assert_array_equal(
        targets['amc_word'][valid],
        batch['input_ids'][rows[valid], batch['anchor_text_pos'][valid]])
    np.testing.assert_array_equal(
        targets['amc_tag'][valid],
        batch['region_tags'][rows[valid], batch['anchor_region'][valid]])
    # corrupt=False with CMAP off leaves the text and regions as they are
    # (with CMAP on, cmap.hide_inputs hides the anchors: test_controls.py).
    inputs, _ = prep(config, batch, 0, corrupt=False, actions='none')
    assert 'anchor_action' not in inputs and 'moved' not in inputs
    np.testing.assert_array_equal(np.asarray(inputs['input_ids']),
                                  batch['input_ids'])
    np.testing.assert_array_equal(np.asarray(inputs['region_feats']),
                                  batch['region_feats'])


def test_prepare_inputs_train_actions(config, batch):
    valid = batch['anchor_valid']
    actions = np.stack([prep(config, batch, s)[0]['anchor_action']
                        for s in range(8)])
    assert np.all(actions[:, ~valid] == NONE)
    assert 0.3 < np.mean(actions[:, valid] != NONE) < 0.7
    cmcl = get_config('tiny,cmcl')
    for actions in ('sampled', 'all_swapped'):  # CMAP off: nothing moves.
        off = prep(cmcl, batch, 0, actions=actions)[0]
        assert 'anchor_action' not in off and 'moved' not in off


def test_weighted_xent_zero_weights():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 7)),
                         jnp.float32)
    labels = jnp.full((3, 5), -1, jnp.int32)  # Unweighted entries may be -1.
    weights = jnp.zeros((3, 5), bool)
    loss, acc, n = xent.weighted_xent(logits, labels, weights)
    assert float(loss) == 0.0 and float(acc) == 0.0 and float(n) == 0.0
    grad = jax.grad(lambda l: xent.weighted_xent(l, labels, weights)[0])(
        logits)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad).max()) == 0.0


def test_weighted_xent_values():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6)).astype(np.float32)
    labels = np.array([0, 5, -1, 2])
    weights = np.array([True, True, False, True])
    loss, acc, n = xent.weighted_xent(jnp.asarray(logits),
                                            jnp.asarray(labels),
                                            jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean([logp[i, labels[i]] for i in (0, 1, 3)])
    want_acc = np.mean([logits[i].argmax() == labels[i] for i in (0, 1, 3)])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(acc), want_acc, rtol=1e-6)
    assert float(n) == 3.0


@pytest.mark.parametrize('log_scale', [math.log(100.0), 20.0])
def test_itc_loss_aligned_orthogonal_is_zero(log_scale):
    B = 6
    e = jnp.eye(B, 8, dtype=jnp.float32)
    loss, acc = objectives.itc_loss(e, e, jnp.float32(log_scale),
                                    jnp.ones(B, bool))
    assert 0.0 <= float(loss) < 1e-6 and float(acc) == 1.0
    # Misaligned (image i matches caption i+1) is far from zero.
    loss, acc = objectives.itc_loss(e, jnp.roll(e, 1, 0), jnp.float32(log_scale),
                                    jnp.ones(B, bool))
    assert float(loss) > 50 and float(acc) == 0.0


def test_itc_loss_identical_embeddings_is_log_b():
    B = 8
    v = jnp.ones((B, 4), jnp.float32) / 2.0
    loss, _ = objectives.itc_loss(v, v, jnp.float32(math.log(1 / 0.07)),
                                  jnp.ones(B, bool))
    np.testing.assert_allclose(float(loss), math.log(B), rtol=1e-5)
    # Non-matching pairs are neither anchors nor negatives.
    positive = jnp.asarray(np.arange(B) % 3 != 0)
    loss, _ = objectives.itc_loss(v, v, jnp.float32(0.0), positive)
    np.testing.assert_allclose(float(loss), math.log(int(positive.sum())),
                               rtol=1e-5)
    e = jnp.eye(B, dtype=jnp.float32)
    loss, acc = objectives.itc_loss(e, e, jnp.float32(math.log(100.0)), positive)
    assert float(loss) < 1e-6 and float(acc) == 1.0
