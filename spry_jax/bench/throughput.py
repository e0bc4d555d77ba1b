"""Round throughput: one-program round vs a Python loop of jitted client updates, and scaling.

All runs train Spry (forward gradients on each client's slice) on the smoke model (tiny random
BERT, synthetic data, ~4 local steps of batch 8 per client). Reported, per clients per round M:

* the steady-state round time (median over ``--repeats`` rounds after one warm-up round) and
  clients/s of the one-program round (``vmap`` over clients in one XLA program);
* the same for the fair baseline, a Python loop calling the *jitted* client update once per
  client (fedjax's jit backend), and the ratio loop / program;
* compile + first round time of each, separately;
* the one-program round on the ``shard_map`` backend vs the number of devices: fake CPU
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one subprocess per N.

Times on shared CPUs are noisy; compare the ratios measured in one run. Fake devices share
the machine's cores, so device scaling on a CPU measures the sharding overhead, not speed-up.

    python -m spry_jax.bench.throughput --clients=10,100,1000 --devices=1,2,4,8 --out=t.json
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

from spry_jax import train  # noqa: E402
from spry_jax.bench import run_row  # noqa: E402

EXAMPLES_PER_CLIENT = 40  # 80/20 split -> 32 train examples = 4 local steps of batch 8


def smoke_config():
    """``experiments/smoke.py``'s config (tiny random BERT on synthetic data); the
    ``experiments`` package is imported from the repository root (the working directory of
    ``python -m spry_jax.bench.throughput``)."""
    from experiments import smoke

    return smoke.get_config()


def file_config(path: str):
    """``get_config()`` of an experiment file (e.g. ``experiments/quickstart.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spry_jax_bench_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--config={path!r}: not a Python file with get_config()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def round_config(
    clients: int, backend: str, method: str = "spry", num_devices: int = 0, config: str = ""
):
    """M clients per round on ``backend``: the smoke config (all M clients take part, 40
    synthetic examples each), or with ``config`` an experiment file's config with its own data
    and M of its clients sampled per round (at least M clients in the federation)."""
    if config:
        cfg = file_config(config)
        cfg.num_clients = max(cfg.num_clients, clients)
    else:
        cfg = smoke_config()
        cfg.num_clients = clients
        cfg.data.num_examples = EXAMPLES_PER_CLIENT * clients
    cfg.method = method
    cfg.clients_per_round = clients
    cfg.round.backend = backend
    cfg.round.num_devices = num_devices
    return cfg


def time_rounds(config, repeats: int = 3) -> dict[str, float]:
    """``{"first_s": compile + first round, "round_s": median steady round, "clients_per_s"}``."""
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
    median = statistics.median(times)
    return {
        "first_s": first,
        "round_s": median,
        "clients_per_s": config.clients_per_round / median,
        "num_steps": exp.num_steps,
    }


def compare_backends(
    clients: int, repeats: int, method: str = "spry", config: str = ""
) -> dict[str, Any]:
    """One-program (vmap) vs loop of jitted client updates at M = ``clients``."""
    prog = time_rounds(round_config(clients, "vmap", method, config=config), repeats)
    loop = time_rounds(round_config(clients, "loop", method, config=config), repeats)
    return {
        "M": clients,
        "method": method,
        "config": config or "smoke",
        "program": prog,
        "loop": loop,
        "loop_over_program": loop["round_s"] / prog["round_s"],
    }


def devices_run(num_devices: int, clients: int, repeats: int, method: str) -> dict[str, Any]:
    """The shard_map round on N fake CPU devices, measured in a fresh subprocess."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={num_devices}".strip(),
    )
    code = (
        "import json, spry_jax.bench.throughput as t, jax; "
        f"r = t.time_rounds(t.round_config({clients}, 'shard_map', {method!r}, {num_devices}), "
        f"{repeats}); r['devices'] = jax.device_count(); print('ROW ' + json.dumps(r))"
    )
    row = run_row(code, env, f"device run N={num_devices}")
    if row["devices"] != num_devices:
        raise RuntimeError(f"asked for {num_devices} devices, the subprocess had {row['devices']}")
    return {"N": num_devices, "M": clients, **row}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="clients per round M")
    parser.add_argument("--devices", default="1,2,4,8", help="fake CPU device counts ('' = skip)")
    parser.add_argument("--device_clients", type=int, default=100, help="M for the device runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="spry")
    parser.add_argument(
        "--config",
        default="",
        help="experiment file for the program-vs-loop rows (default: the smoke model); e.g. "
        "experiments/quickstart.py for MiniLM on the quickstart's data",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__}; {os.cpu_count()} CPU cores; devices {jax.devices()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()}; "
        f"config {args.config or 'smoke'}"
    )
    result: dict[str, Any] = {"backends": [], "devices": []}
    print(
        "\n| M | program round (s) | program clients/s | loop round (s) | loop clients/s | "
        "loop / program | compile+first: program (s) | loop (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in (int(x) for x in args.clients.split(",") if x):
        r = compare_backends(m, args.repeats, args.method, args.config)
        result["backends"].append(r)
        p, lp = r["program"], r["loop"]
        print(
            f"| {m} | {p['round_s']:.3f} | {p['clients_per_s']:.0f} | {lp['round_s']:.3f} | "
            f"{lp['clients_per_s']:.0f} | {r['loop_over_program']:.1f}x | {p['first_s']:.1f} | "
            f"{lp['first_s']:.1f} |",
            flush=True,
        )
    if args.devices:
        print(
            f"\n| devices N (shard_map, M = {args.device_clients}) | round (s) | clients/s | "
            "vs N=1 | compile+first (s) |"
        )
        print("|---|---|---|---|---|")
        first = None
        for n in (int(x) for x in args.devices.split(",") if x):
            r = devices_run(n, args.device_clients, args.repeats, args.method)
            result["devices"].append(r)
            first = first or r["round_s"]
            print(
                f"| {n} | {r['round_s']:.3f} | {r['clients_per_s']:.0f} | "
                f"{first / r['round_s']:.2f}x | {r['first_s']:.1f} |",
                flush=True,
            )
    print(f"\nload average at the end {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
