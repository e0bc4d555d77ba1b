"""Tokenisation and its on-disk cache, checked against the tokenizer's own padding."""

from __future__ import annotations

import numpy as np
import tokenizers

from spry_jax.assets import fetch
from spry_jax.data.tokenize import (
    cached_arrays,
    tokenize_texts,
    tokenized_cache_path,
    tokenizer_fingerprint,
)

TEXTS = ["A gripping, beautifully shot film.", "Dull.", "word " * 40]
PAIRS = ["The premise is here.", "x", "short"]


def test_matches_the_tokenizers_own_padding(minilm_tokenizer):
    for pairs in (None, PAIRS):
        ours = tokenize_texts(TEXTS, pairs, minilm_tokenizer, 16)
        ref = minilm_tokenizer(
            TEXTS, pairs, truncation=True, max_length=16, padding="max_length", return_tensors="np"
        )
        np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
        assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == (3, 16)
    # ("Dull.", "x") is [CLS] dull . [SEP] x [SEP], then padding.
    assert ours["attention_mask"][1].sum() == 6
    assert ours["input_ids"][1, 0] == minilm_tokenizer.cls_token_id


def test_pairs_keep_the_tokenizers_token_type_ids(minilm_tokenizer):
    ours = tokenize_texts(TEXTS, PAIRS, minilm_tokenizer, 16)
    ref = minilm_tokenizer(
        TEXTS, PAIRS, truncation=True, max_length=16, padding="max_length", return_tensors="np"
    )
    np.testing.assert_array_equal(ours["token_type_ids"], ref["token_type_ids"])
    assert ours["token_type_ids"].dtype == np.int32
    # ("Dull.", "x"): [CLS] dull . [SEP] are segment 0, x [SEP] segment 1, padding 0.
    assert ours["token_type_ids"][1].tolist() == [0, 0, 0, 0, 1, 1] + [0] * 10
    # A single text has one segment: no token_type_ids, the arrays are as before.
    assert set(tokenize_texts(TEXTS, None, minilm_tokenizer, 16)) == {"input_ids", "attention_mask"}


def test_raw_tokenizers_object_gives_the_same_ids(minilm_tokenizer):
    raw = tokenizers.Tokenizer.from_file(str(fetch("minilm") / "tokenizer.json"))
    before = raw.padding
    a = tokenize_texts(TEXTS, None, raw, 12)
    b = tokenize_texts(TEXTS, None, minilm_tokenizer, 12)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert raw.padding == before, "the caller's tokenizer must not be modified"


def test_fingerprint_is_stable_and_distinguishes_tokenizers(minilm_tokenizer):
    fp = tokenizer_fingerprint(minilm_tokenizer)
    minilm_tokenizer(["x"], truncation=True, max_length=7, padding="max_length")
    assert tokenizer_fingerprint(minilm_tokenizer) == fp
    raw = tokenizers.Tokenizer.from_file(str(fetch("minilm") / "tokenizer.json"))
    raw.add_tokens(["<brand-new-token>"])
    assert tokenizer_fingerprint(raw) != fp


def test_cache_hit_and_corrupt_entry(tmp_cache):
    calls = []

    def compute():
        calls.append(1)
        return {"input_ids": np.arange(6, dtype=np.int32).reshape(2, 3)}

    key = {"dataset": "abc", "max_length": 3}
    a = cached_arrays(key, compute)
    path = tokenized_cache_path(key)
    assert path.exists() and str(path).startswith(str(tmp_cache / "tokenized"))
    b = cached_arrays(key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    path.write_bytes(path.read_bytes()[:20])  # a truncated write
    c = cached_arrays(key, compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(c["input_ids"], a["input_ids"])
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp files left"
    assert tokenized_cache_path({**key, "max_length": 4}) != path
