"""Packing clients into [clients, steps, batch, ...] round arrays."""

from __future__ import annotations

import numpy as np
import pytest

from spry_jax.data import DataError, pack_clients, pack_eval


def _client(n: int, offset: int, seq: int = 3) -> dict[str, np.ndarray]:
    ids = np.arange(offset, offset + n, dtype=np.int32)
    return {
        "input_ids": np.repeat(ids[:, None], seq, axis=1),
        "attention_mask": np.ones((n, seq), dtype=np.int32),
        "labels": ids % 2,
        "uid": ids,  # a per-example id to track where every example went
    }


def test_shapes_and_masks():
    clients = [_client(5, 0), _client(17, 100), _client(8, 200)]
    out = pack_clients(clients, batch_size=4, epochs=2, rng=np.random.default_rng(0), num_slots=5)
    s = 2 * 5  # max over clients of epochs * ceil(n / B) = 2 * ceil(17 / 4)
    assert out["input_ids"].shape == (5, s, 4, 3)
    assert out["attention_mask"].shape == (5, s, 4, 3)
    assert out["labels"].shape == (5, s, 4)
    assert out["example_mask"].shape == (5, s, 4) and out["example_mask"].dtype == np.float32
    assert out["step_mask"].shape == (5, s) and out["step_mask"].dtype == np.float32
    assert out["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["step_mask"].sum(1), [4, 10, 4, 0, 0])
    np.testing.assert_array_equal(out["example_mask"].sum((1, 2)), [10, 34, 16, 0, 0])
    # Steps past a client's own count carry no real example.
    assert out["example_mask"][0, 4:].sum() == 0
    # The last batch of each epoch is partial: client 0 has 5 examples -> batches of 4 and 1.
    np.testing.assert_array_equal(out["example_mask"][0, :4].sum(1), [4, 1, 4, 1])


def test_every_example_exactly_once_per_epoch_and_reshuffled():
    n, b, epochs = 13, 4, 3
    out = pack_clients(
        [_client(n, 0), _client(2, 50)], batch_size=b, epochs=epochs, rng=np.random.default_rng(1)
    )
    per_epoch = -(-n // b)
    orders = []
    for e in range(epochs):
        uid = out["uid"][0, e * per_epoch : (e + 1) * per_epoch].reshape(-1)
        mask = out["example_mask"][0, e * per_epoch : (e + 1) * per_epoch].reshape(-1) > 0
        assert sorted(uid[mask].tolist()) == list(range(n)), "dropped or repeated example"
        orders.append(uid[mask].tolist())
    assert len({tuple(o) for o in orders}) == epochs, "each epoch must be shuffled afresh"
    assert orders[0] != list(range(n))


def test_padding_holds_real_finite_examples_and_leaves_are_consistent():
    out = pack_clients(
        [_client(3, 10), _client(6, 20)],
        batch_size=4,
        epochs=1,
        rng=np.random.default_rng(0),
        num_slots=3,
    )
    # input_ids rows and uid always agree, including padding copies and empty slots.
    np.testing.assert_array_equal(out["input_ids"][..., 0], out["uid"])
    assert out["attention_mask"].min() == 1, "padding must not be an all-masked sequence"
    real_uids = set(range(10, 13)) | set(range(20, 26))
    assert set(out["uid"].reshape(-1).tolist()) <= real_uids


def test_same_rng_same_packing():
    clients = [_client(9, 0), _client(4, 30)]
    a = pack_clients(clients, batch_size=2, epochs=2, rng=np.random.default_rng(5))
    b = pack_clients(clients, batch_size=2, epochs=2, rng=np.random.default_rng(5))
    c = pack_clients(clients, batch_size=2, epochs=2, rng=np.random.default_rng(6))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["uid"], c["uid"])


def test_max_steps_cuts_and_pads():
    out = pack_clients(
        [_client(10, 0), _client(2, 40)],
        batch_size=4,
        epochs=1,
        rng=np.random.default_rng(0),
        max_steps=2,
    )
    assert out["labels"].shape == (2, 2, 4)
    np.testing.assert_array_equal(out["step_mask"], [[1, 1], [1, 0]])
    np.testing.assert_array_equal(out["example_mask"].sum((1, 2)), [8, 2])


def test_pack_eval_is_one_ordered_pass():
    out = pack_eval([_client(5, 0), _client(0, 0), _client(2, 7)], batch_size=2, num_slots=4)
    assert out["uid"].shape == (4, 3, 2)
    mask = out["example_mask"] > 0
    assert out["uid"][0][mask[0]].tolist() == [0, 1, 2, 3, 4]
    assert mask[1].sum() == 0 and mask[3].sum() == 0
    assert out["uid"][2][mask[2]].tolist() == [7, 8]
    np.testing.assert_array_equal(out["step_mask"], [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])


def test_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"client\(s\) \[1\] have no training examples"):
        pack_clients([_client(3, 0), _client(0, 0)], batch_size=2, epochs=1, rng=rng)
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        pack_clients([_client(3, 0)], batch_size=0, epochs=1, rng=rng)
    with pytest.raises(DataError, match="epochs must be an int >= 1"):
        pack_clients([_client(3, 0)], batch_size=2, epochs=0, rng=rng)
    with pytest.raises(DataError, match="num_slots=1 < number of clients 2"):
        pack_clients([_client(3, 0), _client(3, 0)], batch_size=2, epochs=1, rng=rng, num_slots=1)
    bad = _client(3, 0)
    del bad["uid"]
    with pytest.raises(DataError, match="client 1 has keys"):
        pack_clients([_client(3, 0), bad], batch_size=2, epochs=1, rng=rng)
    ragged = _client(3, 0)
    ragged["labels"] = ragged["labels"][:2]
    with pytest.raises(DataError, match="disagree on the number of examples"):
        pack_clients([ragged], batch_size=2, epochs=1, rng=rng)
    with pytest.raises(DataError, match="every client is empty"):
        pack_eval([_client(0, 0)], batch_size=2)
