"""Random but realistic host batches and anchor sets for the model tests.

Shared by test_prompt.py, test_objectives.py and test_sharding.py. Pure numpy,
so it can be imported before JAX is configured.
"""

import numpy as np

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522


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
    return b
