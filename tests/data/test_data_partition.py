"""Partitions: coverage, equal sizes, determinism, heterogeneity, errors."""

from __future__ import annotations

import numpy as np
import pytest

from spry_jax.data import (
    DataError,
    dirichlet_partition,
    group_dirichlet_partition,
    iid_partition,
    label_entropy,
    natural_partition,
    train_test_split,
)


def _balanced(n_per_class: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), n_per_class))


def test_dirichlet_covers_every_example_once_with_equal_sizes():
    labels = _balanced(250, 4)  # N = 1000, divisible by 40
    parts = dirichlet_partition(labels, 40, 0.5, seed=3)
    assert len(parts) == 40
    assert {len(p) for p in parts} == {25}
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(1000))


def test_dirichlet_remainder_is_left_out_and_sizes_stay_equal():
    labels = _balanced(251, 4)[:1003]
    parts = dirichlet_partition(labels, 10, 0.3, seed=0)
    assert {len(p) for p in parts} == {1003 // 10}
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == 1000
    assert flat.min() >= 0 and flat.max() < 1003


def test_dirichlet_is_deterministic_in_the_seed():
    labels = _balanced(100, 3)
    a = dirichlet_partition(labels, 12, 0.1, seed=7)
    b = dirichlet_partition(labels, 12, 0.1, seed=7)
    c = dirichlet_partition(labels, 12, 0.1, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_label_entropy_grows_with_alpha():
    labels = _balanced(500, 4)  # 2000 examples, 50 clients of 40
    ent = {
        alpha: label_entropy(labels, dirichlet_partition(labels, 50, alpha, seed=1)).mean()
        for alpha in (0.1, 1.0, 100.0)
    }
    assert ent[0.1] < ent[1.0] < ent[100.0]
    # alpha=100 is nearly IID (max entropy log 4 = 1.386); alpha=0.1 mostly one or two labels.
    assert ent[100.0] > 1.3
    assert ent[0.1] < 0.8


def test_dirichlet_handles_imbalanced_and_exhausted_labels():
    # The release assumes balanced classes and divides by zero when a client's labels run out.
    labels = np.r_[np.zeros(900, int), np.ones(90, int), np.full(10, 2)]
    parts = dirichlet_partition(labels, 25, 0.05, seed=2)
    assert {len(p) for p in parts} == {40}
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(1000))


def test_dirichlet_uses_only_present_labels_and_checks_label_set():
    labels = np.array([0, 0, 5, 5, 5, 0, 5, 0])  # labels need not be contiguous
    parts = dirichlet_partition(labels, 4, 1.0, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8))
    with pytest.raises(DataError, match="label 5 is outside the label set 0..1"):
        dirichlet_partition(labels, 4, 1.0, seed=0, num_labels=2)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha):
    with pytest.raises(DataError, match="data.alpha must be a positive finite number"):
        dirichlet_partition(np.zeros(10, int), 2, alpha, seed=0)


def test_more_clients_than_examples_is_an_error():
    with pytest.raises(DataError, match="more clients than examples: num_clients=11 > 10"):
        dirichlet_partition(np.zeros(10, int), 11, 1.0, seed=0)
    with pytest.raises(DataError, match="more clients than examples"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(DataError, match="num_clients must be >= 1"):
        dirichlet_partition(np.zeros(10, int), 0, 1.0, seed=0)


def test_dirichlet_rejects_non_integer_labels():
    with pytest.raises(DataError, match="1-D integer array"):
        dirichlet_partition(np.array([0.5, 1.0]), 1, 1.0, seed=0)


def test_iid_partition():
    parts = iid_partition(103, 10, seed=4)
    assert {len(p) for p in parts} == {10}
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 100
    again = iid_partition(103, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_natural_partition_one_group_per_client():
    groups = np.array(["a", "b", "a", "c", "b", "a", "c", "d"])
    parts = natural_partition(groups, 4, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8))
    for p in parts:
        assert len(set(groups[p])) == 1
    assert sorted(len(p) for p in parts) == [1, 2, 2, 3]


def test_natural_partition_merges_groups_when_clients_are_fewer():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 36, size=60)
    groups = np.repeat([f"movie{i}" for i in range(60)], sizes)
    parts = natural_partition(groups, 7, seed=1)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(groups)))
    owners = {}
    for c, p in enumerate(parts):
        for g in set(groups[p]):
            assert owners.setdefault(g, c) == c, "a group must not be split across clients"
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= sizes.max()


def test_natural_partition_more_clients_than_groups():
    with pytest.raises(DataError, match="num_clients=3 > 2 natural groups"):
        natural_partition(np.array(["x", "y", "x"]), 3, seed=0)


def _titles(num_titles: int = 477, seed: int = 0) -> np.ndarray:
    """SQuAD-shaped groups: ``num_titles`` article titles of 2-14 questions each, shuffled."""
    sizes = np.random.default_rng(seed).integers(2, 15, size=num_titles)
    titles = np.repeat([f"Article_{i:03d}" for i in range(num_titles)], sizes)
    return np.random.default_rng(seed + 1).permutation(titles)


def test_group_dirichlet_builds_500_clients_over_477_titles():
    titles = _titles()
    n = len(titles)
    with pytest.raises(DataError, match="group_dirichlet"):
        natural_partition(titles, 500, seed=0)
    parts = group_dirichlet_partition(titles, 500, alpha=1.0, seed=0)
    assert len(parts) == 500
    # Every question in exactly one client.
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    # Sizes as documented: floor(N / 500), one more for N mod 500 clients.
    sizes = np.array([len(p) for p in parts])
    assert np.bincount(sizes - n // 500).tolist() == [500 - n % 500, n % 500]
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    # Titles span clients (500 > 477), and with alpha = 0.1 clients hold fewer titles.
    spread = np.mean([len(set(titles[p])) for p in parts])
    few = group_dirichlet_partition(titles, 500, alpha=0.1, seed=0)
    assert np.mean([len(set(titles[p])) for p in few]) < spread


def test_group_dirichlet_is_deterministic_in_the_seed():
    titles = _titles(seed=3)
    a = group_dirichlet_partition(titles, 500, alpha=1.0, seed=7)
    b = group_dirichlet_partition(titles, 500, alpha=1.0, seed=7)
    c = group_dirichlet_partition(titles, 500, alpha=1.0, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_group_dirichlet_is_the_label_dirichlet_over_titles_plus_the_remainder():
    """The Dirichlet part is dirichlet_partition with title ids as labels; the N mod C
    leftovers it leaves out are the only additions, one per client."""
    titles = _titles(num_titles=40, seed=5)
    _, ids = np.unique(titles, return_inverse=True)
    base = dirichlet_partition(ids, 30, 0.5, seed=2)
    full = group_dirichlet_partition(titles, 30, 0.5, seed=2)
    extra = [np.setdiff1d(f, b) for f, b in zip(full, base, strict=True)]
    assert all(np.isin(b, f).all() for f, b in zip(full, base, strict=True))
    assert sum(len(e) for e in extra) == len(titles) % 30
    assert max(len(e) for e in extra) == 1


def test_train_test_split_is_80_20_floor_and_disjoint():
    rng = np.random.default_rng(0)
    tr, te = train_test_split(np.arange(100, 113), 0.2, rng)
    assert len(tr) == 10 and len(te) == 3  # floor(0.8 * 13) = 10, as in the release
    assert np.array_equal(np.sort(np.r_[tr, te]), np.arange(100, 113))


def test_train_test_split_empty_client():
    with pytest.raises(DataError, match="client 4 is empty"):
        train_test_split(np.array([7]), 0.2, np.random.default_rng(0), client=4)
    with pytest.raises(DataError, match="test_fraction must be in"):
        train_test_split(np.arange(5), 1.0, np.random.default_rng(0))
