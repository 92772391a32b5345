"""The injection classifier's hashed n-gram features against a plain-Python statement of what they are, so the
vectorised code (power tables computed once, one bucketing pass, the one-segment path of short texts) keeps
computing exactly the features the shipped model was trained on."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from keel.governance.guards import features
from keel.governance.guards.injection import load_model

M64 = 2**64
P, MIX = 0x100000001B3, 0x9E3779B97F4A7C15


def bucket(h: int, salt: int) -> int:
    return (((h ^ salt) * MIX) % M64) >> (64 - features.BITS)


def poly(codes: list[int]) -> int:
    return sum(c * pow(P, j, M64) for j, c in enumerate(codes)) % M64


def reference_ids(norm: str) -> list[int]:
    """Char 3-5-grams of the compacted, space-padded text, then its words and word pairs, in that order."""
    codes = [ord(ch) for ch in " " + norm + " "]
    tok = [97 <= c <= 122 or 48 <= c <= 57 or c >= 128 for c in codes]
    keep = [t or (i == 0 or tok[i - 1]) for i, t in enumerate(tok)]
    c = [code if t else 32 for code, t, k in zip(codes, tok, keep) if k]
    ctok = [t for t, k in zip(tok, keep) if k]
    ids = [bucket(poly(c[i:i + k]), features._SALTS[k]) for k in (3, 4, 5) for i in range(len(c) - k + 1)]
    words, start = [], None
    for i, t in enumerate([*ctok, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            words.append(poly(c[start:i]))
            start = None
    ids += [bucket(w, features._SALTS["w1"]) for w in words]
    ids += [bucket((a * MIX + b) % M64, features._SALTS["w2"]) for a, b in zip(words, words[1:])]
    return ids


TEXT = st.text(st.sampled_from("abcxyz019 .!?\n-_:{}\"éü漢"), max_size=120)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_features_are_the_polynomial_hashes_the_model_was_trained_on(text):
    norm = features.normalise(text)
    ids, _ = features.featurize(norm, [(0, len(norm))]) if norm.strip() else (np.zeros(0, np.int64), None)
    assert ids.tolist() == (reference_ids(norm) if norm.strip() else [])


def test_a_text_longer_than_the_power_tables_is_hashed_like_a_short_one():
    """The tables grow on demand: a 5,000-character text's features are those of its parts' hashes."""
    text = "wire the funds now " * 270
    ids, _ = features.featurize(text, [(0, len(text))])
    assert ids.tolist() == reference_ids(text)


@settings(max_examples=100, deadline=None)
@given(TEXT)
def test_a_one_segment_text_scores_as_the_segmented_path_does(text):
    """`scores` takes a shortcut when the text is one segment; its logit is the general path's, bit for bit."""
    m = load_model()
    spans = features.segments(text)
    got = features.scores(m["w"], m["bias"], text, spans, m["min_evidence"])
    if not spans:
        assert len(got) == 0
        return
    ids, seg = features.featurize(text, spans)
    counts = np.bincount(seg, minlength=len(spans)).astype(np.float64)
    sums = np.bincount(seg, weights=m["w"][ids], minlength=len(spans))
    want = m["bias"] + sums / np.sqrt(np.maximum(counts, max(m["min_evidence"], 1.0)))
    assert np.array_equal(got, want)


def test_short_and_longer_one_segment_texts_take_their_paths_to_the_same_ids():
    """Up to `SMALL` characters the ids come from plain Python, past it (one segment up to 400) from numpy: the
    two agree on texts around the boundary, and both with the plain statement of the hashes."""
    base = "Refund 120 EUR to the customer's card; note it in the ticket. "
    for n in (0, 3, 40, features.SMALL - 1, features.SMALL, features.SMALL + 1, 399):
        norm = features.normalise((base * 8)[:n])
        small = features._small_ids(norm)
        assert small == features._features(norm, None)[0].tolist() == reference_ids(norm)
