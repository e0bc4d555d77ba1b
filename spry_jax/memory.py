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


GIB = 2**30


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> tuple[int | None, str]:
    """Host memory this process can still allocate: the smaller of the kernel's
    ``MemAvailable`` and the room left under the cgroup's limit (v2 ``memory.max`` -
    ``memory.current``, or v1 ``limit_in_bytes`` - ``usage_in_bytes``). (None, "") if neither
    can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
                    break
    except OSError:
        pass
    for limit, usage, name in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup memory.max"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "cgroup v1 limit",
        ),
    ):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2**60:  # v1 "no limit" is ~2**63
            found.append((max(lim - use, 0), name))
    if not found:
        return None, ""
    return min(found)


def available_bytes(device: Any = None) -> tuple[int | None, str]:
    """Memory a round on ``device`` (default: the first device) can still use, and its source:
    an accelerator's ``memory_stats()`` (``bytes_limit - bytes_in_use``), else the host's
    (:func:`host_available_bytes`)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            return free, f"{device.device_kind} memory_stats"
    return host_available_bytes()


def round_memory(
    step: dict[str, int | float], frozen_bytes: int, clients_at_once: int
) -> dict[str, int]:
    """The round's estimated peak beyond what is already resident: ``clients_at_once`` client
    steps (:func:`client_step_memory`), each without the frozen base, which they share and
    which is already in memory."""
    per_client = max(int(step["peak_bytes"]) - int(frozen_bytes), 0)
    return {"per_client_bytes": per_client, "round_bytes": per_client * clients_at_once}
