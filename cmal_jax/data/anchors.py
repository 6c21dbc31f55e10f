"""Anchor point detection (docs/design.md §2): caption words naming detected objects.

Host side, pure numpy/python, deterministic, called once per example in the
input pipeline. Caption -> lower-cased words with char spans -> canonical tag
(raw word, else its singular, looked up in a synonym dictionary; multi-word
tags match as n-grams, longest first) -> each match pairs with the most
confident free region carrying that tag -> WordPiece span via the token
offsets of the encoded caption.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import types
from typing import Mapping, Sequence

import numpy as np

# Irregular plurals (and words that look plural but are not). Regular ones are
# handled by the rules in `singularize`; -ves -> -f/-fe only happens here,
# because "gloves", "caves", "olives" are regular.
PLURAL_EXCEPTIONS: Mapping[str, str] = types.MappingProxyType({
    "men": "man", "women": "woman", "children": "child", "people": "person",
    "persons": "person", "mice": "mouse", "geese": "goose", "feet": "foot",
    "teeth": "tooth", "oxen": "ox", "lice": "louse", "dice": "die",
    "firemen": "fireman", "policemen": "policeman", "snowmen": "snowman",
    "fishermen": "fisherman", "businessmen": "businessman",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf",
    "wolves": "wolf", "shelves": "shelf", "halves": "half", "calves": "calf",
    "loaves": "loaf", "scarves": "scarf", "thieves": "thief", "elves": "elf",
    "hooves": "hoof", "selves": "self",
    "buses": "bus", "gases": "gas", "lenses": "lens", "quizzes": "quiz",
    "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero",
    "cacti": "cactus", "fungi": "fungus", "radii": "radius",
    # Look plural, are not (the rules would mangle them).
    "series": "series", "species": "species", "news": "news",
})

_WORD_RE = re.compile(r"[^\W_]+")  # unicode letters/digits; "_" splits like BERT
_ES_SUFFIXES = ("sses", "xes", "zzes", "ches", "shes")  # boxes, benches, dishes


def split_words(caption: str) -> list[tuple[str, int, int]]:
    """Lower-case words with their [start, end) char spans in the ORIGINAL caption.

    Lowering is done per word, after matching, so the spans stay valid even
    where lower() changes a string's length (e.g. "İ").
    """
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD_RE.finditer(caption)]


def singularize(word: str, exceptions: Mapping[str, str] = PLURAL_EXCEPTIONS) -> str:
    """English plural -> singular by a short rule set.

    1. `exceptions` (irregulars, -ves words, -oes words, fake plurals).
    2. Words of <= 3 letters are kept ("gas", "bus", "yes").
    3. -ss/-us/-is are singular already ("glass", "cactus", "axis").
    4. -ies -> -y ("ponies" -> "pony"), but 4-letter "ties"/"pies" drop the s.
    5. -sses/-xes/-zzes/-ches/-shes drop "es" ("boxes" -> "box").
    6. Any other trailing -s is dropped ("houses" -> "house", "cats" -> "cat").
    """
    if word in exceptions:
        return exceptions[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(_ES_SUFFIXES):
        return word[:-2]
    return word[:-1]


def singular_candidates(word: str, exceptions: Mapping[str, str] = PLURAL_EXCEPTIONS) -> list[str]:
    """Singular forms to look up, rules first, then "-es" dropped.

    The dictionary decides between them: "pluses" -> "plus" and "rhombuses"
    -> "rhombus" (rule 6 would give "pluse"), while "houses" still finds
    "house" first.
    """
    sing = singularize(word, exceptions)
    out = [sing] if sing != word else []
    if word.endswith("es") and len(word) > 4 and word[:-2] != sing:
        out.append(word[:-2])
    return out


def _normalise(phrase: str) -> str:
    """Canonical lookup key: lower-cased words joined by single spaces."""
    return " ".join(w for w, _, _ in split_words(phrase))


@dataclasses.dataclass(frozen=True)
class TagVocab:
    """Detector tag vocabulary plus the word -> tag synonym dictionary."""

    tags: tuple[str, ...]  # canonical names; index = tag id
    synonyms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    plural_exceptions: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: PLURAL_EXCEPTIONS, repr=False)
    # Derived lookup tables, built once in __post_init__.
    _tag_ids: Mapping[str, int] = dataclasses.field(init=False, repr=False, compare=False)
    _lookup: Mapping[str, int] = dataclasses.field(init=False, repr=False, compare=False)
    _ngram_lens: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tags = tuple(self.tags)
        tag_ids = {t: i for i, t in enumerate(tags)}
        if len(tag_ids) != len(tags):
            raise ValueError("TagVocab.tags contains duplicates")
        # Normalised phrase -> tag id. Every tag maps to itself.
        lookup = {_normalise(t): i for i, t in enumerate(tags)}
        for phrase, tag in self.synonyms.items():
            if tag not in tag_ids:
                raise ValueError(f"synonym {phrase!r} maps to unknown tag {tag!r}")
            lookup[_normalise(phrase)] = tag_ids[tag]
        lookup.pop("", None)  # a tag made only of punctuation can never match
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        set_("tags", tags)
        set_("synonyms", types.MappingProxyType(dict(self.synonyms)))
        set_("_tag_ids", types.MappingProxyType(tag_ids))
        set_("_lookup", types.MappingProxyType(lookup))
        set_("_ngram_lens", tuple(sorted({k.count(" ") + 1 for k in lookup}, reverse=True)))

    @classmethod
    def from_meta(cls, meta: dict) -> "TagVocab":
        """From dataset metadata: `meta["tags"]`, optional `meta["synonyms"]`."""
        kwargs = {}
        if "plural_exceptions" in meta:
            kwargs["plural_exceptions"] = {**PLURAL_EXCEPTIONS, **meta["plural_exceptions"]}
        return cls(tags=tuple(meta["tags"]), synonyms=dict(meta.get("synonyms", {})), **kwargs)

    @property
    def num_tags(self) -> int:
        return len(self.tags)

    def tag_id(self, name: str) -> int:
        """Tag id of a canonical name; -1 for "" (no tag)."""
        if name == "":
            return -1
        try:
            return self._tag_ids[name]
        except KeyError:
            raise KeyError(f"unknown tag {name!r} (not in TagVocab.tags)") from None

    def match(self, words: Sequence[str], i: int) -> tuple[int, int]:
        """(tag id, n) of the longest phrase starting at words[i]; (-1, 0) if none.

        The raw phrase is tried first (so "glasses" or "bus" as a synonym still
        matches), then with its last word singularised ("half circles").
        """
        for n in self._ngram_lens:
            if i + n > len(words):
                continue
            raw = words[i] if n == 1 else " ".join(words[i:i + n])
            t = self._lookup.get(raw)
            if t is None:
                last = words[i + n - 1]
                stem = raw[:len(raw) - len(last)]
                for sing in singular_candidates(last, self.plural_exceptions):
                    t = self._lookup.get(stem + sing)
                    if t is not None:
                        break
            if t is not None:
                return t, n
        return -1, 0


@dataclasses.dataclass
class Anchors:
    """Anchor points of one example, padded to K = max_anchors."""

    text_pos: np.ndarray  # int32 [K] first WordPiece of the word (0 = padding)
    text_end: np.ndarray  # int32 [K] one past its last WordPiece
    region: np.ndarray  # int32 [K] paired region index
    valid: np.ndarray  # bool [K]
    words: list[str]  # matched surface strings of the valid anchors, in order
    num_truncated: int  # matches dropped because the caption was truncated
    unmatched_tags: list[str]  # tags of matched words that found no free region


def detect_anchors(caption: str, offsets: Sequence[tuple[int, int]],
                   region_tag_ids, region_conf, vocab: TagVocab,
                   max_anchors: int) -> Anchors:
    """Pair caption words naming a tag with detected regions carrying it.

    offsets: token char spans of the encoded caption (TextEncoding.offsets);
      specials are (0, 0). Assumed non-decreasing, as WordPiece offsets are.
    region_tag_ids: int [N], -1 for a region without tag.
    region_conf: float [N] detector confidences, or None (then lowest index wins).
    Scanning stops once max_anchors anchors are found.
    """
    K = max_anchors
    text_pos = np.zeros(K, np.int32)
    text_end = np.zeros(K, np.int32)
    region = np.zeros(K, np.int32)
    valid = np.zeros(K, bool)
    out_words, unmatched, num_truncated = [], [], 0

    # Per tag, its regions in pick order: confidence descending, index ascending
    # (stable sort). Popping from the front uses each region at most once.
    tags = np.asarray(region_tag_ids, np.int64).reshape(-1)
    if region_conf is None:
        order = np.arange(tags.size)
    else:
        conf = np.asarray(region_conf, np.float64).reshape(-1)
        order = np.argsort(-conf, kind="stable")
    free: dict[int, list[int]] = {}
    for r in order.tolist():
        t = int(tags[r])
        if t >= 0:
            free.setdefault(t, []).append(r)

    # Real (non-special) tokens, for bisecting char spans -> token indices.
    tok_idx, starts, ends = [], [], []
    for i, (s, e) in enumerate(offsets):
        if e > s:
            tok_idx.append(i)
            starts.append(int(s))
            ends.append(int(e))

    spans = split_words(caption)
    words = [w for w, _, _ in spans]
    used_tokens: set[int] = set()
    k, i = 0, 0
    while i < len(words) and k < K:
        t, n = vocab.match(words, i)
        if n == 0:
            i += 1
            continue
        _, ws, we = spans[i]
        pe = spans[i + n - 1][2]
        i += n
        # First token overlapping the first word (normally the one containing
        # its first char); none means the caption was cut before this word.
        j = bisect.bisect_right(ends, ws)
        if j == len(ends) or starts[j] >= we:
            num_truncated += 1
            continue
        last = bisect.bisect_left(starts, pe) - 1  # last token starting inside the phrase
        toks = range(tok_idx[j], tok_idx[last] + 1)
        # One token can span two words (e.g. an [UNK] for "circle©square");
        # never reuse a text position.
        if any(p in used_tokens for p in toks):
            continue
        cands = free.get(t)
        if not cands:
            unmatched.append(vocab.tags[t])
            continue
        used_tokens.update(toks)
        text_pos[k], text_end[k], region[k], valid[k] = toks.start, toks.stop, cands.pop(0), True
        out_words.append(caption[ws:pe])
        k += 1
    return Anchors(text_pos, text_end, region, valid, out_words, num_truncated, unmatched)
