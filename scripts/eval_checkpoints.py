"""Evaluates every saved checkpoint of a run on all clients' test splits.

The per-round ``eval/generalized_accuracy`` averages only that round's sampled clients; this
rebuilds the run from its ``config.json`` and scores each checkpoint's global model on the
union of every client's local test split (what ``eval/all_clients_accuracy`` reports after the
last round), so the whole learning curve can be read without client-sampling noise.

    python scripts/eval_checkpoints.py --workdir=runs/quickstart
    python scripts/eval_checkpoints.py --workdir=runs/quickstart --steps=10,40

Prints one line per checkpoint and writes ``WORKDIR/all_clients_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os

from spry_jax import checkpoint as ckpt_lib
from spry_jax import config as config_lib
from spry_jax import metrics as metrics_lib
from spry_jax import train


def evaluate_checkpoints(workdir: str, steps: list[int] | None = None) -> list[dict]:
    """``[{"round": completed rounds, **eval/all_clients_*}]`` for the saved (or given) steps."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a run directory")
    with open(path) as f:
        # Over today's defaults, so a run written before a field was added still rebuilds.
        config = config_lib.complete(json.load(f))
    exp = train.build_experiment(config)
    manager = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    rows = []
    for step in steps or manager.steps():
        # A run written before a config field existed restores as train does: the field at
        # its default is the same experiment.
        state, _ = manager.restore_latest(
            exp.init_state(),
            train._identity(exp),
            step=step,
            added_with_default=config_lib.added_with_default,
        )
        rows.append({"round": step, **exp.evaluator.all_clients(state.params, exp.model.frozen)})
        print(f"after {step} rounds: {metrics_lib.brief(rows[-1])}", flush=True)
    manager.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", default="", help="comma-separated rounds; default: all saved")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s]
    rows = evaluate_checkpoints(args.workdir, steps)
    metrics_lib.write_json_atomic(os.path.join(args.workdir, "all_clients_eval.json"), rows)


if __name__ == "__main__":
    main()
