"""Two train steps on 1 device and on 8 fake CPU devices under the dp,
fsdp and fsdp_tp sharding presets (docs/design.md §5; dp_tp's rules are
checked in test_scale.py), and the per-device memory the compiled step
reports for each.

Runs in one subprocess (XLA_FLAGS must be set before JAX starts, and the
parent pytest process has usually started JAX already): the 1-device reference
on a (1, 1, 1) mesh over jax.devices()[:1], then each 8-device mesh. The
model is cmal_testutil.shrink's (one unified layer, no text or vision
layers): the same code paths and sharding rules, less to compile five times.
"""

import json
import textwrap

import numpy as np
import pytest

from cmal_testutil import random_batch, run_with_8_devices

B = 16
# (preset, mesh shape) on 8 devices; fsdp_tp on all three axes at once
# (dp_tp's rules are fsdp_tp's on the data and tensor axes: its sharding
# is checked in test_scale.py, without a compile here).
MESHES = (('dp', (8, 1, 1)), ('fsdp', (1, 8, 1)), ('fsdp_tp', (2, 2, 2)))

_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import flax.linen as nn
    import jax
    import numpy as np
    from cmal_jax import objectives, pretraining, sharding, train_step
    from cmal_jax.data import pipeline
    from cmal_jax.model.cmal import CMAL, ModelConfig
    from configs.pretrain import get_config
    from cmal_testutil import shrink

    assert jax.device_count() == 8, jax.devices()
    d = sys.argv[1]
    meshes = json.loads(sys.argv[2])
    loaded = np.load(os.path.join(d, 'batch.npz'))
    host_batch = {'stats': {}}
    for k in loaded.files:  # Nested 'stats/<name>' keys back into a dict.
        group, _, name = k.rpartition('/')
        (host_batch[group] if group else host_batch)[name] = loaded[k]
    specials = objectives.SpecialTokens(0, 101, 102, 103, 30522)

    def leaf(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    def run(preset, shape, devices):
        config = shrink(get_config('tiny'))
        config.batch_size = len(host_batch['input_ids'])
        config.sharding = preset
        config.mesh.shape = tuple(shape)
        mesh = sharding.mesh_from_config(config, devices=devices)
        rules = sharding.rules(config)
        model = CMAL(ModelConfig.from_config(config.model, num_tags=10))
        init_inputs, loss_fn = pretraining.pretrain_objectives(model, config,
                                                              specials)
        tx, schedule = train_step.make_optimizer(config)
        state, state_shardings = train_step.create_train_state(
      model, init_inputs, pipeline.STAT_KEYS, tx, config, mesh, rules)
        params0 = jax.device_get(state.params)
        q = leaf(state.params, ('unified', 'layer_0', 'attention',
                                'query_kernel'))
        mlp = leaf(state.params, ('unified', 'layer_0', 'intermediate',
                                  'kernel'))
        info = dict(
            query_spec=list(q.sharding.spec),
            query_shard=list(q.addressable_shards[0].data.shape),
            query_shape=list(q.shape),
            mlp_spec=list(mlp.sharding.spec),
            mlp_shard=list(mlp.addressable_shards[0].data.shape),
            mlp_shape=list(mlp.shape),
            devices=len(q.sharding.device_set))
        batch = sharding.global_batch(host_batch, mesh)
        info['batch_shard'] = list(
            batch['region_feats'].addressable_shards[0].data.shape)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step_fn = train_step.jit_train_step(loss_fn, config, schedule,
                                           state_shardings, mesh).lower(
                                               state, batch).compile()
        memory = step_fn.memory_analysis()
        info['argument_bytes'] = memory.argument_size_in_bytes
        info['state_bytes'] = sum(
            x.addressable_shards[0].data.nbytes
            for x in jax.tree.leaves(state))
        metrics = []
        for _ in range(2):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                state, m = step_fn(state, batch)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        info['metrics'] = metrics
        info['step'] = int(state.step)
        params1 = jax.device_get(state.params)
        return info, params0, params1

    results = {}
    ref_info, ref_p0, ref_p1 = run('dp', (1, 1, 1), jax.devices()[:1])
    results['ref'] = ref_info
    for preset, shape in meshes:
        info, p0, p1 = run(preset, shape, jax.devices())
        # Initial parameters: bit for bit (threefry is partitionable).
        info['init_max_diff'] = max(
            float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(ref_p0), jax.tree.leaves(p0)))
        info['step_max_diff'] = max(
            float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(ref_p1), jax.tree.leaves(p1)))
        results[preset] = info
    with open(os.path.join(d, 'results.json'), 'w') as f:
        json.dump(results, f)
''')


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    from configs.pretrain import get_config
    c = get_config('tiny')
    batch = random_batch(0, B, c.data.max_text_len, c.data.max_regions,
                         c.data.max_anchors, c.model.region_feat_dim)
    d = tmp_path_factory.mktemp('sharding')
    stats = batch.pop('stats')
    np.savez(d / 'batch.npz', **batch,
             **{f'stats/{k}': v for k, v in stats.items()})
    run_with_8_devices(_SCRIPT, d, json.dumps(MESHES))
    with open(d / 'results.json') as f:
        return json.load(f)


def test_reference_runs_on_one_device(results):
    ref = results['ref']
    assert ref['devices'] == 1 and ref['step'] == 2
    m = ref['metrics'][0]
    assert np.isfinite(m['loss']) and m['loss'] > 0
    # The step really trains every objective of the CMAL recipe.
    for k in ('loss_amc_pair', 'loss_amc_label', 'loss_mlm', 'loss_itm'):
        assert m[k] > 0, k
    assert m['amc_anchors'] > 0
    np.testing.assert_allclose(
        m['loss'], m['loss_amc_pair'] + m['loss_amc_label'] + m['loss_mlm']
        + m['loss_itm'], rtol=1e-6)


@pytest.mark.parametrize('preset', [p for p, _ in MESHES])
def test_same_loss_and_metrics_on_8_devices(results, preset):
    ref, got = results['ref'], results[preset]
    assert got['devices'] == 8 and got['step'] == 2
    assert got['init_max_diff'] == 0.0  # Same initial parameters.
    for step in range(2):
        want, have = ref['metrics'][step], got['metrics'][step]
        assert set(want) == set(have)
        np.testing.assert_allclose(have['loss'], want['loss'], rtol=1e-5)
        for k in want:
            np.testing.assert_allclose(have[k], want[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f'{k} at step {step}')
    # Parameters after two AdamW steps agree to float noise (lr <= 1e-4).
    assert got['step_max_diff'] < 1e-5


def test_parameters_sharded_as_the_presets_say(results):
    D, H = 64, 2
    dp = results['dp']  # Replicated: every device holds everything.
    assert dp['query_shard'] == dp['query_shape'] == [D, H, D // H]
    assert dp['mlp_shard'] == dp['mlp_shape'] == [D, 4 * D]
    assert dp['batch_shard'][0] == B // 8
    f = results['fsdp']  # The model width split over fsdp=8.
    assert f['query_spec'][0] == 'fsdp' and f['mlp_spec'][0] == 'fsdp'
    assert f['query_shard'] == [D // 8, H, D // H]
    assert f['mlp_shard'] == [D // 8, 4 * D]
    assert f['batch_shard'][0] == B // 8  # The batch over data x fsdp.
    ft = results['fsdp_tp']  # Both: width over fsdp=2, heads over tensor=2.
    assert ft['query_spec'][:2] == ['fsdp', 'tensor']
    assert ft['query_shard'] == [D // 2, H // 2, D // H]
    assert ft['mlp_shard'] == [D // 2, 4 * D // 2]
    assert ft['batch_shard'][0] == B // 4
    ref = results['ref']
    assert ref['query_shard'] == ref['query_shape']


def test_fsdp_lowers_the_per_device_state_memory(results):
    """Parameters + optimizer state per device, from the arrays and from
    the compiled step's memory analysis (its arguments: state + batch)."""
    dp, fsdp = results['dp'], results['fsdp']
    # Nearly all of the state is sharded along the width: under 1/4 of dp's
    # (not 1/8: biases of width != D, scalars and the step stay whole).
    assert fsdp['state_bytes'] < dp['state_bytes'] / 4
    assert fsdp['argument_bytes'] < dp['argument_bytes'] / 4
    assert dp['state_bytes'] == results['ref']['state_bytes']
    print(f"per-device state: dp {dp['state_bytes']} B, fsdp "
          f"{fsdp['state_bytes']} B; compiled arguments: dp "
          f"{dp['argument_bytes']} B, fsdp {fsdp['argument_bytes']} B")
