"""XLA's memory estimate of one client step (DESIGN.md, "Measuring memory").

peak = arguments + temporaries + outputs - aliased, from ``compile().memory_analysis()`` (the
CPU ``peak_memory_in_bytes`` leaves temporaries out). Lowered from shapes only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spry_jax.core.client import make_client_update
from spry_jax.types import Batch, PyTree, Trainable


def peak_bytes(compiled: Any) -> dict[str, int]:
    """Argument, temp, output, alias and peak bytes of a compiled executable."""
    ma = compiled.memory_analysis()
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
    )
    return out


def client_step_memory(
    spec: Any, params: Trainable, frozen: PyTree, batch: Batch
) -> dict[str, int]:
    """XLA memory estimate of one local step of the round's own client program
    (:func:`spry_jax.core.client.make_client_update` with one step) on ``batch`` (``[B, ...]``)."""
    update = make_client_update(
        spec.loss_fn,
        spec.estimator,
        spec.client_optimizer,
        report_variance=getattr(spec, "client_var_threshold", 0.0) > 0,
    )
    mask = {k: jnp.float32(1.0) for k in params}

    def one_step(p, fr, b, key):
        return update(p, fr, mask, b, jnp.ones((1,), jnp.float32), key)

    shape = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), t)  # noqa: E731
    steps = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *jnp.shape(x)), x.dtype), batch)
    compiled = (
        jax.jit(one_step)
        .lower(shape(params), shape(frozen), steps, jax.random.PRNGKey(0))
        .compile()
    )
    return peak_bytes(compiled)
