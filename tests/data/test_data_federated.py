"""make_federated_data end to end, and the synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest
from ml_collections import ConfigDict

from spry_jax.data import DataError, make_federated_data, make_synthetic, pack_clients
from spry_jax.types import BATCH_KEYS


def rt_cfg(**kw) -> ConfigDict:
    base = dict(
        name="rotten_tomatoes",
        alpha=0.5,
        partition="dirichlet",
        max_length=32,
        test_fraction=0.2,
        max_examples=1000,
    )
    base.update(kw)
    return ConfigDict(base)


def test_rotten_tomatoes_federated(minilm_tokenizer, tmp_cache):
    fd = make_federated_data(rt_cfg(), num_clients=20, tokenizer=minilm_tokenizer, seed=0)
    assert fd.task == "classification" and fd.num_labels == 2 and fd.num_clients == 20
    assert [fd.num_examples(c) for c in range(20)] == [40] * 20  # 50 each, 80/20
    assert [fd.num_test_examples(c) for c in range(20)] == [10] * 20
    seen = np.concatenate([np.r_[tr, te] for tr, te in fd.client_examples])
    assert len(np.unique(seen)) == 1000
    ds = fd.dataset
    c = 3
    tr, _ = fd.client_examples[c]
    np.testing.assert_array_equal(fd.train[c]["labels"], ds.labels[tr])
    ref = minilm_tokenizer(
        [ds.texts[i] for i in tr[:5]], truncation=True, max_length=32, padding="max_length"
    )
    np.testing.assert_array_equal(fd.train[c]["input_ids"][:5], ref["input_ids"])
    assert fd.train[c]["input_ids"].dtype == np.int32 and fd.train[c]["labels"].dtype == np.int32
    assert len(list((tmp_cache / "tokenized").glob("*.npz"))) == 1


def test_fingerprint_and_determinism(minilm_tokenizer, tmp_cache):
    a = make_federated_data(rt_cfg(), num_clients=10, tokenizer=minilm_tokenizer, seed=1)
    b = make_federated_data(rt_cfg(), num_clients=10, tokenizer=minilm_tokenizer, seed=1)
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.client_examples, b.client_examples, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
    others = [
        make_federated_data(rt_cfg(), num_clients=10, tokenizer=minilm_tokenizer, seed=2),
        make_federated_data(rt_cfg(alpha=0.1), num_clients=10, tokenizer=minilm_tokenizer, seed=1),
        make_federated_data(
            rt_cfg(max_length=24), num_clients=10, tokenizer=minilm_tokenizer, seed=1
        ),
        make_federated_data(rt_cfg(), num_clients=11, tokenizer=minilm_tokenizer, seed=1),
    ]
    assert len({a.fingerprint, *(o.fingerprint for o in others)}) == 5


def test_natural_and_iid_and_heldout(minilm_tokenizer, tmp_cache):
    fd = make_federated_data(
        rt_cfg(partition="natural", max_examples=0),
        num_clients=50,
        tokenizer=minilm_tokenizer,
        seed=0,
    )
    movies = [set(fd.dataset.group[np.r_[tr, te]]) for tr, te in fd.client_examples]
    all_movies = set().union(*movies)
    assert len(all_movies) == 508 and sum(len(m) for m in movies) == 508
    fd = make_federated_data(
        ConfigDict(
            dict(
                name="bbc_news", partition="iid", max_length=32, heldout=True, heldout_fraction=0.1
            )
        ),
        num_clients=8,
        tokenizer=minilm_tokenizer,
        seed=0,
    )
    n_held = len(fd.heldout["labels"])
    assert 150 < n_held < 300
    pooled = sum(len(tr) + len(te) for tr, te in fd.client_examples)
    assert pooled == 8 * ((2225 - n_held) // 8)
    held = set(np.flatnonzero(fd.dataset.heldout).tolist())
    assert not held & set(np.concatenate([np.r_[tr, te] for tr, te in fd.client_examples]).tolist())


def test_errors(minilm_tokenizer, tmp_cache):
    with pytest.raises(DataError, match="needs a tokenizer"):
        make_federated_data(rt_cfg(), num_clients=4, tokenizer=None, seed=0)
    with pytest.raises(DataError, match="data.alpha must be a positive"):
        make_federated_data(rt_cfg(alpha=0.0), num_clients=4, tokenizer=minilm_tokenizer, seed=0)
    with pytest.raises(DataError, match="more clients than examples"):
        make_federated_data(
            rt_cfg(max_examples=30), num_clients=31, tokenizer=minilm_tokenizer, seed=0
        )
    with pytest.raises(DataError, match="client 0 is empty"):
        make_federated_data(
            rt_cfg(max_examples=30), num_clients=30, tokenizer=minilm_tokenizer, seed=0
        )
    with pytest.raises(DataError, match="natural' needs a dataset with a natural group"):
        make_federated_data(
            ConfigDict(dict(name="bbc_news", partition="natural")),
            num_clients=4,
            tokenizer=minilm_tokenizer,
            seed=0,
        )


def _counts_label(ids, mask, vocab, k):
    """Independent restatement of the label rule: the class whose marker block occurs most."""
    block = (vocab - 4) // (k + 1)
    out = []
    for row, m in zip(ids, mask, strict=True):
        counts = [0] * k
        for t in row[m == 1]:
            c = (t - 4) // block
            if c < k:
                counts[c] += 1
        out.append(int(np.argmax(counts)))
    return np.array(out)


def test_synthetic_dataset_is_deterministic_and_learnable():
    kw = dict(vocab_size=64, num_examples=600, num_labels=3, seq_len=16)
    a = make_synthetic(**kw, seed=0)
    b = make_synthetic(**kw, seed=0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ids, mask, y = a["input_ids"], a["attention_mask"], a["labels"]
    assert ids[mask == 1].min() >= 4 and ids.max() < 64 and (ids[mask == 0] == 0).all()
    lengths = mask.sum(1)
    assert lengths.min() >= 8 and lengths.max() == 16 and len(set(lengths.tolist())) > 3
    np.testing.assert_array_equal(y, _counts_label(ids, mask, 64, 3))
    assert np.bincount(y, minlength=3).min() > 120, "classes must not be degenerate"
    # A linear bag-of-tokens model fit on 400 examples generalises to the other 200.
    x = np.stack([np.bincount(r[m == 1], minlength=64) for r, m in zip(ids, mask, strict=True)])
    x = x / 16.0
    w = np.zeros((64, 3))
    onehot = np.eye(3)[y]
    for _ in range(300):
        logits = x[:400] @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 2.0 * x[:400].T @ (p - onehot[:400]) / 400
    acc = ((x[400:] @ w).argmax(1) == y[400:]).mean()
    assert acc > 0.85
    with pytest.raises(DataError, match="data.vocab_size=8 is too small"):
        make_synthetic(vocab_size=8, num_examples=10, num_labels=3, seq_len=8, seed=0)


def test_synthetic_federated_packs_into_round_arrays():
    cfg = ConfigDict(
        dict(
            name="synthetic",
            vocab_size=64,
            num_examples=256,
            num_labels=2,
            seq_len=16,
            alpha=1.0,
            partition="dirichlet",
            test_fraction=0.2,
            max_examples=0,
        )
    )
    fd = make_federated_data(cfg, num_clients=8, tokenizer=None, seed=0)
    assert [fd.num_examples(c) for c in range(8)] == [25] * 8
    packed = pack_clients(
        fd.train[:3], batch_size=8, epochs=1, rng=np.random.default_rng(0), num_slots=4
    )
    assert set(packed) <= set(BATCH_KEYS) | {"step_mask"}
    assert packed["input_ids"].shape == (4, 4, 8, 16)
    assert packed["step_mask"].shape == (4, 4)


def test_sentence_pairs_reach_the_packed_client_arrays(minilm_tokenizer, tmp_cache, tmp_path):
    """A pair dataset (NLI-shaped local csv) yields token_type_ids in the round's arrays."""
    import pandas as pd

    n = 40
    premises = [f"premise number {i} is about a film" for i in range(n)]
    hypotheses = [f"hypothesis {i}" for i in range(n)]
    pd.DataFrame(
        {"premise": premises, "hypothesis": hypotheses, "label": [i % 3 for i in range(n)]}
    ).to_csv(tmp_path / "nli.csv", index=False)
    columns = {"text": "premise", "text_pair": "hypothesis", "label": "label"}
    cfg = ConfigDict(
        dict(name="csv", path=str(tmp_path / "nli.csv"), columns=columns, partition="iid")
    )
    cfg.max_length = 24
    fd = make_federated_data(cfg, num_clients=4, tokenizer=minilm_tokenizer, seed=0)
    packed = pack_clients(
        fd.train[:3], batch_size=4, epochs=1, rng=np.random.default_rng(0), num_slots=4
    )
    types = packed["token_type_ids"]
    assert types.shape == packed["input_ids"].shape == (4, 2, 4, 24)
    assert types.dtype == np.int32
    assert set(packed) <= set(BATCH_KEYS) | {"step_mask"}
    # Each real example carries the tokenizer's own segment ids for its (premise, hypothesis).
    tr = fd.client_examples[0][0]
    ref = minilm_tokenizer(
        [premises[i] for i in tr],
        [hypotheses[i] for i in tr],
        max_length=24,
        truncation=True,
        padding="max_length",
    )
    np.testing.assert_array_equal(fd.train[0]["token_type_ids"], ref["token_type_ids"])
    real = packed["example_mask"][0].astype(bool)
    rows = {tuple(r) for r in fd.train[0]["token_type_ids"]}
    assert all(tuple(r) in rows for r in types[0][real])
    assert (types[packed["attention_mask"] == 0] == 0).all() and (types == 1).any()
    # Single texts stay as they were: no segment ids.
    cfg.columns = {"text": "premise", "label": "label"}
    single = make_federated_data(cfg, num_clients=4, tokenizer=minilm_tokenizer, seed=0)
    assert "token_type_ids" not in single.train[0]
