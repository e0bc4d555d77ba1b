"""Tokenisation, done once per (dataset, tokenizer, max length) and cached on disk.

Arrays are cached under ``$SPRY_JAX_CACHE/tokenized/<key>.npz``; the key hashes the dataset's
content, the tokenizer's full definition (vocabulary, normaliser, special tokens; not its
transient padding/truncation state) and the tokenisation settings, so a stale entry can never be
picked up. Files are written to a temporary name and renamed, so concurrent runs never read a
half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spry_jax import assets
from spry_jax.data.errors import DataError

# Bump when the meaning of the cached arrays changes (2: text pairs keep token_type_ids).
_FORMAT_VERSION = 2


def as_hf_tokenizer(tokenizer: Any):
    """A transformers fast tokenizer for ``tokenizer``.

    Accepts a transformers tokenizer (returned as is) or a raw ``tokenizers.Tokenizer`` (wrapped;
    the wrapper works on a copy, so the caller's padding/truncation settings are untouched).
    """
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise DataError(
            f"tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, "
            f"got {type(tokenizer).__name__}"
        )
    return tokenizer


def pad_token_id(tok: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS (decoder LMs), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            return value
    return 0


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 of the tokenizer's definition, stable across processes and calls."""
    tok = as_hf_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    h = hashlib.sha256(type(tok).__name__.encode())
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding/truncation are per-call state that transformers writes into the backend.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    extra = {
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "padding_side": getattr(tok, "padding_side", None),
        "truncation_side": getattr(tok, "truncation_side", None),
        "pad": pad_token_id(tok),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def tokenize_texts(
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    tokenizer: Any,
    max_length: int,
) -> dict[str, np.ndarray]:
    """Tokenizes (pairs of) texts, truncated and right-padded to ``max_length``.

    Returns:
      ``input_ids`` and ``attention_mask``, int32 [N, max_length]; for text pairs also
      ``token_type_ids`` (0 = first text, 1 = second, 0 on padding) when the tokenizer makes
      them (BERT and ALBERT tokenizers do; RoBERTa's and DistilBERT's do not). Single texts
      have one segment, so they get none and stay as they were.
    """
    tok = as_hf_tokenizer(tokenizer)
    enc = tok(
        list(texts),
        list(text_pairs) if text_pairs is not None else None,
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    n = len(texts)
    ids = np.full((n, max_length), pad_token_id(tok), dtype=np.int32)
    mask = np.zeros((n, max_length), dtype=np.int32)
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if text_pairs is not None and "token_type_ids" in enc:
        types = np.zeros((n, max_length), dtype=np.int32)
        for i, row in enumerate(enc["token_type_ids"]):
            types[i, : len(row)] = row
        out["token_type_ids"] = types
    return out


def tokenized_cache_path(key: dict[str, Any]) -> Path:
    """Where the arrays for ``key`` (a JSON-able dict) are cached."""
    blob = json.dumps({"format": _FORMAT_VERSION, **key}, sort_keys=True).encode()
    return assets.cache_dir() / "tokenized" / f"{hashlib.sha256(blob).hexdigest()[:32]}.npz"


def cached_arrays(
    key: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Returns the arrays cached under ``key``, computing and caching them on a miss.

    A cache file that cannot be read (truncated, corrupted) is recomputed and replaced.
    """
    path = tokenized_cache_path(key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            pass
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays
