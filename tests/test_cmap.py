"""Tests for CMAP: anchor actions and swap feature filling (docs/design.md §2)."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_testutil import random_anchors, run_with_8_devices
from cmal_jax.model import cmap
from cmal_jax.model.cmap import KEEP, MASK, NONE, SWAP

B, T, R, K, D = 3, 12, 7, 4, 8


def reference_swap(text, regions, pos, end, region, action, mask_vector):
    """The docstring's semantics, one anchor at a time."""
    text, regions = np.asarray(text), np.asarray(regions)
    out_t, out_r = text.copy(), regions.copy()
    for b in range(text.shape[0]):
        for k in range(pos.shape[1]):
            p, e, o, a = pos[b, k], end[b, k], region[b, k], action[b, k]
            if a == SWAP:
                out_t[b, p] = regions[b, o]
                out_r[b, o] = text[b, p]
            elif a == MASK:
                out_t[b, p] = mask_vector
                out_r[b, o] = mask_vector
            if a in (SWAP, MASK):
                out_t[b, p + 1:e] = mask_vector
    return out_t, out_r


def random_case(seed, B=B, T=T, R=R, K=K, D=D):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(B, T, D)).astype(np.float32)
    regions = rng.normal(size=(B, R, D)).astype(np.float32)
    mask_vector = rng.normal(size=(D,)).astype(np.float32)
    pos, end, region, valid = (np.stack(x) for x in zip(
        *(random_anchors(rng, T, R, K, lo=0) for _ in range(B))))
    action = np.where(valid, rng.integers(0, 4, (B, K)), NONE).astype(np.int32)
    return text, regions, pos, end, region, action, mask_vector


def test_random_anchor_sets_are_valid():
    """The generator really gives distinct, non-overlapping spans and regions
    (otherwise the reference comparison below would prove less)."""
    rng = np.random.default_rng(0)
    seen_multi = 0
    for _ in range(200):
        pos, end, region, valid = random_anchors(rng, T, R, K, lo=0)
        spans = sorted(zip(pos[valid], end[valid]))
        for (p0, e0), (p1, _) in zip(spans, spans[1:]):
            assert e0 <= p1
        assert all(0 <= p < e <= T for p, e in spans)
        assert len(set(region[valid])) == valid.sum()
        seen_multi += any(e - p > 1 for p, e in spans)
    assert seen_multi > 50  # Multi-piece words occur often.


@pytest.mark.parametrize('seed', range(6))
def test_matches_python_loop_reference(seed):
    case = random_case(seed)
    want_t, want_r = reference_swap(*case)
    got_t, got_r = cmap.swap_anchor_features(*map(jnp.asarray, case))
    np.testing.assert_array_equal(np.asarray(got_t), want_t)
    np.testing.assert_array_equal(np.asarray(got_r), want_r)
    jit_t, jit_r = jax.jit(cmap.swap_anchor_features)(*case)
    np.testing.assert_array_equal(np.asarray(jit_t), want_t)
    np.testing.assert_array_equal(np.asarray(jit_r), want_r)


def test_reference_comparison_covers_every_action():
    actions = np.concatenate([random_case(s)[5].ravel() for s in range(6)])
    assert set(np.unique(actions)) == {NONE, SWAP, MASK, KEEP}


def test_swap_moves_exact_features_and_masks_other_pieces():
    text = np.arange(1 * 6 * 2, dtype=np.float32).reshape(1, 6, 2)
    regions = -np.arange(1, 1 + 3 * 2, dtype=np.float32).reshape(1, 3, 2)
    mv = np.array([100., 200.], np.float32)
    # Word at [1, 4) (three pieces) swaps with region 2; word at 4 is masked
    # with region 0; the third anchor is KEEP.
    pos, end = np.array([[1, 4, 5]]), np.array([[4, 5, 6]])
    region, action = np.array([[2, 0, 1]]), np.array([[SWAP, MASK, KEEP]])
    t, r = map(np.asarray, cmap.swap_anchor_features(
        text, regions, pos, end, region, action, mv))
    np.testing.assert_array_equal(t[0, 0], text[0, 0])
    np.testing.assert_array_equal(t[0, 1], regions[0, 2])
    np.testing.assert_array_equal(t[0, 2], mv)
    np.testing.assert_array_equal(t[0, 3], mv)
    np.testing.assert_array_equal(t[0, 4], mv)
    np.testing.assert_array_equal(t[0, 5], text[0, 5])
    np.testing.assert_array_equal(r[0, 2], text[0, 1])
    np.testing.assert_array_equal(r[0, 0], mv)
    np.testing.assert_array_equal(r[0, 1], regions[0, 1])


@pytest.mark.parametrize('fill', [NONE, KEEP])
def test_none_and_keep_change_nothing(fill):
    rng = np.random.default_rng(1)
    text, regions, *_, mv = random_case(1)
    # Arbitrary (even overlapping or padded-zero) indices: NONE/KEEP are no-ops.
    pos = rng.integers(0, T, (B, K)).astype(np.int32)
    end = np.minimum(pos + rng.integers(0, 4, (B, K)), T).astype(np.int32)
    region = rng.integers(0, R, (B, K)).astype(np.int32)
    action = np.full((B, K), fill, np.int32)
    for args in ((pos, end, region), (0 * pos, 0 * end, 0 * region)):
        t, r = jax.jit(cmap.swap_anchor_features)(
            text, regions, *args, action, mv)
        assert np.asarray(t).tobytes() == text.tobytes()
        assert np.asarray(r).tobytes() == regions.tobytes()


def test_gradients_flow_through_swapped_features():
    rng = np.random.default_rng(2)
    text = rng.normal(size=(2, 6, 3)).astype(np.float32)
    regions = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mv = rng.normal(size=(3,)).astype(np.float32)
    w1 = rng.normal(size=text.shape).astype(np.float32)
    w2 = rng.normal(size=regions.shape).astype(np.float32)
    # Example 0: word [1, 3) SWAP region 2, word 4 MASK region 0, word 5 KEEP
    # region 1. Example 1: word [2, 5) SWAP region 3, a padded NONE anchor.
    pos = np.array([[1, 4, 5], [2, 0, 0]], np.int32)
    end = np.array([[3, 5, 6], [5, 0, 0]], np.int32)
    region = np.array([[2, 0, 1], [3, 0, 0]], np.int32)
    action = np.array([[SWAP, MASK, KEEP], [SWAP, NONE, NONE]], np.int32)

    def f(text, regions, mv):
        t, r = cmap.swap_anchor_features(text, regions, pos, end, region,
                                           action, mv)
        return jnp.sum(t * w1) + jnp.sum(r * w2)

    g_t, g_r, g_mv = map(np.asarray, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(
        text, regions, mv))
    # The swapped word went to region slot o: its gradient is w2 there, and
    # the swapped region's gradient is w1 at the word slot it moved to.
    np.testing.assert_array_equal(g_t[0, 1], w2[0, 2])
    np.testing.assert_array_equal(g_r[0, 2], w1[0, 1])
    np.testing.assert_array_equal(g_t[1, 2], w2[1, 3])
    np.testing.assert_array_equal(g_r[1, 3], w1[1, 2])
    assert np.all(g_t[0, 1] != 0) and np.all(g_r[0, 2] != 0)
    # Full expected gradient: untouched slots pass w through, overwritten
    # slots (other pieces, masked anchors) get none.
    want_t, want_r = w1.copy(), w2.copy()
    want_t[0, 1], want_r[0, 2] = w2[0, 2], w1[0, 1]
    want_t[1, 2], want_r[1, 3] = w2[1, 3], w1[1, 2]
    want_t[0, 2] = 0  # Other piece of the swapped word.
    want_t[1, 3:5] = 0
    want_t[0, 4], want_r[0, 0] = 0, 0  # MASK anchor.
    np.testing.assert_allclose(g_t, want_t, rtol=0, atol=0)
    np.testing.assert_allclose(g_r, want_r, rtol=0, atol=0)
    want_mv = w1[0, 2] + w1[1, 3] + w1[1, 4] + w1[0, 4] + w2[0, 0]
    np.testing.assert_allclose(g_mv, want_mv, rtol=1e-6, atol=1e-6)


def test_sample_anchor_actions_statistics():
    N = 100_000
    rng = np.random.default_rng(3)
    valid = rng.random((N, 4)) < 0.7
    actions = np.asarray(cmap.sample_anchor_actions(
        jax.random.key(0), jnp.asarray(valid), select_prob=0.5, swap_prob=0.8,
        mask_prob=0.1))
    assert actions.shape == valid.shape and actions.dtype == np.int32
    assert set(np.unique(actions)) <= {NONE, SWAP, MASK, KEEP}
    assert np.all(actions[~valid] == NONE)

    def close(count, n, p):
        std = np.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 5 * std, (count, n, p)

    n_valid = valid.sum()
    selected = actions[valid] != NONE
    close(selected.sum(), n_valid, 0.5)
    n_sel = selected.sum()
    close((actions == SWAP).sum(), n_sel, 0.8)
    close((actions == MASK).sum(), n_sel, 0.1)
    close((actions == KEEP).sum(), n_sel, 0.1)
    # Another key gives another draw; the same key the same one.
    again = cmap.sample_anchor_actions(
        jax.random.key(0), jnp.asarray(valid), select_prob=0.5, swap_prob=0.8,
        mask_prob=0.1)
    other = cmap.sample_anchor_actions(
        jax.random.key(1), jnp.asarray(valid), select_prob=0.5, swap_prob=0.8,
        mask_prob=0.1)
    np.testing.assert_array_equal(np.asarray(again), actions)
    assert np.mean(np.asarray(other) != actions) > 0.3


def test_sample_anchor_actions_extremes():
    valid = jnp.asarray(np.random.default_rng(4).random((64, 6)) < 0.5)
    kw = dict(swap_prob=0.8, mask_prob=0.1)
    none = cmap.sample_anchor_actions(jax.random.key(0), valid,
                                        select_prob=0.0, **kw)
    assert np.all(np.asarray(none) == NONE)
    every = np.asarray(cmap.sample_anchor_actions(
        jax.random.key(0), valid, select_prob=1.0, swap_prob=1.0,
        mask_prob=0.0))
    np.testing.assert_array_equal(every, np.where(valid, SWAP, NONE))
    np.testing.assert_array_equal(np.asarray(cmap.all_swapped(valid)),
                                  np.where(valid, SWAP, NONE))


def test_jit_has_no_host_callbacks_and_no_batch_loop():
    def lower(b):
        args = [jax.ShapeDtypeStruct(s, d) for s, d in (
            ((b, T, D), jnp.float32), ((b, R, D), jnp.float32),
            ((b, K), jnp.int32), ((b, K), jnp.int32), ((b, K), jnp.int32),
            ((b, K), jnp.int32), ((D,), jnp.float32))]
        hlo = jax.jit(cmap.swap_anchor_features).lower(*args).as_text()
        jaxpr = jax.make_jaxpr(cmap.swap_anchor_features)(*args)
        return hlo, jaxpr

    hlo2, jaxpr2 = lower(2)
    hlo16, jaxpr16 = lower(16)
    for hlo in (hlo2, hlo16):
        assert 'stablehlo.scatter' in hlo  # Really lowered the op we think.
        lowered = hlo.lower()
        assert 'callback' not in lowered
        assert 'host' not in lowered
        assert 'stablehlo.while' not in lowered
        assert 'custom_call' not in lowered
    assert len(jaxpr2.eqns) == len(jaxpr16.eqns)
    assert len(hlo2.splitlines()) == len(hlo16.splitlines())


_SHARDED_SCRIPT = textwrap.dedent('''
    import os, sys
    import numpy as np
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cmal_jax import sharding
    from cmal_jax.model import cmap
    assert jax.device_count() == 8, jax.devices()
    d = sys.argv[1]
    args = [np.load(os.path.join(d, f'in{i}.npy')) for i in range(7)]
    mesh = sharding.make_mesh((8, 1, 1))
    batch = NamedSharding(mesh, P(('data', 'fsdp')))
    placed = [jax.device_put(a, batch) for a in args[:6]] + [
        jax.device_put(args[6], NamedSharding(mesh, P()))]
    with jax.set_mesh(mesh):
        t, r = jax.jit(cmap.swap_anchor_features)(*placed)
    assert len(t.sharding.device_set) == 8, t.sharding
    assert t.addressable_shards[0].data.shape[0] == args[0].shape[0] // 8
    np.save(os.path.join(d, 'text.npy'), np.asarray(t))
    np.save(os.path.join(d, 'regions.npy'), np.asarray(r))
''')


def test_same_result_with_batch_sharded_over_8_devices(tmp_path):
    case = random_case(7, B=16)
    for i, a in enumerate(case):
        np.save(tmp_path / f'in{i}.npy', a)
    want_t, want_r = map(np.asarray, jax.jit(cmap.swap_anchor_features)(*case))
    ref_t, ref_r = reference_swap(*case)
    np.testing.assert_array_equal(want_t, ref_t)
    run_with_8_devices(_SHARDED_SCRIPT, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / 'text.npy'), want_t)
    np.testing.assert_array_equal(np.load(tmp_path / 'regions.npy'), want_r)
    np.testing.assert_array_equal(np.load(tmp_path / 'regions.npy'), ref_r)
