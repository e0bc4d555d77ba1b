"""Per-unit aggregation of client updates (Spry, Panchal et al., NeurIPS 2024, arXiv 2405.15551; the release's per-unit server aggregation, github.com/Astuary/Spry ``trainers/server_spry.py``).

For every trainable leaf: the example-weighted mean of the updates over the clients whose mask
covers it; zero where no client trained it. Written as sums so that partial sums from device
shards can be ``psum``-ed before the division.
"""

from __future__ import annotations

import jax.numpy as jnp

from spry_jax.types import Array, Trainable


def weighted_sums(delta: Trainable, mask: Trainable, weight: Array) -> tuple[Trainable, Trainable]:
    """One client's contribution: ``(w * m * delta, w * m)`` per leaf (mask is a scalar)."""
    num = {k: weight * mask[k] * d for k, d in delta.items()}
    den = {k: weight * mask[k] for k in delta}
    return num, den


def finalize(num: Trainable, den: Trainable) -> Trainable:
    """``num / den`` where some client trained the leaf, else zero."""
    return {
        k: jnp.where(den[k] > 0, num[k] / jnp.where(den[k] > 0, den[k], 1.0), 0.0).astype(
            num[k].dtype
        )
        for k in num
    }
