"""Property-based tests (hypothesis) of the host-side map step: anchor
detection, encode_pair and BatchEncoder on random unicode, empty and huge
captions, random tags (including unknown ones) and region counts from 0 to
more than max_regions. Whatever the input: no crash, static shapes and
dtypes, anchors inside the real text and the real regions, each word and
region used at most once, at most K anchors."""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from cmal_jax.data import anchors, pipeline, records
from cmal_jax.world import scenes
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer
from configs import pretrain

CONFIG = pretrain.get_config('tiny')
SHAPES = Shapes.from_config(CONFIG)
T, R, K, F = (SHAPES.max_text_len, SHAPES.max_regions, SHAPES.max_anchors,
              SHAPES.feature_dim)
VOCAB = anchors.TagVocab(scenes.WORLD_TAGS, scenes.WORLD_SYNONYMS)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Words that name a tag (synonyms, plurals, other cases, the two-word tag),
# words that nearly do, and unicode the tokenizer and the word splitter
# treat differently (dropped, [UNK], split per character, lower() growing).
_TAG_WORDS = sorted(
    set(scenes.WORLD_SYNONYMS)
    | {scenes.plural(w) for w in scenes.WORLD_SYNONYMS}
    | {w.upper() for w in scenes.WORLD_SYNONYMS} | {'Half Circles', 'half'})
_ODD_WORDS = ['a', 'the', 'red', 'of', 'circ', 'circless', 'boxs', 'İ', 'İİ',
              '日本', '©', '🔴', 'ｃｉｒｃｌｅ', 'círcle', 'circle\u0301',
              'a\u200bcircle', 'circle©square', '\x00', '\t\n', '—', "'s",
              'ﬁ', 'ß', 'ǅ', '_', 'circle_box', '3circles', '...']
WORDS = st.sampled_from(_TAG_WORDS) | st.sampled_from(_ODD_WORDS)
SEPARATORS = st.sampled_from([' ', '  ', ', ', '-', '', '\n', '.', ' \u200b'])


@st.composite
def phrases(draw, max_words=40):
  words = draw(st.lists(st.one_of(WORDS, st.text(max_size=4)),
                        max_size=max_words))
  out = ''
  for w in words:
    out += draw(SEPARATORS) + w
  return out


# Huge captions (thousands of characters) by repetition: hypothesis would
# reject drawing that many characters one by one.
HUGE = st.tuples(phrases(max_words=12), st.integers(100, 400)).map(
    lambda t: (t[0] + ' ') * t[1])
CAPTIONS = st.one_of(st.just(''), st.text(max_size=300), phrases(), HUGE)


@pytest.fixture(scope='module', autouse=True)
def _warm_tokenizer():
  load_tokenizer(None)


def named_tags(caption, vocab):
  """Tag ids the caption's words name (the first 200 words)."""
  words = [w for w, _, _ in anchors.split_words(caption)][:200]
  return sorted({vocab.match(words, i)[0] for i in range(len(words))} - {-1})


def regions(draw, vocab, caption='', max_n=R + 6):
  """N regions: tag ids in [-1, num_tags), often one the caption names (so
  that anchors are found), confidences with ties, features whose column 0
  is the region index (to see which regions were kept)."""
  n = draw(st.integers(0, max_n))
  tags = st.integers(-1, vocab.num_tags - 1)
  named = named_tags(caption, vocab)
  if named:
    tags = tags | st.sampled_from(named) | st.sampled_from(named)
  tag_ids = np.asarray(draw(st.lists(tags, min_size=n, max_size=n)),
                       np.int32)
  conf = np.asarray(draw(st.lists(
      st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]) | st.floats(0, 1),
      min_size=n, max_size=n)), np.float32)
  feats = np.zeros((n, F), np.float32)
  feats[:, 0] = np.arange(n)
  xy = np.linspace(0, 0.5, 2 * n, dtype=np.float32).reshape(n, 2)
  boxes = np.concatenate([xy, xy + 0.25], 1).astype(np.float32)
  return tag_ids, conf, feats, boxes


def check_anchors(pos, end, region, valid, L, n, region_tags):
  """The invariants every anchor set obeys, for one example.

  L: real text length ([CLS] pieces [SEP]); n: real regions.
  """
  assert valid.dtype == bool and valid.shape == (K,)
  for a in (pos, end, region):
    assert a.dtype == np.int32 and a.shape == (K,)
  v = valid
  assert v.sum() <= K
  assert not v[np.argmax(~v):].any() or v.all()  # Valid slots come first.
  assert np.all(1 <= pos[v]) and np.all(pos[v] < L - 1)
  assert np.all(end[v] > pos[v]) and np.all(end[v] <= L - 1)
  assert np.all((0 <= region[v]) & (region[v] < n))
  assert len(set(region[v].tolist())) == v.sum()  # Each region once.
  covered = [p for s, e in zip(pos[v], end[v]) for p in range(s, e)]
  assert len(covered) == len(set(covered))  # Each word (token) once.
  assert np.all(region_tags[region[v]] >= 0)  # Anchored regions are tagged.
  assert not pos[~v].any() and not end[~v].any() and not region[~v].any()


# ---------------------------------------------------------- detect_anchors

@st.composite
def vocabs(draw):
  """The world's vocabulary, or one with random extra tags and synonyms
  (unicode, multi-word, punctuation only)."""
  if draw(st.booleans()):
    return VOCAB
  extra = draw(st.lists(st.text(min_size=1, max_size=12) | WORDS,
                        max_size=6, unique=True))
  tags = list(scenes.WORLD_TAGS) + [t for t in extra
                                   if t not in scenes.WORLD_TAGS]
  synonyms = dict(scenes.WORLD_SYNONYMS)
  for phrase in draw(st.lists(st.text(max_size=10) | WORDS, max_size=6)):
    synonyms[phrase] = draw(st.sampled_from(tags))
  return anchors.TagVocab(tuple(tags), synonyms)


@SETTINGS
@given(caption=CAPTIONS, vocab=vocabs(), data=st.data(),
       max_len=st.sampled_from([3, 8, T, 64]), no_conf=st.booleans())
def test_detect_anchors_properties(caption, vocab, data, max_len, no_conf):
  tok = load_tokenizer(None)
  tag_ids, conf, _, _ = regions(data.draw, vocab, caption)
  n = len(tag_ids)
  enc = tok.encode(caption, max_len)
  L = len(enc.ids)
  found = anchors.detect_anchors(caption, enc.offsets, tag_ids,
                                 None if no_conf else conf, vocab, K)
  check_anchors(found.text_pos, found.text_end, found.region, found.valid, L,
                n, tag_ids)
  v = found.valid
  assert len(found.words) == v.sum() and found.num_truncated >= 0
  event(f'anchors: {min(v.sum(), 2)}{"+" if v.sum() >= 2 else ""}')
  event(f'anchors lost to truncation: {found.num_truncated > 0}')
  # Each anchor's word names its region's tag, and took the most
  # confident region of that tag still free (ties: lowest index).
  conf_or_none = np.zeros(n) if no_conf else conf.astype(np.float64)
  used = set()
  for word, r in zip(found.words, found.region[v]):
    names = [w for w, _, _ in anchors.split_words(word)]
    t, m = vocab.match(names, 0)
    assert (t, m) == (tag_ids[r], len(names)), (word, names)
    free = [i for i in range(n) if tag_ids[i] == t and i not in used]
    best = min(free, key=lambda i: (-conf_or_none[i], i))
    assert r == best
    used.add(int(r))


# ------------------------------------------------------------- encode_pair

def make_image(tag_ids, conf, feats, boxes):
  return dict(caption='', image_id='x', region_feats=feats,
              region_boxes=boxes, region_conf=conf, region_tag_ids=tag_ids)


ARRAY_SPECS = {
    'input_ids': ((T,), np.int32), 'text_mask': ((T,), np.int32),
    'region_feats': ((R, F), np.float32), 'region_boxes': ((R, 4), np.float32),
    'region_tags': ((R,), np.int32), 'region_mask': ((R,), np.int32),
    'anchor_text_pos': ((K,), np.int32), 'anchor_text_end': ((K,), np.int32),
    'anchor_region': ((K,), np.int32), 'anchor_valid': ((K,), np.bool_),
}


def check_example(arrays, stats, caption, image, tok):
  assert set(arrays) == set(ARRAY_SPECS)
  for k, (shape, dtype) in ARRAY_SPECS.items():
    assert arrays[k].shape == shape and arrays[k].dtype == dtype, k
  mask = arrays['text_mask']
  L = int(mask.sum())
  assert 2 <= L <= T and mask[:L].all()  # A prefix of ones.
  ids = arrays['input_ids']
  assert ids[0] == tok.cls_id and ids[L - 1] == tok.sep_id
  assert not ids[L:].any()
  full = tok.encode(caption, 10**6)
  assert stats['captions_truncated'] == int(len(full.ids) > T)
  # Regions: the R most confident (ties: lowest index), in stored order.
  N = len(image['region_conf'])
  n = int(arrays['region_mask'].sum())
  assert n == min(N, R) and arrays['region_mask'][:n].all()
  order = sorted(range(N), key=lambda i: (-image['region_conf'][i], i))
  np.testing.assert_array_equal(arrays['region_feats'][:n, 0],
                                sorted(order[:R]))
  assert not arrays['region_feats'][n:].any()
  assert (arrays['region_tags'][n:] == -1).all()
  assert stats['regions_truncated'] == int(N > R)
  assert stats['anchors_truncated'] >= 0
  check_anchors(arrays['anchor_text_pos'], arrays['anchor_text_end'],
                arrays['anchor_region'], arrays['anchor_valid'], L, n,
                arrays['region_tags'])


@SETTINGS
@given(caption=CAPTIONS, data=st.data())
def test_encode_pair_properties(caption, data):
  tok = load_tokenizer(None)
  image = make_image(*regions(data.draw, VOCAB, caption))
  arrays, stats = pipeline.encode_pair(caption, image, tok, VOCAB, SHAPES)
  check_example(arrays, stats, caption, image, tok)
  event(f'anchors: {int(arrays["anchor_valid"].sum())}')
  event(f'caption chars > 1000: {len(caption) > 1000}')
  event(f'regions truncated: {stats["regions_truncated"]}')


# A region tag list as stored: world tags, '' (no tag), or unknown names.
TAG_NAMES = st.sampled_from(list(scenes.WORLD_TAGS) + ['']) | st.text(
    max_size=8)


@SETTINGS
@given(caption=CAPTIONS, names=st.lists(TAG_NAMES, max_size=R + 6))
def test_decode_then_encode_properties(caption, names):
  """Through the record format: unknown tags are a RecordError naming
  region_tags; everything else decodes and encodes."""
  tok = load_tokenizer(None)
  n = len(names)
  rng = np.random.default_rng(n)
  xy = rng.uniform(0, 0.5, (n, 2)).astype(np.float32)
  record = dict(image_id='img', caption=caption,
                region_feats=rng.standard_normal((n, F)).astype(np.float32),
                region_boxes=np.concatenate([xy, xy + 0.25], 1),
                region_tags=names,
                region_conf=rng.uniform(size=n).astype(np.float32))
  raw = records.encode_record(record)
  unknown = [t for t in names if t and t not in scenes.WORLD_TAGS]
  if unknown:
    with pytest.raises(records.RecordError) as e:
      pipeline.decode_pair(raw, path='p', index=7, shapes=SHAPES, vocab=VOCAB)
    assert (e.value.index, e.value.field) == (7, 'region_tags')
    return
  image = pipeline.decode_pair(raw, path='p', index=7, shapes=SHAPES,
                               vocab=VOCAB)
  assert image['caption'] == caption
  image['region_feats'] = image['region_feats'].copy()  # Read-only.
  image['region_feats'][:, 0] = np.arange(n)  # To see which were kept.
  arrays, stats = pipeline.encode_pair(caption, image, tok, VOCAB, SHAPES)
  check_example(arrays, stats, caption, image, tok)


# ------------------------------------------------------------ BatchEncoder

@SETTINGS
@given(data=st.data(), size=st.integers(1, 6),
       neg_prob=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_batch_encoder_properties(data, size, neg_prob, seed):
  tok = load_tokenizer(None)
  config = pretrain.get_config('tiny')
  config.data.itm_neg_prob = neg_prob
  config.data.itm_group = size  # One group: pick_itm_captions' own draw.
  examples = []
  for _ in range(size):
    caption = data.draw(CAPTIONS)
    image = make_image(*regions(data.draw, VOCAB, caption))
    image.update(caption=caption, image_id=data.draw(st.sampled_from('abc')))
    if data.draw(st.booleans()):
      image['skipped'] = data.draw(st.dictionaries(
          st.sampled_from(pipeline.SKIP_REASONS), st.integers(1, 99)))
    examples.append(image)
  encoder = pipeline.BatchEncoder(config, VOCAB)
  batch = encoder(examples, np.random.default_rng(seed))

  # Static shapes and dtypes, [B] int32 counters under STAT_KEYS.
  for k, (shape, dtype) in ARRAY_SPECS.items():
    assert batch[k].shape == (size, *shape) and batch[k].dtype == dtype, k
  assert batch['itm_label'].shape == (size,)
  assert tuple(batch['stats']) == pipeline.STAT_KEYS
  for v in batch['stats'].values():
    assert v.shape == (size,) and v.dtype == np.int32
  stats = batch['stats']
  assert (stats['examples'] == 1).all()
  np.testing.assert_array_equal(stats['itm_negatives'],
                                1 - batch['itm_label'])
  for r in pipeline.SKIP_REASONS:
    np.testing.assert_array_equal(
        stats[f'skipped_{r}'],
        [e.get('skipped', {}).get(r, 0) for e in examples])

  # Each row is encode_pair of the caption it was fed; negatives pair a
  # caption with another image, never with its own.
  group_rng = np.random.default_rng(
      (int(np.random.default_rng(seed).integers(2**62)), 0))
  caption_index, label = pipeline.pick_itm_captions(
      [e['image_id'] for e in examples], group_rng, neg_prob)
  np.testing.assert_array_equal(batch['itm_label'], label)
  for i, (image, c) in enumerate(zip(examples, caption_index)):
    assert (examples[c]['image_id'] != image['image_id']) == (label[i] == 0)
    arrays, row_stats = pipeline.encode_pair(examples[c]['caption'], image,
                                             tok, VOCAB, encoder.shapes)
    for k, v in arrays.items():
      np.testing.assert_array_equal(batch[k][i], v, err_msg=k)
    check_example(arrays, row_stats, examples[c]['caption'], image, tok)
    for k, v in row_stats.items():
      assert stats[k][i] == v, k
