"""Packing the sampled clients of a round into fixed-shape arrays for the round program.

Every per-example leaf ``[n_i, ...]`` of client ``i`` becomes ``[M, S, B, ...]`` (slots, local
steps, batch), with ``example_mask`` [M, S, B] (1 = real example) and ``step_mask`` [M, S]
(1 = a real local step); see :mod:`spry_jax.types`. Leaves are packed by name, whatever they
are, so optional ones (``token_type_ids`` of text pairs) travel with the rest. Padding
positions hold a copy of a real example (so every computation on them stays finite -- an
all-zero attention mask can turn a softmax into NaN, and NaN * 0 is still NaN) and are switched
off by the masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from spry_jax.data.errors import DataError


def _check(client_arrays: Sequence[dict[str, np.ndarray]], batch_size: int) -> list[int]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise DataError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if len(client_arrays) == 0:
        raise DataError("no clients to pack")
    keys = sorted(client_arrays[0])
    if not keys:
        raise DataError("client 0 has no arrays")
    sizes = []
    for i, arrays in enumerate(client_arrays):
        if sorted(arrays) != keys:
            raise DataError(f"client {i} has keys {sorted(arrays)}, client 0 has {keys}")
        lens = {k: len(v) for k, v in arrays.items()}
        if len(set(lens.values())) != 1:
            raise DataError(f"client {i}: arrays disagree on the number of examples: {lens}")
        for k, v in arrays.items():
            ref = client_arrays[0][k]
            if v.shape[1:] != ref.shape[1:] or v.dtype != ref.dtype:
                raise DataError(
                    f"client {i}: {k} has shape {v.shape[1:]} {v.dtype} per example, "
                    f"client 0 has {ref.shape[1:]} {ref.dtype}"
                )
        sizes.append(next(iter(lens.values())))
    return sizes


def _gather(
    client_arrays: Sequence[dict[str, np.ndarray]],
    index: list[np.ndarray],
    num_slots: int,
) -> dict[str, np.ndarray]:
    """Builds the packed arrays from per-client index grids ([S, B], -1 = padding)."""
    steps, batch = index[0].shape
    donor = next((i for i, a in enumerate(client_arrays) if len(next(iter(a.values())))), None)
    if donor is None:
        raise DataError("every client is empty; nothing to pack")
    out: dict[str, np.ndarray] = {}
    for key, ref in client_arrays[donor].items():
        out[key] = np.empty((num_slots, steps, batch, *ref.shape[1:]), dtype=ref.dtype)
    example_mask = np.zeros((num_slots, steps, batch), dtype=np.float32)
    for m in range(num_slots):
        idx = index[m] if m < len(index) else np.full((steps, batch), -1)
        real = idx >= 0
        example_mask[m] = real
        n = len(next(iter(client_arrays[m].values()))) if m < len(client_arrays) else 0
        for key in out:
            if n:
                src = client_arrays[m][key]
                # Padding copies the client's first example; masks turn it off.
                out[key][m] = src[np.where(real, idx, 0)]
            else:
                out[key][m] = client_arrays[donor][key][0]
    out["example_mask"] = example_mask
    out["step_mask"] = example_mask.max(axis=2)
    return out


def pack_clients(
    client_arrays: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    epochs: int,
    rng: np.random.Generator,
    num_slots: int | None = None,
    max_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Packs clients' local training data for one round.

    Each client's examples are shuffled afresh every epoch with ``rng`` (the Spry release never
    shuffled); the last batch of an epoch is partial (masked), so every example is seen exactly
    once per epoch. Client ``i`` takes ``epochs * ceil(n_i / batch_size)`` steps; shorter
    clients' extra steps are masked.

    Args:
      client_arrays: per client, a dict of per-example arrays with equal leading length.
      batch_size: B.
      epochs: local epochs E (>= 1).
      rng: numpy Generator for the shuffles.
      num_slots: M >= len(client_arrays); slots past the clients are empty (all masked).
      max_steps: if given, S = max_steps: clients with more steps are cut after ``max_steps``
        (their later batches are dropped for this round), fewer are padded.

    Returns:
      Each leaf as ``[M, S, B, ...]``, plus ``example_mask`` float32 [M, S, B] and
      ``step_mask`` float32 [M, S].
    """
    sizes = _check(client_arrays, batch_size)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise DataError(f"epochs must be an int >= 1, got {epochs!r}")
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise DataError(
            f"client(s) {empty} have no training examples; drop them from the round or use "
            "num_slots for padding slots"
        )
    num_slots = len(client_arrays) if num_slots is None else num_slots
    if num_slots < len(client_arrays):
        raise DataError(f"num_slots={num_slots} < number of clients {len(client_arrays)}")
    own_steps = [epochs * math.ceil(n / batch_size) for n in sizes]
    steps = max(own_steps) if max_steps is None else int(max_steps)
    if steps < 1:
        raise DataError(f"max_steps must be >= 1, got {max_steps}")
    index = []
    for n in sizes:
        per_epoch = math.ceil(n / batch_size)
        grid = np.full((epochs * per_epoch, batch_size), -1, dtype=np.int64)
        for e in range(epochs):
            order = np.full(per_epoch * batch_size, -1, dtype=np.int64)
            order[:n] = rng.permutation(n)
            grid[e * per_epoch : (e + 1) * per_epoch] = order.reshape(per_epoch, batch_size)
        full = np.full((steps, batch_size), -1, dtype=np.int64)
        k = min(steps, len(grid))
        full[:k] = grid[:k]
        index.append(full)
    return _gather(client_arrays, index, num_slots)


def pack_eval(
    client_arrays: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    num_slots: int | None = None,
) -> dict[str, np.ndarray]:
    """Packs clients' data for evaluation: one pass, in order, no shuffle; same layout as
    :func:`pack_clients`. Empty clients are allowed (all masked)."""
    sizes = _check(client_arrays, batch_size)
    num_slots = len(client_arrays) if num_slots is None else num_slots
    if num_slots < len(client_arrays):
        raise DataError(f"num_slots={num_slots} < number of clients {len(client_arrays)}")
    steps = max(1, max(math.ceil(n / batch_size) for n in sizes))
    index = []
    for n in sizes:
        flat = np.full(steps * batch_size, -1, dtype=np.int64)
        flat[:n] = np.arange(n)
        index.append(flat.reshape(steps, batch_size))
    return _gather(client_arrays, index, num_slots)
