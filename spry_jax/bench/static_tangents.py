"""Tangents only where they are needed: a Spry client's step with the jvp restricted to its own
layers (``round.static_tangents``) against the runtime-mask step, slot by slot.

With the release's dealing (M <= G: unit g to slot g mod M; M > G: slot m trains unit m mod G)
each slot's units are fixed for a run and only the clients are shuffled over the slots
(:func:`spry_jax.core.units.slot_table`). The runtime-mask step runs the tangent pass through
every layer; the static step switches to the leaf set starting at the slot's lowest layer, so the
layers below carry no tangent. For each of the M slots this prints the slot's lowest layer, the
FLOPs of its estimate (XLA's cost analysis of the branch it takes) against the full jvp's, and
the median time of the jitted client update (one local step: estimate + AdamW, the program a
round runs once per client when clients run one at a time) of both builds, interleaved so that
load drifts hit both alike. The mean over the slots is a round's client cost ratio.

    python -m spry_jax.bench.static_tangents --model=minilm --clients=10 --iters=10
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DROPOUT = 0.1


def branch_flops(estimate, f, params, mask, key) -> list[float]:
    """XLA's FLOP count of each branch of ``estimate``'s switch (from its jaxpr)."""
    jaxpr = jax.make_jaxpr(lambda p, m, k: estimate(f, p, m, k))(params, mask, key)
    (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    flops = []
    for branch in cond.params["branches"]:
        args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in branch.jaxpr.invars]
        fn = jax.jit(jax.extend.core.jaxpr_as_fun(branch))
        flops.append(fn.lower(*args).compile().cost_analysis()["flops"])
    return flops


def measure(name: str, clients: int, batch: int, seq: int, warmup: int, iters: int) -> dict:
    from spry_jax import models, tasks
    from spry_jax.bench import memory as bench_memory
    from spry_jax.bench.random_bits import _batches, _model, interleaved_times
    from spry_jax.core import client as client_lib
    from spry_jax.core import estimators as E
    from spry_jax.core import units as units_lib

    model = _model(name, "spry", DROPOUT)
    units = units_lib.make_units(model.order, 2, model.head_keys, peft_method="lora")
    sets = units_lib.tangent_sets(units, clients, E.layer_index)
    branches = E.switch_sets(sets, model.trainable)
    batches = _batches(models.load_config(name, prefer_registry=True).vocab_size, batch, seq)
    args = bench_memory.real_step_arguments(model, batches)
    loss_fn = tasks.make_loss_fn(model, "hash")
    optimizer = client_lib.make_client_optimizer("adamw", 1e-3)
    plain_est, static_est = E.forward(1), E.forward(1, tangent_sets=sets)
    steps = {
        tag: jax.jit(client_lib.make_client_update(loss_fn, est, optimizer)).lower(*args).compile()
        for tag, est in (("runtime mask", plain_est), ("static", static_est))
    }
    one = jax.tree.map(lambda x: x[0], batches)
    f = lambda p: loss_fn(p, model.frozen, one, jax.random.PRNGKey(0))  # noqa: E731
    flops = branch_flops(static_est, f, model.trainable, args[2], jax.random.PRNGKey(1))
    table = units_lib.slot_table(clients, units.num_units)
    rows = []
    for slot, row in enumerate(table):
        keys = {k for g in np.flatnonzero(row) for k in units.unit_members(int(g))}
        mask = {k: jnp.float32(k in keys or units.unit_of_key[k] < 0) for k in model.trainable}
        slot_args = (*args[:2], mask, *args[3:])
        times = interleaved_times(
            {tag: (fn, slot_args) for tag, fn in steps.items()}, warmup, iters
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        b = int(E.covering_branch(branches, mask))
        layers = [E.layer_index(k) for k in keys if E.layer_index(k) is not None]
        rows.append(
            {
                "slot": slot,
                "lowest_layer": min(layers) if layers else None,
                "units": int(row.sum()),
                "flops_ratio": flops[b] / flops[-1],
                "median_s": med,
                "time_ratio": med["static"] / med["runtime mask"],
            }
        )
    return {
        "model": name,
        "clients": clients,
        "units": units.num_units,
        "branches": len(branches),
        "full_estimate_flops": flops[-1],
        "slots": rows,
        "mean_flops_ratio": float(np.mean([r["flops_ratio"] for r in rows])),
        "mean_time_ratio": float(np.mean([r["time_ratio"] for r in rows])),
    }


def table(r: dict) -> str:
    lines = [
        f"{r['model']}: M = {r['clients']} slots, G = {r['units']} units, "
        f"{r['branches']} branches; full estimate {r['full_estimate_flops'] / 1e9:.2f} GFLOP",
        "| slot | units | lowest layer | estimate FLOPs static / full | runtime-mask step ms "
        "| static step ms | static / runtime mask |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["slots"]:
        m = s["median_s"]
        lines.append(
            f"| {s['slot']} | {s['units']} | {s['lowest_layer']} | {s['flops_ratio']:.2f} "
            f"| {m['runtime mask'] * 1e3:.0f} | {m['static'] * 1e3:.0f} | {s['time_ratio']:.2f}x |"
        )
    lines.append(f"| mean | | | {r['mean_flops_ratio']:.2f} | | | {r['mean_time_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    r = measure(a.model, a.clients, a.batch, a.seq, a.warmup, a.iters)
    print(table(r))
    print(f"(load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; {jax.device_count()} device(s))")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
