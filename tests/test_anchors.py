"""Tests for anchor point detection (docs/design.md §2)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cmal_jax.data.anchors import TagVocab, detect_anchors, singularize, split_words
from cmal_jax.data.tokenizer import load_tokenizer

VOCAB = TagVocab(
    tags=("circle", "square", "half circle", "traffic light", "box", "semicircle", "glasses", "man"),
    synonyms={"ring": "circle", "quadrat": "square", "semi circle": "semicircle",
              "spectacles": "glasses", "carton": "box"})
C, S, HC, TL, BOX, SEMI, GL, MAN = range(8)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def run(tok, caption, tags, conf=None, max_len=32, k=6, vocab=VOCAB):
    enc = tok.encode(caption, max_len)
    return enc, detect_anchors(caption, enc.offsets, np.array(tags, np.int32),
                               None if conf is None else np.array(conf), vocab, k)


def pieces(tok, enc, a, i):
    return [tok.id_to_token(t) for t in enc.ids[a.text_pos[i]:a.text_end[i]]]


@pytest.mark.parametrize("plural,singular", [
    ("circles", "circle"), ("boxes", "box"), ("benches", "bench"), ("dishes", "dish"),
    ("ponies", "pony"), ("ties", "tie"), ("houses", "house"), ("glasses", "glass"),
    ("men", "man"), ("children", "child"), ("knives", "knife"), ("mice", "mouse"),
    ("gloves", "glove"), ("bus", "bus"), ("gas", "gas"), ("cactus", "cactus"),
    ("axis", "axis"), ("series", "series"), ("circle", "circle")])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_tag_vocab():
    assert VOCAB.num_tags == 8 and VOCAB.tag_id("box") == BOX and VOCAB.tag_id("") == -1
    with pytest.raises(KeyError, match="hexagon"):
        VOCAB.tag_id("hexagon")
    v = TagVocab.from_meta({"tags": ["circle", "box"], "synonyms": {"ring": "circle"}})
    assert v.tags == ("circle", "box") and v.synonyms["ring"] == "circle"
    with pytest.raises(ValueError, match="unknown tag"):
        TagVocab(("circle",), {"ring": "disc"})


def test_split_words_spans_unicode():
    cap = "İstanbul café, ÅNGSTRÖM-circles!"
    words = split_words(cap)
    assert [w for w, _, _ in words][1:] == ["café", "ångström", "circles"]
    assert all(cap[s:e].lower() == w for w, s, e in words)


def test_plurals_synonyms_and_multiword(tok):
    cap = "Two Rings, cartons, half circles and traffic lights; a man and his spectacles."
    enc, a = run(tok, cap, [TL, HC, BOX, C, C, GL, MAN])
    assert a.words == ["Rings", "cartons", "half circles", "traffic lights", "man", "spectacles"]
    assert a.valid.all() and list(a.region) == [3, 2, 1, 0, 6, 5]
    assert pieces(tok, enc, a, 2) == ["half", "circles"]  # n-gram covers all its words
    assert pieces(tok, enc, a, 3) == ["traffic", "lights"]


def test_multi_piece_word(tok):
    enc, a = run(tok, "two semicircles", [SEMI])
    assert pieces(tok, enc, a, 0) == ["semi", "##ci", "##rcle", "##s"]
    assert (a.text_pos[0], a.text_end[0]) == (2, 6)


def test_most_confident_region_and_ties(tok):
    _, a = run(tok, "a circle", [C, S, C, C], conf=[0.2, 0.99, 0.9, 0.9])
    assert a.region[0] == 2  # highest confidence, tie -> lowest index
    _, a = run(tok, "a circle", [S, C, C])  # no confidences -> lowest index
    assert a.region[0] == 1


def test_each_region_used_once(tok):
    _, a = run(tok, "a circle next to another circle", [C, S])
    assert a.valid.sum() == 1 and a.text_pos[0] == 2 and a.region[0] == 0
    assert a.unmatched_tags == ["circle"]


def test_max_anchors_and_padding(tok):
    _, a = run(tok, "circle circle circle circle", [C] * 4, k=2)
    assert a.valid.all() and a.words == ["circle", "circle"]
    assert a.text_pos.shape == (2,) and list(a.text_pos) == [1, 2] and list(a.region) == [0, 1]
    _, a = run(tok, "one circle", [C], k=3)
    assert a.valid.tolist() == [True, False, False]
    assert a.text_pos.tolist()[1:] == a.text_end.tolist()[1:] == a.region.tolist()[1:] == [0, 0]


def test_truncated_caption(tok):
    enc, a = run(tok, "a circle and a square and a box", [C, S, BOX], max_len=6)
    assert enc.truncated and a.words == ["circle"] and a.num_truncated == 2


def test_no_regions_and_non_tag_words(tok):
    _, a = run(tok, "a circle and a square", [])
    assert not a.valid.any() and a.unmatched_tags == ["circle", "square"]
    _, a = run(tok, "a dog on grass", [C, S, -1])
    assert not a.valid.any() and a.unmatched_tags == [] and a.num_truncated == 0


def test_unicode_caption(tok):
    cap = "İstanbul café ÅNGSTRÖM circles"
    enc, a = run(tok, cap, [C])
    assert a.words == ["circles"] and pieces(tok, enc, a, 0) == ["circles"]


SMALL = TagVocab(("circle", "square", "half circle", "traffic light", "box"),
                 {"ring": "circle", "crate": "box", "stop light": "traffic light"})
WORDS = st.sampled_from(["circle", "circles", "half", "square", "traffic", "lights",
                         "ring", "box", "boxes", "stop", "crates", "the", "İ", "日本", "©"])
CAPTIONS = st.one_of(
    st.text(max_size=400),
    st.lists(st.one_of(WORDS, st.text(max_size=3)), max_size=80).map(" ".join))


@settings(max_examples=200, deadline=None)
@given(cap=CAPTIONS, data=st.data())
def test_property_shapes_and_uniqueness(cap, data):
    tok = load_tokenizer(None)
    n = data.draw(st.integers(0, 12))
    tags = np.array(data.draw(st.lists(st.integers(-1, SMALL.num_tags - 1), min_size=n, max_size=n)), np.int32)
    conf = data.draw(st.one_of(st.none(), st.lists(
        st.floats(0, 1), min_size=n, max_size=n).map(np.array)))
    enc = tok.encode(cap, 24)
    L, K = len(enc.ids), 6
    a = detect_anchors(cap, enc.offsets, tags, conf, SMALL, K)
    for arr in (a.text_pos, a.text_end, a.region, a.valid):
        assert arr.shape == (K,)
    v = a.valid
    assert len(a.words) == v.sum()
    assert np.all((0 < a.text_pos[v]) & (a.text_pos[v] < a.text_end[v]) & (a.text_end[v] <= L - 1))
    assert np.all(a.region[v] < n) and len(set(a.region[v])) == v.sum()
    assert np.all(tags[a.region[v]] >= 0)
    covered = [p for s, e in zip(a.text_pos[v], a.text_end[v]) for p in range(s, e)]
    assert len(covered) == len(set(covered))
    assert not np.any(a.text_pos[~v]) and not np.any(a.region[~v])


def test_es_plurals_of_words_ending_in_s_find_their_synonym():
    # "pluses"/"rhombuses" are regular -es plurals of synonyms ending in -s;
    # the dictionary picks the right singular among the rule candidates.
    vocab = TagVocab(tags=("cross", "diamond", "house"),
                     synonyms={"plus": "cross", "rhombus": "diamond"})
    assert vocab.match(["pluses"], 0) == (0, 1)
    assert vocab.match(["rhombuses"], 0) == (1, 1)
    assert vocab.match(["houses"], 0) == (2, 1)
