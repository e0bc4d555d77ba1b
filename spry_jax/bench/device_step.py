"""One client step on the device: time and *measured* peak memory, each row in a fresh process.

The memory table (:mod:`spry_jax.bench.memory`) reports XLA's estimate from shapes alone. This
benchmark runs the step: the model of a registry name is built from shapes, its weights are
drawn on the device at random (no download, no host copy of a 7B model: floating leaves
``N(0, 0.02^2)`` in their dtype, integer leaves -- quantised codes -- uniform bits of their
width), and the jitted client update of one local step (the program a round runs per
client: the method's estimator and client optimizer, :func:`spry_jax.bench.memory.client_step_fn`)
is timed (median after warm-ups). Each (model, method) row runs in its own process, so the
device's ``memory_stats()["peak_bytes_in_use"]`` is that row's peak (weights, optimizer state,
batch and the step's temporaries); on a CPU, which has no such counter, the row reports the
process's peak resident memory instead (``ru_maxrss``, host RSS, labelled as such). XLA's
estimate of the same compiled step is printed beside it.

    python -m spry_jax.bench.device_step --models=roberta-large,llama2-7b \\
        --methods=spry,fedavg,fedavg_remat --dtype=bfloat16 --out=device_step.json

Set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` on a GPU (``scripts/gpu_bench.sh`` does), or the
peak is the preallocated pool rather than what the step used.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = 2**30


def random_like(tree: Any, key: jax.Array) -> Any:
    """Device arrays of ``tree``'s shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), drawn at
    random in one jitted program: floating leaves ``N(0, 0.02^2)``, integer leaves (quantised
    codes) uniform bits of their width, booleans False."""
    leaves, treedef = jax.tree.flatten(tree)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}

    def draw():
        out = []
        for i, leaf in enumerate(leaves):
            k = jax.random.fold_in(key, i)
            dtype = jnp.dtype(leaf.dtype)
            if jnp.issubdtype(dtype, jnp.floating):
                out.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype))
            elif jnp.issubdtype(dtype, jnp.integer):
                bits = jax.random.bits(k, leaf.shape, unsigned[dtype.itemsize])
                out.append(jax.lax.bitcast_convert_type(bits, dtype))
            else:
                out.append(jnp.zeros(leaf.shape, dtype))
        return out

    return jax.tree.unflatten(treedef, jax.jit(draw)())


def concrete_batch(shapes: dict[str, jax.ShapeDtypeStruct], vocab: int) -> dict[str, jax.Array]:
    """A real batch of the step's shapes: random token ids, every position and example real."""
    rng = np.random.default_rng(0)
    out = {}
    for k, s in shapes.items():
        if k == "input_ids":
            out[k] = jnp.asarray(rng.integers(min(4, vocab - 1), vocab, s.shape), s.dtype)
        elif k in ("attention_mask", "example_mask"):
            out[k] = jnp.ones(s.shape, s.dtype)
        else:  # labels, answer positions, token types: class / position 0 is valid for any task
            out[k] = jnp.zeros(s.shape, s.dtype)
    return out


def measure_row(
    name: str,
    method: str,
    *,
    batch: int | None,
    seq: int | None,
    quant: str | None,
    dtype: str,
    warmup: int,
    iters: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row, in this process (run it in a fresh one for a clean peak)."""
    from spry_jax import memory as memory_lib
    from spry_jax import methods, models
    from spry_jax.bench import memory as bench_memory

    setting = bench_memory.setting_for(name, batch, seq, quant)
    model = bench_memory.abstract_split_model(
        name, setting, overrides=overrides, dtype=dtype, **methods.model_options(method)
    )
    step = bench_memory.client_step_fn(model, method)
    abstract = bench_memory.step_arguments(model, setting)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*abstract).compile()
    compile_s = time.perf_counter() - t0
    xla = memory_lib.peak_bytes(compiled)["peak_bytes"]
    key = jax.random.PRNGKey(0)
    drawn = dataclasses.replace(
        model,
        trainable=random_like(model.trainable, jax.random.fold_in(key, 0)),
        frozen=random_like(model.frozen, jax.random.fold_in(key, 1)),
    )
    vocab = models.load_config(name, overrides, prefer_registry=True).vocab_size
    args = bench_memory.real_step_arguments(drawn, concrete_batch(abstract[3], vocab))
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "method": method,
        "batch": setting.batch,
        "seq": setting.seq,
        "base": setting.quant,
        "dtype": dtype,
        "step_ms": 1e3 * statistics.median(times),
        "times_s": times,
        "compile_s": compile_s,
        "xla_peak_bytes": int(xla),
        **measured_memory(),
    }


def measured_memory() -> dict[str, Any]:
    """This process's measured peak so far: the first local device's
    ``memory_stats()["peak_bytes_in_use"]`` where it has one, else ``None`` with the host's
    peak RSS (``ru_maxrss``) as the labelled stand-in (a CPU)."""
    device = jax.local_devices()[0]
    measured = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "measured_peak_bytes": int(measured) if measured is not None else None,
        "measured": "device peak_bytes_in_use" if measured is not None else "host RSS",
        "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measured_cell(row: dict[str, Any]) -> str:
    """A row's measured peak in GiB for a table, host RSS labelled as such."""
    peak = row["measured_peak_bytes"]
    if peak is not None:
        return f"{peak / GiB:.2f}"
    return f"{row['host_rss_bytes'] / GiB:.2f} (host RSS)"


def _row_in_fresh_process(spec: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "spry_jax.bench.device_step",
        f"--row={spec}",
        f"--batch={a.batch}",
        f"--seq={a.seq}",
        f"--quant={a.quant}",
        f"--dtype={a.dtype}",
        f"--warmup={a.warmup}",
        f"--iters={a.iters}",
        f"--overrides={a.overrides}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | base, compute | step ms | measured peak GiB | XLA estimate GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['base']}, {r['dtype']} | {r['step_ms']:.1f} "
            f"| {measured_cell(r)} | {r['xla_peak_bytes'] / GiB:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="roberta-large,llama2-7b")
    p.add_argument("--methods", default="spry,fedavg,fedavg_remat")
    p.add_argument("--batch", type=int, default=0, help="0: the paper's setting (8)")
    p.add_argument("--seq", type=int, default=0, help="0: the paper's setting (64)")
    p.add_argument("--quant", default="", help="base storage override; '': the paper's")
    p.add_argument("--dtype", default="bfloat16", help="model.dtype: float32|bfloat16|float16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--overrides", default="{}", help="HF-config overrides as JSON (tests)")
    p.add_argument("--row", default="", help="internal: MODEL:METHOD, measured in this process")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.row:
        name, method = a.row.split(":")
        row = measure_row(
            name,
            method,
            batch=a.batch or None,
            seq=a.seq or None,
            quant=a.quant or None,
            dtype=a.dtype,
            warmup=a.warmup,
            iters=a.iters,
            overrides=json.loads(a.overrides) or None,
        )
        print(json.dumps(row))
        return [row]
    rows = [
        _row_in_fresh_process(f"{n}:{m}", a)
        for n in a.models.split(",")
        if n
        for m in a.methods.split(",")
        if m
    ]
    print(table(rows))
    print(f"(jax {jax.__version__}; load average {os.getloadavg()[0]:.1f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
