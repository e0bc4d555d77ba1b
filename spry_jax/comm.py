"""Communication accounting: the bytes one round sends, from the round's metrics.

Kept out of :mod:`spry_jax.core` (the round program computes, this module counts): the round
reports per leaf how many clients trained it (``trainers``), its real clients and steps, and
in per-iteration mode the sum over steps of the squared active-client count (``active_sq``);
the byte counts follow from those and the trainable weights' shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spry_jax.types import Trainable


def round_bytes(
    comm_mode: str, params: Trainable, metrics: dict[str, Any], num_tangents: int = 0
) -> tuple[int, int]:
    """Bytes sent up (clients -> server) and down in one round.

    per_epoch: up = the trained units of each client + its example count (4 bytes); down = the
    full trainable weights to each client. per_iteration: up = K float32 jvp scalars per client
    per real step; down = the trainable weights once per client, then every step the step's jvp
    scalars of all active clients to each active client (from which a client replays the
    server's deterministic update with the shared tangent seeds).
    """
    nbytes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in params.items()}
    total = sum(nbytes.values())
    clients = int(round(float(metrics["train/clients"])))
    down = clients * total
    if comm_mode == "per_epoch":
        up = sum(int(round(float(metrics["trainers"][k]))) * nbytes[k] for k in nbytes)
        up += 4 * clients
    elif comm_mode == "per_iteration":
        steps = int(round(float(metrics["train/steps"])))
        up = 4 * num_tangents * steps
        down += 4 * num_tangents * int(round(float(metrics["active_sq"])))
    else:
        raise ValueError(f"comm_mode={comm_mode!r}; choose per_epoch or per_iteration.")
    return up, down
