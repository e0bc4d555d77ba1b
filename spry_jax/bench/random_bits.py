"""Random bits in a client step: dropout masks and tangents, threefry against hashed bits.

One jitted client update (one local step, the program a round runs: the method's estimator and
its AdamW) of the paper's client step (batch 8 x 64 tokens, LoRA r = 1 on every query/value +
the head, model and LoRA dropout 0.1, K = 1), timed in four builds that differ only in the
masks: ``threefry`` (JAX's default generator for the masks' bits), ``hash``
(``model.dropout_bits="hash"``: threefry's key derivation, hashed bulk bits,
:mod:`spry_jax.models.random_bits`), ``rbg`` (XLA's RngBitGenerator; measured only: under
``vmap`` it draws every client's bits from the first key, so no config offers it) and
``no dropout`` (dropout 0, the floor: what a step costs without masks). The rows run interleaved (one step of each in turn, after warm-ups) so that
load drifts hit every row alike; medians are printed with the mask share of each step,
``(t - t_no_dropout) / t``. The tangents' share is measured the same way: the step's tangent
draw alone (:func:`spry_jax.core.estimators.draw_tangents` on the model's trainable leaves)
against the step.

    python -m spry_jax.bench.random_bits --models=minilm,bert-base --methods=spry,fedavg --iters=20
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROWS = ("threefry", "hash", "rbg", "no dropout")
DROPOUT = 0.1


def _model(name: str, method: str, dropout: float):
    from spry_jax import methods, models

    return models.make_split_model(
        dict(name=name, pretrained=name == "minilm", dtype="float32", dropout=dropout),
        dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=dropout, target_modules=[]),
        task="classification",
        num_labels=2,
        **methods.model_options(method),
    )


def _batches(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)
    return {
        "input_ids": jnp.asarray(rng.integers(low, vocab, (1, batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((1, batch, seq), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, (1, batch)), jnp.int32),
        "example_mask": jnp.ones((1, batch), jnp.float32),
    }


def compiled_steps(name: str, method: str, batch: int, seq: int) -> dict:
    """``{row: (compiled step, args)}`` for the rows of one (model, method)."""
    from spry_jax import models
    from spry_jax.bench import memory as bench_memory

    out = {}
    for row in ROWS:
        dropout = 0.0 if row == "no dropout" else DROPOUT
        model = _model(name, method, dropout)
        bits = "threefry" if row == "no dropout" else row
        step = bench_memory.client_step_fn(model, method, dropout_bits=bits)
        batches = _batches(models.load_config(name, prefer_registry=True).vocab_size, batch, seq)
        args = bench_memory.real_step_arguments(model, batches)
        out[row] = (jax.jit(step).lower(*args).compile(), args)
    return out


def tangent_draw(name: str, batch: int, seq: int, num_tangents: int = 1):
    """The Spry step's tangent draw alone (every trainable leaf, K tangents), compiled."""
    from spry_jax.core import estimators

    model = _model(name, "spry", DROPOUT)
    mask = {k: jnp.ones((), jnp.float32) for k in model.trainable}

    def draw(key):
        return estimators.draw_tangents(key, model.trainable, mask, num_tangents)

    key = jax.random.PRNGKey(0)
    return jax.jit(draw).lower(key).compile(), (key,)


def interleaved_times(fns: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """Median-ready step times of each ``{name: (compiled, args)}``, one step of each in turn."""
    for _ in range(warmup):
        for f, args in fns.values():
            jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, (f, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    return times


def measure(name: str, method: str, batch: int, seq: int, warmup: int, iters: int) -> dict:
    fns = compiled_steps(name, method, batch, seq)
    if method == "spry":
        fns["tangent draw"] = tangent_draw(name, batch, seq)
    times = interleaved_times(fns, warmup, iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["no dropout"]
    out = {"model": name, "method": method, "median_s": med, "times_s": times}
    out["mask_share"] = {r: (med[r] - floor) / med[r] for r in ("threefry", "hash", "rbg")}
    out["hash_over_threefry"] = med["hash"] / med["threefry"]
    if "tangent draw" in med:
        out["tangent_share"] = med["tangent draw"] / med["hash"]
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| model | method | threefry ms | hash ms | rbg ms | no dropout ms | hash / threefry "
        "| mask share: threefry, hash, rbg | tangent draw (share) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median_s"]
        tan = (
            f"{m['tangent draw'] * 1e3:.2f} ms ({r['tangent_share']:.1%})"
            if "tangent draw" in m
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['method']} | {m['threefry'] * 1e3:.0f} | {m['hash'] * 1e3:.0f} "
            f"| {m['rbg'] * 1e3:.0f} | {m['no dropout'] * 1e3:.0f} "
            f"| {r['hash_over_threefry']:.2f}x | {r['mask_share']['threefry']:.0%}, "
            f"{r['mask_share']['hash']:.0%}, {r['mask_share']['rbg']:.0%} | {tan} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="minilm")
    p.add_argument("--methods", default="spry,fedavg")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    results = [
        measure(name, method, a.batch, a.seq, a.warmup, a.iters)
        for name in a.models.split(",")
        for method in a.methods.split(",")
    ]
    print(table(results))
    print(f"(load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; {jax.device_count()} device(s))")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
