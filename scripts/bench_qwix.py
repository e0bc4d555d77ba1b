"""Our int4 matmul against Qwix's (``pip install qwix``) for one frozen weight-only layer.

Measures, for ``x [tokens, in] @ W [in, out]`` with W int4 in groups of 128 input rows:

* ours: :func:`spry_jax.models.quant.dequantize` (uint8-packed codes, float32 scales, optional
  uint8 zero points) then ``jnp.matmul``, as :class:`spry_jax.models.layers.Linear` runs it;
* qwix: ``qwix.dot_general(x, QArray)`` with ``qwix.quantize(W, jnp.int4, ...)`` (symmetric)
  and a hand-built asymmetric ``QArray`` (uint4 codes and zero points), its weight-only path;

the forward time and the ``jax.jvp`` time in ``x`` (what Spry runs), the values against the
float reference, and the stored bytes and compiled peak (XLA ``memory_analysis``, arguments +
temp + outputs) of each. Times are medians of a few runs after a warm-up, on this machine.

    nice -n 19 python scripts/bench_qwix.py --tokens=256 --features=2048
"""

from __future__ import annotations

import os

_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
if "--xla_cpu_scheduler_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spry_jax.models import quant  # noqa: E402


def _time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _peak(fn, *args) -> int:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def main() -> None:
    import qwix

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    n, g = args.features, args.group
    key = jax.random.key(0)
    w = jax.random.normal(key, (n, n), jnp.float32) * 0.05
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.tokens, n), jnp.float32)
    tx = jax.random.normal(jax.random.fold_in(key, 2), x.shape, jnp.float32)
    dims = (((1,), (0,)), ((), ()))

    # Ours, symmetric (our RTN) and asymmetric (GPTQ-style zero points).
    codes, scale = quant.quantize(w, "int4", g)
    rng = np.random.default_rng(0)
    zero = jnp.asarray(rng.integers(1, 16, size=scale.shape), jnp.uint8)

    # Qwix, symmetric: its own quantiser; asymmetric: uint4 codes and zero points.
    q_sym = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: g})
    u = quant.dequantize(codes, jnp.ones_like(scale), "int4", jnp.float32) + 8  # codes 0..15
    q_asym = qwix.QArray(qvalue=u.astype(jnp.uint4), scale=scale, zero_point=zero.astype(jnp.uint4))

    variants = {
        "ours_sym": (lambda x, c, s: x @ quant.dequantize(c, s, "int4", x.dtype), (codes, scale)),
        "ours_asym": (
            lambda x, c, s, z: x @ quant.dequantize(c, s, "int4", x.dtype, z),
            (codes, scale, zero),
        ),
        "qwix_sym": (lambda x, q: qwix.dot_general(x, q, dims), (q_sym,)),
        "qwix_asym": (lambda x, q: qwix.dot_general(x, q, dims), (q_asym,)),
    }
    ref = {
        "sym": x @ quant.dequantize(codes, scale, "int4", jnp.float32),
        "asym": x @ quant.dequantize(codes, scale, "int4", jnp.float32, zero),
    }
    rows = []
    for name, (fn, weights) in variants.items():
        fwd = jax.jit(fn)
        jvp = jax.jit(lambda x, t, *wt, fn=fn: jax.jvp(lambda x: fn(x, *wt), (x,), (t,)))
        y = fwd(x, *weights)
        y_jvp, t_out = jvp(x, tx, *weights)
        # Qwix's own symmetric quantiser rounds its own way: compare with its dequantisation.
        want = (x @ qwix.dequantize(q_sym)) if name == "qwix_sym" else ref[name.split("_")[1]]
        stored = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(weights))
        rows.append(
            dict(
                variant=name,
                forward_ms=1e3 * _time(fwd, x, *weights),
                jvp_ms=1e3 * _time(jvp, x, tx, *weights),
                max_abs_err_vs_dequantised_float=float(jnp.abs(y - want).max()),
                jvp_tangent_err=float(jnp.abs(t_out - fn(tx, *weights)).max()),
                stored_weight_bytes=stored,
                jvp_compiled_peak_bytes=_peak(
                    lambda x, t, *wt, fn=fn: jax.jvp(lambda x: fn(x, *wt), (x,), (t,)),
                    x,
                    tx,
                    *weights,
                ),
            )
        )
    print(
        json.dumps(
            dict(
                tokens=args.tokens,
                features=n,
                group=g,
                backend=jax.default_backend(),
                xla_flags=os.environ["XLA_FLAGS"],
                rows=rows,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
