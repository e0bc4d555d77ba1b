"""Round time of the one-program round (vmap over clients) vs a Python loop over clients.

The loop is the fair baseline (fedjax's jit backend): it calls the same *jitted* client update
once per client and aggregates on the host. Both run Spry (forward gradients, weight split) on
the smoke model (tiny random BERT, synthetic data); times are after a warm-up round, compile time
is reported separately.

    python scripts/bench_round.py --clients=10,100 --repeats=3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import jax

from spry_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
    spec = importlib.util.spec_from_file_location(
        "smoke", os.path.join(ROOT, "experiments/smoke.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def time_backend(config, repeats: int) -> tuple[float, float]:
    """(first-round seconds incl. compile, median steady-state round seconds)."""
    exp = train.build_experiment(config)
    state = exp.init_state()
    frozen = exp.replicate(exp.model.frozen)
    clients = exp.sample_clients(0)
    batches = exp.round_batches(0, clients)
    t0 = time.perf_counter()
    state, m = exp.round_fn(state, frozen, batches)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = exp.round_fn(state, frozen, batches)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100", help="comma-separated clients per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="spry")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(
        "| M | one-program round (s) | loop of jitted clients (s) | loop / program | "
        "compile+first round: program (s) | loop (s) |"
    )
    print("|---|---|---|---|---|---|")
    for m in (int(x) for x in args.clients.split(",")):
        results = {}
        for backend in ("vmap", "loop"):
            cfg = smoke_config()
            cfg.method = args.method
            cfg.num_clients = m
            cfg.clients_per_round = m
            cfg.data.num_examples = 40 * m  # ~32 train examples = 4 local steps per client
            cfg.round.backend = backend
            results[backend] = time_backend(cfg, args.repeats)
        (pf, ps), (lf, ls) = results["vmap"], results["loop"]
        print(f"| {m} | {ps:.3f} | {ls:.3f} | {ls / ps:.1f}x | {pf:.1f} | {lf:.1f} |", flush=True)


if __name__ == "__main__":
    main()
