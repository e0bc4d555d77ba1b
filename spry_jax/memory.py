"""XLA's memory and FLOP estimates of one client step (peak = arguments + temp + outputs − aliased).

peak = arguments + temporaries + outputs - aliased, from ``compile().memory_analysis()`` (the
CPU ``peak_memory_in_bytes`` leaves temporaries out); FLOPs from ``compile().cost_analysis()``.
Lowered from shapes only.
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


def flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled executable (``cost_analysis()['flops']``)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def compile_client_step(spec: Any, params: Trainable, frozen: PyTree, batch: Batch) -> Any:
    """Compiles one local step of the round's own client program
    (:func:`spry_jax.core.client.make_client_update` with one step) on ``batch`` (``[B, ...]``),
    every unit trained (the mask is all ones)."""
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
    return (
        jax.jit(one_step)
        .lower(shape(params), shape(frozen), steps, jax.random.PRNGKey(0))
        .compile()
    )


def client_step_memory(
    spec: Any, params: Trainable, frozen: PyTree, batch: Batch
) -> dict[str, int | float]:
    """XLA memory estimate (:func:`peak_bytes`) of one local step of the round's client program
    on ``batch``, plus ``flops``: XLA's FLOP count of that step (:func:`flops`), from the same
    compilation, so a run's client compute is this times the local steps it took."""
    compiled = compile_client_step(spec, params, frozen, batch)
    return {**peak_bytes(compiled), "flops": flops(compiled)}
