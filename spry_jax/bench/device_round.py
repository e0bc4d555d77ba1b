"""One whole round on the device, clients in chunks: round time and *measured* peak memory.

The round of M clients per round (``round.client_chunk = C``: a ``lax.scan`` over chunks of C
vmapped clients, ``C = 0``: all M vmapped at once) of a registry model built from its shapes
with random weights (``model.pretrained=False``; no download), on synthetic token ids of the
model's vocabulary, ``--steps`` local steps of batch ``--batch`` x ``--seq`` per client. Each
(M, C, method) row runs in its own process, so the device's ``memory_stats()["peak_bytes_in_use"]``
is that round's peak (frozen base, server state, the round's batches and temporaries); on a
CPU the row reports the process's peak resident memory instead (host RSS, labelled). XLA's
estimate of the same compiled round (:func:`spry_jax.memory.peak_bytes`) is printed beside it.
Reported per row: compile + first round, the steady round time (median over ``--repeats``),
clients/s.

    python -m spry_jax.bench.device_round --model=roberta-large --clients=100 --chunks=0,10 \\
        --dtype=bfloat16 --out=device_round.json

Set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` on a GPU (``scripts/gpu_bench.sh`` does).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from spry_jax.bench import run_row  # noqa: E402
from spry_jax.bench.device_step import GiB, measured_cell, measured_memory  # noqa: E402


def round_config(
    model: str,
    clients: int,
    chunk: int,
    *,
    method: str = "spry",
    batch: int = 8,
    seq: int = 64,
    steps: int = 2,
    dtype: str = "bfloat16",
    overrides: dict[str, Any] | None = None,
):
    """The smoke experiment moved to ``model``'s shapes: M = ``clients`` clients, each with
    ``steps`` local steps of ``batch`` synthetic examples of ``seq`` tokens, all in the round."""
    from spry_jax import models
    from spry_jax.bench.throughput import smoke_config

    cfg = smoke_config()
    cfg.method = method
    cfg.model.name = model
    cfg.model.pretrained = False
    cfg.model.dtype = dtype
    if overrides:
        cfg.model.overrides = dict(overrides)
    cfg.data.vocab_size = int(models.load_config(model, overrides, prefer_registry=True).vocab_size)
    cfg.data.seq_len = cfg.data.max_length = seq
    cfg.data.partition = "iid"
    cfg.peft.lora_rank = 1  # the paper's adapters (the smoke config's rank is 2)
    # Enough examples that every client's train split (1 - data.test_fraction) fills its steps.
    per_client = int(-(-steps * batch // (1.0 - cfg.data.test_fraction))) + 1
    cfg.data.num_examples = per_client * clients
    cfg.num_clients = cfg.clients_per_round = clients
    cfg.client.batch_size = batch
    cfg.client.epochs = 1
    cfg.client.max_steps = steps
    cfg.round.backend = "vmap"
    cfg.round.client_chunk = chunk
    cfg.log_memory = False
    cfg.memory.check = False  # the row measures the peak itself
    return cfg


def measure_row(config, repeats: int) -> dict[str, Any]:
    """Compiles the experiment's round once, runs it ``1 + repeats`` times (in this process:
    run it in a fresh one for a clean peak)."""
    from spry_jax import memory as memory_lib
    from spry_jax import train

    exp = train.build_experiment(config)
    state = exp.init_state()
    frozen = exp.replicate(exp.model.frozen)
    batches = exp.round_batches(0, exp.sample_clients(0))
    t0 = time.perf_counter()
    compiled = exp.round_fn.lower(state, frozen, batches).compile()
    compile_s = time.perf_counter() - t0
    xla = memory_lib.peak_bytes(compiled)["peak_bytes"]
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batches)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batches)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    round_s = statistics.median(times)
    return {
        "model": config.model.name,
        "method": config.method,
        "M": int(config.clients_per_round),
        "C": int(config.round.client_chunk),
        "steps": int(exp.num_steps),
        "batch": int(config.client.batch_size),
        "seq": int(config.data.max_length),
        "dtype": config.model.dtype,
        "compile_s": compile_s,
        "first_round_s": first_s,
        "round_s": round_s,
        "times_s": times,
        "clients_per_s": config.clients_per_round / round_s,
        "train_loss": float(metrics["train/loss"]),
        "xla_peak_bytes": int(xla),
        **measured_memory(),
    }


def row_in_fresh_process(kwargs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """:func:`measure_row` of ``round_config(**kwargs)`` in a fresh interpreter."""
    code = (
        "import json; from spry_jax.bench import device_round as d; "
        f"r = d.measure_row(d.round_config(**json.loads({json.dumps(kwargs)!r})), {repeats}); "
        "print('ROW ' + json.dumps(r))"
    )
    what = (
        f"round row {kwargs['model']} {kwargs['method']} M={kwargs['clients']} C={kwargs['chunk']}"
    )
    return run_row(code, dict(os.environ), what)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | M | C | compute | round s | clients/s | measured peak GiB "
        "| XLA estimate GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['M']} | {r['C'] or 'all'} | {r['dtype']} "
            f"| {r['round_s']:.3f} | {r['clients_per_s']:.1f} | {measured_cell(r)} "
            f"| {r['xla_peak_bytes'] / GiB:.2f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="roberta-large")
    p.add_argument("--methods", default="spry")
    p.add_argument("--clients", type=int, default=100, help="clients per round M")
    p.add_argument("--chunks", default="0,10", help="round.client_chunk values (0 = all at once)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="local steps per client")
    p.add_argument("--dtype", default="bfloat16", help="model.dtype: float32|bfloat16|float16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overrides", default="{}", help="HF-config overrides as JSON (tests)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    rows = []
    for method in [m for m in a.methods.split(",") if m]:
        for chunk in [int(c) for c in a.chunks.split(",") if c]:
            kwargs = dict(
                model=a.model,
                clients=a.clients,
                chunk=chunk,
                method=method,
                batch=a.batch,
                seq=a.seq,
                steps=a.steps,
                dtype=a.dtype,
                overrides=json.loads(a.overrides) or None,
            )
            rows.append(row_in_fresh_process(kwargs, a.repeats))
    print(table(rows))
    print(f"(jax {jax.__version__}; load average {os.getloadavg()[0]:.1f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
