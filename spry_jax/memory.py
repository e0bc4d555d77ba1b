"""XLA's memory estimate of one client step (DESIGN.md, "Measuring memory").

peak = arguments + temporaries + outputs - aliased, from ``compile().memory_analysis()`` (the
CPU ``peak_memory_in_bytes`` leaves temporaries out). Lowered from shapes only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


def make_client_step(spec: Any):
    """One local step of a client: estimator + optimizer update, as in the round's scan body."""

    def step(params: Trainable, opt_state: Any, frozen: PyTree, batch: Batch, key: jax.Array):
        drop_key, est_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        mask = {k: jnp.float32(1.0) for k in params}
        est = spec.estimator(
            lambda w: spec.loss_fn(w, frozen, batch, drop_key), params, mask, est_key
        )
        updates, opt_state = spec.client_optimizer.update(est.grad, opt_state, params)
        params = {k: params[k] + updates[k] for k in params}
        return params, opt_state, est.loss

    return step


def client_step_memory(
    spec: Any, params: Trainable, frozen: PyTree, batch: Batch
) -> dict[str, int]:
    """XLA memory estimate of one client step on ``batch`` (``[B, ...]`` leaves)."""
    shape = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), t)  # noqa: E731
    opt_state = jax.eval_shape(spec.client_optimizer.init, shape(params))
    compiled = (
        jax.jit(make_client_step(spec), donate_argnums=(0, 1))
        .lower(shape(params), opt_state, shape(frozen), shape(batch), jax.random.PRNGKey(0))
        .compile()
    )
    return peak_bytes(compiled)
