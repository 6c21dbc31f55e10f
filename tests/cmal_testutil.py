"""Helpers shared by the tests: random but realistic host batches and anchor
sets (pure numpy), small record files of our own, bitwise tree comparison,
and running a script in a subprocess with 8 fake CPU devices.
"""

import base64
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np

import orbax.checkpoint as ocp

from cmal_jax import checkpoint
from cmal_jax.data import pipeline, records
from cmal_jax.world import scenes

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522
# The losses the default (CMAL) recipe logs.
CMAL_LOSSES = ('loss_amc_pair', 'loss_amc_label', 'loss_mlm', 'loss_itm')
F = 64  # The tiny config's region_feat_dim.
WORLD_PARAMS = scenes.WorldParams(feature_dim=F)


def good_pair(i, split='pretrain'):
    """Synthetic-world pair i (tiny feature width), a valid record dict."""
    return scenes.make_pair(0, split, i, WORLD_PARAMS)


def write_dataset(directory, pairs, split='pretrain'):
    """Our own records (dicts or raw bytes) + meta.json of the scenes."""
    path = records.split_path(str(directory), split)
    records.write_records(path, pairs)
    records.write_meta(str(directory), {
        'tags': list(scenes.WORLD_TAGS), 'synonyms': dict(scenes.WORLD_SYNONYMS),
        'feature_dim': F, 'splits': {split: len(pairs)}})
    return path


# Bottom-up-attention TSVs, written the way its generate_tsv.py writes them
# (csv, tab-separated, each array base64 of its `.tobytes()`), independently
# of the converter's own code.
TSV_IMAGE_SIZE = (640, 480)  # tsv_row's default image (width, height).


def b64(array) -> str:
    return base64.b64encode(np.asarray(array).tobytes()).decode('ascii')


def tsv_row(image_id, boxes, feats, objects=None, conf=None, attrs=True,
            attrs_conf=False, width=TSV_IMAGE_SIZE[0],
            height=TSV_IMAGE_SIZE[1], ids_dtype=np.int64):
    """The columns of one TSV line, as generate_tsv.py writes them."""
    boxes = np.asarray(boxes, np.float32)
    row = [str(image_id), str(width), str(height), str(len(boxes)),
           b64(boxes), b64(feats)]
    if objects is not None:
        row += [b64(np.asarray(objects, ids_dtype)),
                b64(np.asarray(conf, np.float32))]
        if attrs:
            row.append(b64(np.zeros(len(boxes), ids_dtype)))
        if attrs_conf:
            row.append(b64(np.zeros(len(boxes), np.float32)))
    return row


def write_tsv(path, rows):
    """Writes TSV rows (tsv_row) to path; returns it as a str."""
    with open(path, 'w', newline='') as f:
        csv.writer(f, delimiter='\t').writerows(rows)
    return str(path)


def break_region_record(directory, image_id):
    """NaN in one image's region features, in a task folder's region store
    (written raw: write_region_store refuses it; same order, so the index
    still holds)."""
    from cmal_jax.data import region_store
    path = region_store.store_path(str(directory))
    source = records.open_source(path)
    raws = [source[i] for i in range(len(source))]
    with open(region_store.index_path(path)) as f:
        i = json.load(f)[image_id]
    record = records.decode_record(raws[i])
    feats = np.array(record['region_feats'])
    feats[0, 0] = np.nan
    raws[i] = records.encode_record(dict(record, region_feats=feats))
    records.write_records(path, raws)


def tiny_with_data(**data):
    """The tiny pretrain config with the given config.data fields."""
    from configs import pretrain
    c = pretrain.get_config('tiny')
    for k, v in data.items():
        c.data[k] = v
    return c


def read_all(config, directory, batch_size):
    """Every batch of one in-order pass over directory's pretrain split
    (ITM negatives drawn within each whole batch)."""
    config = config.copy_and_resolve_references()
    config.data.itm_group = batch_size
    ds, _, _ = pipeline.make_dataset(config, str(directory), 'pretrain',
                                     batch_size=batch_size, train=False,
                                     seed=0)
    return list(ds)


def assert_trees_equal(a, b, min_leaves=1):
    """Same structure and bitwise-equal leaves."""
    import jax
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert len(flat_a) >= min_leaves, len(flat_a)
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


def random_anchors(rng, T, R, K, lo=1, hi=None, max_pieces=3, n=None):
    """One example's valid anchors, as the anchor detector guarantees them.

    Distinct word positions with non-overlapping [pos, end) spans inside
    [lo, hi), distinct regions in [0, R). Returns pos, end, region [K] int32
    and valid [K] bool; invalid slots are zeros, like the pipeline's padding.
    """
    hi = T if hi is None else hi
    pos = np.zeros(K, np.int32)
    end = np.zeros(K, np.int32)
    region = np.zeros(K, np.int32)
    valid = np.zeros(K, bool)
    n = rng.integers(0, min(K, R) + 1) if n is None else n
    regions = rng.permutation(R)
    cursor, k = lo, 0
    for _ in range(n):
        length = int(rng.integers(1, max_pieces + 1))
        start = cursor + int(rng.integers(0, 3))
        if start + length > hi:
            break
        pos[k], end[k], region[k], valid[k] = start, start + length, regions[k], True
        cursor = start + length
        k += 1
    # Anchor slots are not sorted by text position in general.
    order = rng.permutation(K)
    return pos[order], end[order], region[order], valid[order]


def random_batch(seed, B, T, R, K, F, num_tags=10, neg_prob=0.5):
    """A pipeline-like batch (see cmal_jax.data.pipeline.encode_pair)."""
    rng = np.random.default_rng(seed)
    b = dict(
        input_ids=np.zeros((B, T), np.int32), text_mask=np.zeros((B, T), np.int32),
        region_feats=np.zeros((B, R, F), np.float32),
        region_boxes=np.zeros((B, R, 4), np.float32),
        region_tags=np.full((B, R), -1, np.int32),
        region_mask=np.zeros((B, R), np.int32),
        anchor_text_pos=np.zeros((B, K), np.int32),
        anchor_text_end=np.zeros((B, K), np.int32),
        anchor_region=np.zeros((B, K), np.int32),
        anchor_valid=np.zeros((B, K), bool),
        itm_label=(rng.random(B) >= neg_prob).astype(np.int32))
    for i in range(B):
        L = int(rng.integers(6, T + 1))  # [CLS] ... [SEP], then padding.
        b['input_ids'][i, 0] = CLS
        b['input_ids'][i, 1:L - 1] = rng.integers(1000, VOCAB, L - 2)
        b['input_ids'][i, L - 1] = SEP
        b['text_mask'][i, :L] = 1
        n = int(rng.integers(1, R + 1))
        b['region_feats'][i, :n] = rng.normal(size=(n, F))
        xy = rng.uniform(0, 0.6, (n, 2))
        wh = rng.uniform(0.05, 0.4, (n, 2))
        b['region_boxes'][i, :n] = np.concatenate([xy, xy + wh], 1)
        b['region_tags'][i, :n] = rng.integers(-1, num_tags, n)
        b['region_mask'][i, :n] = 1
        pos, end, region, valid = random_anchors(rng, L - 1, n, K, lo=1)
        b['anchor_text_pos'][i] = pos
        b['anchor_text_end'][i] = end
        b['anchor_region'][i] = region
        b['anchor_valid'][i] = valid
        # Anchor regions carry a tag (that is how they were matched).
        tagged = region[valid]
        b['region_tags'][i, tagged] = rng.integers(0, num_tags, len(tagged))
    b['stats'] = {k: np.zeros(B, np.int32) for k in pipeline.STAT_KEYS}
    b['stats'].update(examples=np.ones(B, np.int32),
                      itm_negatives=1 - b['itm_label'])
    return b


def xla_flags_with_devices(n):
    """The suite's XLA_FLAGS (conftest.py) plus n fake CPU devices, for a
    subprocess."""
    return ' '.join([os.environ.get('XLA_FLAGS', ''),
                     f'--xla_force_host_platform_device_count={n}']).strip()


def run_with_8_devices(script, *argv, timeout=600):
    """Runs `python -c script argv...` with 8 fake CPU devices.

    XLA_FLAGS must be set before JAX initialises, hence a fresh process
    (which keeps the suite's flags, conftest.py).
    """
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(8),
               JAX_PLATFORMS='cpu')
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env['PYTHONPATH'] = os.pathsep.join([root, here, env.get('PYTHONPATH', '')])
    proc = subprocess.run([sys.executable, '-c', script, *map(str, argv)],
                          env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ------------------------------------------------- short end-to-end runs

def read_jsonl(workdir, name='metrics.jsonl'):
    """A run's JSON-lines file (metrics.jsonl), one dict per line."""
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(line) for line in f]


def read_json(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def train_lines(lines):
    """metrics.jsonl's per-interval training lines (not the final eval/*
    line)."""
    return [m for m in lines if 'loss' in m]


def fast_step(config, level=1):
    """Compiles the run's train step at XLA's CPU optimisation `level`, over
    the suite's level 0 (conftest.py), and with XLA's fusion emitters, which
    compile a train step faster than the loop emitters above level 0
    (docs/results/speed/suite_xla_emitters.md). Level 1 for runs of 10 to
    ~100 steps, 3 (XLA's default) for longer ones: their time is in the
    steps, not the compile (docs/design.md, the test habits, has the trade
    measured). Runs that share a compiled step through the session's cache
    must all set the same level (the options are part of the program's
    key)."""
    config.compiler_options.update(
        xla_backend_optimization_level=level,
        xla_llvm_disable_expensive_passes=level < 3,
        xla_cpu_use_fusion_emitters=True)
    return config


SHARED_STEPS = 30  # total_steps of the suite's shared tiny runs.


def shared_tiny(world_dir, **overrides):
    """configs/pretrain.py:tiny on world_dir as the suite's shared runs
    make it: SHARED_STEPS total steps (the lr schedule bakes total_steps
    into the train step), fast_step and 8 retrieval images. Runs made from
    it, whatever their stop_at_step, logging or checkpointing (`overrides`:
    top-level config fields), share one compiled train step through the
    session's XLA cache (conftest.compilation_cache)."""
    from configs import pretrain
    c = fast_step(pretrain.get_config('tiny'))
    c.data.dir = world_dir
    c.total_steps = SHARED_STEPS
    c.eval.retrieval_images = 8
    for k, v in overrides.items():
        c[k] = v
    return c


def shrink(config):
    """The tiny model without text and vision layers and with one unified
    layer: the same code paths, a third less to compile."""
    config.model.text_layers = config.model.vision_layers = 0
    config.model.unified_layers = 1
    return config


def finetune_tiny(task, recipe, init_from):
    """configs/finetune.py:TASK,tiny,RECIPE shrunk as pre-training was: 4
    steps on a 32/16/16 world, evaluated at the end only."""
    from configs import finetune
    c = shrink(finetune.get_config(f'{task},tiny,{recipe}'))
    c.init_from = init_from
    c.total_steps, c.log_every, c.checkpoint_every = 4, 2, 4
    c.eval.every_steps = 0
    c.world.num_train, c.world.num_eval, c.world.num_test = 32, 16, 16
    return c


def saved_state(workdir, step):
    """The train state a run saved at `step`, as nested dicts of host
    arrays (read without a config)."""
    manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                    item_names=checkpoint.ITEMS)
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))['state']
    finally:
        manager.close()


def leaf_types(tree):
    """[(key path, abstract type)] of a pytree's leaves: equal for two
    states that a jitted step takes without compiling again."""
    return [(jax.tree_util.keystr(p), jax.typeof(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]
