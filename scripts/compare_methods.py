"""Every method on the same real task, side by side (issue 5's comparison).

Rotten Tomatoes (offline asset) with MiniLM-L6 + LoRA, the same seed, partition, clients and
rounds for every method; writes ``OUT/table.md``, ``OUT/results.json`` and ``OUT/compare.png``:
final generalized and personalized accuracy, rounds and wall time to a target accuracy, XLA's
peak-memory estimate of one client step, and bytes up/down per round.

    python scripts/compare_methods.py --out=runs/compare --rounds=30
    python scripts/compare_methods.py --out=runs/compare --methods=spry,fedavg,fedmezo --rounds=10

Each method's run lives in ``OUT/<method>/`` and resumes if rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from spry_jax import methods, train
from spry_jax.config import default_config


def task_config(method: str, rounds: int, seed: int):
    """The shared task: only ``method`` differs between runs."""
    c = default_config()
    c.method = method
    c.seed = seed
    c.rounds = rounds
    c.num_clients = 100
    c.clients_per_round = 10
    c.eval_every = max(1, rounds // 10)
    c.checkpoint_every = rounds
    c.data.name = "rotten_tomatoes"
    c.data.alpha = 1.0
    c.data.max_length = 32
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.peft.lora_rank = 1
    c.split.classifier_share = True
    c.client.batch_size = 4
    c.client.max_steps = 16
    c.round.backend = "vmap"
    return c


def first_reaching(records, key, target):
    for r in records:
        if r.get(key, -1.0) >= target:
            return r["round"], r["time/wall_s"]
    return None, None


def summarize(method: str, workdir: str, target: float) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # The final model's figures (a round's record is of the model that round starts from).
    with open(os.path.join(workdir, "summary.json")) as f:
        final = json.load(f)["final"]
    rounds_to, wall_to = first_reaching(records, "eval/generalized_accuracy", target)
    return {
        "method": method,
        "generalized_accuracy": final.get("eval/generalized_accuracy"),
        "personalized_accuracy": final.get("eval/personalized_accuracy"),
        "rounds_to_target": rounds_to,
        "wall_s_to_target": wall_to,
        "client_step_peak_bytes": records[0].get("memory/client_step_peak_bytes"),
        "up_bytes_per_round": records[-1]["comm/up_bytes"],
        "down_bytes_per_round": records[-1]["comm/down_bytes"],
        "wall_s": records[-1]["time/wall_s"],
        "records": records,
    }


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=",".join(methods.METHODS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.65, help="generalized accuracy target")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.methods.split(","):
        workdir = os.path.join(args.out, name)
        try:
            train.train_and_evaluate(task_config(name, args.rounds, args.seed), workdir)
        except Exception as e:  # one failing method must not hide the others' results
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            continue
        rows.append(summarize(name, workdir, args.target))
    lines = [
        f"Rotten Tomatoes, MiniLM-L6 + LoRA r=1, 100 clients / 10 per round, {args.rounds} rounds, "
        f"seed {args.seed}; target generalized accuracy {args.target}.",
        "",
        "| method | generalized acc | personalized acc | rounds to target | wall s to target | "
        "client-step peak (MiB) | up KiB/round | down KiB/round | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = None if r["client_step_peak_bytes"] is None else r["client_step_peak_bytes"] / 2**20
        lines.append(
            f"| `{r['method']}` | {fmt(r['generalized_accuracy'], '.3f')} | "
            f"{fmt(r['personalized_accuracy'], '.3f')} | {fmt(r['rounds_to_target'], 'd')} | "
            f"{fmt(r['wall_s_to_target'], '.0f')} | {fmt(peak, '.1f')} | "
            f"{r['up_bytes_per_round'] / 1024:.1f} | {r['down_bytes_per_round'] / 1024:.1f} | "
            f"{r['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "records"} for r in rows], f, indent=2)
    plot(rows, os.path.join(args.out, "compare.png"))


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        ev = [x for x in r["records"] if "eval/generalized_accuracy" in x]
        if not ev:
            continue
        acc = [x["eval/generalized_accuracy"] for x in ev]
        axes[0].plot([x["round"] for x in ev], acc, marker=".", label=r["method"])
        axes[1].plot([x["time/wall_s"] for x in ev], acc, marker=".", label=r["method"])
    for ax, xlabel in zip(axes, ("round", "wall time (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("generalized accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
