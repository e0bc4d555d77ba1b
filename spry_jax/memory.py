"""XLA's memory and FLOP estimates of one client step (peak = arguments + temp + outputs − aliased).

peak = arguments + temporaries + outputs - aliased, from ``compile().memory_analysis()`` (the
CPU ``peak_memory_in_bytes`` leaves temporaries out); FLOPs from ``compile().cost_analysis()``.
Lowered from shapes only. :func:`check_round_memory` compares a built experiment's round
estimate with the memory the process can use, before round 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from spry_jax.core.client import make_client_update
from spry_jax.core.round import CLIENT_AXIS
from spry_jax.errors import ConfigError
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


# --- The memory check of a built experiment (spry_jax.train.Experiment), before round 0. ---


def experiment_step_memory(exp: Any) -> dict[str, int | float]:
    """XLA memory estimate and FLOP count (``flops``) of one client step of this experiment
    (one batch); see :func:`client_step_memory`."""
    b = exp.config.client.batch_size
    first = exp.fed.train[0]
    batch = {k: jnp.asarray(np.resize(v, (b, *v.shape[1:]))) for k, v in first.items()}
    batch["example_mask"] = jnp.ones((b,), jnp.float32)
    return client_step_memory(exp.spec, exp.model.trainable, exp.model.frozen, batch)


def clients_at_once(exp: Any) -> int:
    """How many client steps the round holds in one memory at a time: every slot under
    ``vmap``; under ``shard_map`` the slots of one device on an accelerator, all of them on the
    CPU (whose devices share the host's memory); one for the ``loop``/``debug`` backends. With
    ``round.client_chunk = C`` a device holds C of its slots at a time (on the CPU: C per
    device, times the devices)."""
    spec = exp.spec
    if spec.backend in ("loop", "debug"):
        return 1
    devices = spec.mesh.shape[CLIENT_AXIS] if spec.backend == "shard_map" else 1
    per_device = spec.num_slots // devices
    if spec.client_chunk:
        per_device = min(per_device, spec.client_chunk)
    if spec.backend == "shard_map" and jax.devices()[0].platform != "cpu":
        return max(1, per_device)
    return per_device * devices


def check_round_memory(exp: Any, step: dict[str, int | float]) -> dict[str, int | float | str]:
    """Compares the round's estimated peak with the memory the process can use, before round 0.

    The estimate is XLA's for one client step of this experiment (``step``, from
    :func:`experiment_step_memory`), without the frozen base the clients share, times the clients
    held at once (:func:`clients_at_once`). XLA's figure for the batched program is not exactly
    that sum, so an estimate within 30 % of the limit only warns.

    Returns:
      The figures (``memory/round_estimate_bytes``, ``memory/available_bytes``, the source).

    Raises:
      ConfigError: the estimate exceeds the available memory (``memory.budget_gib`` if set);
        the message has the numbers and the knobs that lower them.
    """
    c = exp.config
    frozen_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(exp.model.frozen))
    at_once = clients_at_once(exp)
    est = round_memory(step, frozen_bytes, at_once)
    if c.memory.budget_gib > 0:
        available, source = int(c.memory.budget_gib * GIB), "memory.budget_gib"
    else:
        available, source = available_bytes()
    out = {
        "memory/round_estimate_bytes": est["round_bytes"],
        "memory/available_bytes": available,
        "memory/available_source": source,
    }
    if available is None:
        logging.warning("memory check: the available memory cannot be read; not checked.")
        return out
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    detail = (
        f"about {gib(est['round_bytes'])} for the round ({at_once} client(s) at once x "
        f"{gib(est['per_client_bytes'])}: XLA's peak of one client step, "
        f"{gib(int(step['peak_bytes']))}, less the shared frozen base, {gib(frozen_bytes)}), "
        f"against {gib(available)} available ({source})"
    )
    knobs = (
        f"lower client.batch_size ({c.client.batch_size}), data.max_length "
        f"({c.data.max_length}) or clients_per_round ({c.clients_per_round}), map "
        f"clients in chunks (round.client_chunk, now {c.round.client_chunk}), or run clients "
        "one at a time (round.backend=loop)"
    )
    if est["round_bytes"] > available:
        raise ConfigError(
            f"Not enough memory for this run: {detail}. To fit, {knobs}; to run anyway, "
            "--config.memory.check=False (or set --config.memory.budget_gib)."
        )
    if est["round_bytes"] > 0.7 * available:
        logging.warning(
            "memory check: %s; it may not fit (the estimate is approximate). If it is killed, %s.",
            detail,
            knobs,
        )
    return out
