"""Partitions of a pooled dataset over federated clients.

* :func:`dirichlet_partition` -- label-Dirichlet(alpha) with exactly equal client sizes, the
  split of the Spry release (github.com/Astuary/Spry; the data setup of Panchal et al.,
  NeurIPS 2024, arXiv 2405.15551), with its faults removed.
* :func:`natural_partition` -- one client per natural group (movie, article title), groups
  merged when there are fewer clients than groups.
* :func:`group_dirichlet_partition` -- the label-Dirichlet split with the natural group as the
  label (SQuAD v2 by article title, as in the Spry paper), every example assigned; works with more
  clients than groups (the paper's 500 clients over SQuAD v2's 477 titles).
* :func:`iid_partition` -- a uniform random split into equal sizes.
* :func:`train_test_split` -- each client's examples split into local train / test.

Everything is deterministic in ``seed``; nothing reads global random state.

flwr-datasets' ``DirichletPartitioner`` was considered: it allocates each class over clients
(with ``min_partition_size`` retries and optional self-balancing), which does not give equal
client sizes, so the release's per-client construction is implemented here instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spry_jax.data.errors import DataError


def _check_common(n: int, num_clients: int, what: str) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise DataError(f"num_clients must be an int, got {num_clients!r}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(
            f"more clients than examples: num_clients={num_clients} > {n} {what}; "
            "lower num_clients or use more data (data.max_examples=0 loads all)"
        )


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    num_labels: int | None = None,
) -> list[np.ndarray]:
    """Label-Dirichlet partition with equal client sizes (the Spry release's client split;
    Panchal et al., NeurIPS 2024, arXiv 2405.15551, experimental setup).

    Each client ``c`` draws label proportions ``p_c ~ Dirichlet(alpha * 1_K)``. Clients are then
    filled one example at a time, in rounds: each round visits every client once, in a fresh
    random order, and the client draws a label from ``p_c`` restricted to the labels that still
    have unassigned examples (renormalised), taking the next example of that label from a
    shuffled pool. If none of the client's own labels is left, it draws in proportion to what
    remains. So every client gets exactly ``floor(N / num_clients)`` examples and follows its
    Dirichlet mix as closely as the pool allows. The Spry release fills clients one after
    another (later clients absorb all the distortion), assumes balanced classes, and divides by
    zero when a client's labels run out; the rounds here share the distortion out evenly.

    The ``N mod num_clients`` examples left over at the end are assigned to no client.

    Args:
      labels: int labels, shape [N].
      num_clients: number of clients (1 <= num_clients <= N).
      alpha: Dirichlet concentration (> 0); small = each client sees few labels, large = IID.
      seed: the partition is a deterministic function of (labels, num_clients, alpha, seed).
      num_labels: if given, labels must lie in ``[0, num_labels)``.

    Returns:
      One int64 index array per client, each of length ``floor(N / num_clients)``, disjoint.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(
            f"labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}"
        )
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"data.alpha must be a positive finite number, got {alpha}")
    _check_common(len(labels), num_clients, "examples")
    if num_labels is not None:
        bad = (labels < 0) | (labels >= num_labels)
        if bad.any():
            raise DataError(
                f"label {int(labels[bad][0])} is outside the label set 0..{num_labels - 1}"
            )
    classes, y = np.unique(labels, return_inverse=True)
    k = len(classes)
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(k, alpha), size=num_clients)
    # Very small alpha can underflow a whole row; such a client is then effectively unlabeled.
    props = np.nan_to_num(props, nan=0.0)
    pools = [rng.permutation(np.flatnonzero(y == j)) for j in range(k)]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(k, dtype=np.int64)
    per_client = len(labels) // num_clients
    out = np.empty((num_clients, per_client), dtype=np.int64)

    def weights(rows: np.ndarray) -> np.ndarray:
        w = rows * (remaining > 0)
        empty = w.sum(-1) <= 0
        if np.any(empty):
            w = np.where(np.atleast_1d(empty)[..., None], remaining.astype(float), w)
        return w

    for r in range(per_client):
        order = rng.permutation(num_clients)
        u = rng.random(num_clients)
        w = weights(props[order])
        cum = np.cumsum(w, axis=1)
        draws = np.minimum((u[:, None] * cum[:, -1:] >= cum).sum(1), k - 1)
        demand = np.bincount(draws, minlength=k)
        if np.all(demand < remaining):
            # No label runs out within this round, so drawing all clients at once gives exactly
            # what the one-by-one loop below would.
            for j in np.flatnonzero(demand):
                who = order[draws == j]
                out[who, r] = pools[j][taken[j] : taken[j] + len(who)]
            taken += demand
            remaining -= demand
            continue
        for i, c in enumerate(order):
            wc = weights(props[c])
            cc = np.cumsum(wc)
            j = min(int((u[i] * cc[-1] >= cc).sum()), k - 1)
            while remaining[j] == 0:  # guard against float edge cases at the cumsum boundary
                j = (j + 1) % k
            out[c, r] = pools[j][taken[j]]
            taken[j] += 1
            remaining[j] -= 1
    return [row.copy() for row in out]


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A uniform random split into ``floor(N / num_clients)`` examples per client.

    The ``N mod num_clients`` leftover examples are assigned to no client.
    """
    _check_common(num_examples, num_clients, "examples")
    perm = np.random.default_rng(seed).permutation(num_examples)
    per_client = num_examples // num_clients
    return [
        perm[i * per_client : (i + 1) * per_client].astype(np.int64) for i in range(num_clients)
    ]


def natural_partition(
    groups: Sequence[str] | np.ndarray, num_clients: int, seed: int
) -> list[np.ndarray]:
    """One client per natural group (e.g. movie), merging groups when clients are fewer.

    With ``G`` groups and ``num_clients == G`` each client is one group (in a seeded random
    order). With fewer clients, groups are dealt largest first to the client holding the fewest
    examples so far, which keeps client sizes close. More clients than groups is an error.

    Returns:
      One sorted int64 index array per client, covering every example exactly once.
    """
    groups = np.asarray(groups, dtype=object)
    if groups.ndim != 1:
        raise DataError(f"groups must be 1-D, got shape {groups.shape}")
    names, inverse = np.unique(groups.astype(str), return_inverse=True)
    if num_clients > len(names):
        raise DataError(
            f"more clients than groups: num_clients={num_clients} > {len(names)} natural "
            "groups (data.partition='natural'); lower num_clients, or use "
            "data.partition='group_dirichlet' (groups as Dirichlet labels; a group may span "
            "clients)"
        )
    _check_common(len(names), num_clients, "natural groups (data.partition='natural')")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    shuffled = rng.permutation(len(names))
    # Stable sort by size keeps the seeded order among equal-sized groups.
    order = shuffled[np.argsort([-len(members[g]) for g in shuffled], kind="stable")]
    buckets: list[list[int]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for g in order:
        c = int(np.argmin(sizes))
        buckets[c].append(g)
        sizes[c] += len(members[g])
    return [np.sort(np.concatenate([members[g] for g in b])) for b in buckets]


def group_dirichlet_partition(
    groups: Sequence[str] | np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-Dirichlet partition with the natural group (article title) as the label.

    The Spry paper (Panchal et al., NeurIPS 2024, arXiv 2405.15551, experimental setup) splits
    SQuAD v2 "by article title instead of label": its data
    split is the label-Dirichlet with equal client sizes, so the title takes the label's place.
    That is :func:`dirichlet_partition` over the group ids: client ``c`` draws title
    proportions ``p_c ~ Dirichlet(alpha * 1_G)`` and is filled from them, so a client holds
    questions of a few titles (alpha = 0.1) or of many (alpha = 1), and one title's questions
    may span several clients. Unlike :func:`natural_partition` it does not need a title per
    client, so the paper's 500 clients build over SQuAD v2's 477 titles. Grouping whole titles
    into clients was the alternative; it cannot make 500 clients of 477 titles without cutting
    titles anyway, gives unequal sizes, and is not the paper's split.

    :func:`dirichlet_partition` leaves ``N mod num_clients`` examples unassigned; here each of
    them goes to a different client (a seeded random choice), so every example is in exactly
    one client.

    Args:
      groups: [N] group names (article titles).
      num_clients: number of clients (1 <= num_clients <= N; may exceed the number of groups).
      alpha: Dirichlet concentration over the groups (> 0).
      seed: the partition is a deterministic function of (groups, num_clients, alpha, seed).

    Returns:
      One sorted int64 index array per client, disjoint and covering every example: the first
      ``N mod num_clients`` in a seeded order hold ``floor(N / num_clients) + 1`` examples, the
      others ``floor(N / num_clients)``.
    """
    groups = np.asarray(groups, dtype=object)
    if groups.ndim != 1:
        raise DataError(f"groups must be 1-D, got shape {groups.shape}")
    _, labels = np.unique(groups.astype(str), return_inverse=True)
    parts = dirichlet_partition(labels, num_clients, alpha, seed)
    assigned = np.zeros(len(groups), dtype=bool)
    for p in parts:
        assigned[p] = True
    rest = np.flatnonzero(~assigned)
    # A separate stream, so the Dirichlet part is exactly dirichlet_partition(labels, ...).
    rng = np.random.default_rng([seed, 0x6209])
    takers = rng.permutation(num_clients)[: len(rest)]
    for c, i in zip(takers, rng.permutation(rest), strict=True):
        parts[c] = np.append(parts[c], i)
    return [np.sort(p).astype(np.int64) for p in parts]


def train_test_split(
    indices: np.ndarray, test_fraction: float, rng: np.random.Generator, *, client: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffles one client's indices and splits them into local train and test.

    As in the release, the train part is ``floor((1 - test_fraction) * n)`` examples.

    Raises:
      DataError: if the train part would be empty (an empty client).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    perm = rng.permutation(np.asarray(indices, dtype=np.int64))
    n_train = int(np.floor(len(perm) * (1.0 - test_fraction) + 1e-9))
    if n_train == 0:
        raise DataError(
            f"client {client} is empty after the train/test split ({len(perm)} example(s), "
            f"test_fraction={test_fraction}); use fewer clients or more data"
        )
    return perm[:n_train], perm[n_train:]


def label_entropy(labels: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Shannon entropy (nats) of each part's label distribution, shape [len(parts)]."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    out = []
    for idx in parts:
        p = np.bincount(labels[idx], minlength=k) / max(len(idx), 1)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


# The names ``data.partition`` accepts (:func:`partition`).
PARTITIONS = ("dirichlet", "group_dirichlet", "natural", "iid")


def partition(
    method: str,
    *,
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    alpha: float,
    seed: int,
) -> list[np.ndarray]:
    """Dispatches ``data.partition`` ("dirichlet" | "group_dirichlet" | "natural" | "iid")."""
    if method == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    if method == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if method in ("natural", "group_dirichlet"):
        if groups is None:
            raise DataError(
                f"data.partition={method!r} needs a dataset with a natural group column "
                "(rotten_tomatoes: movie; squad: title; local files: columns['group'])"
            )
        if method == "group_dirichlet":
            return group_dirichlet_partition(groups, num_clients, alpha, seed)
        return natural_partition(groups, num_clients, seed)
    raise DataError(f"data.partition={method!r} is unknown; choose one of {PARTITIONS}.")
