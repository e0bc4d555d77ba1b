"""What a run shows a person: TensorBoard events, PNG plots, a terminal progress bar."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from spry_jax import metrics as metrics_lib

SCALAR_PREFIXES = ("train/", "eval/", "comm/", "time/", "memory/")


class QuietLibraries(logging.Filter):
    """Drops orbax's per-save INFO chatter so the round lines stay readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


class TensorBoard:
    """Scalars of every metrics record to ``workdir/tensorboard`` (tensorboardX event files)."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for k, v in record.items():
            if k.startswith(SCALAR_PREFIXES) and isinstance(v, (int, float)):
                self._writer.add_scalar(k, float(v), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NoBoard:
    """What a process other than the primary one has instead of :class:`TensorBoard`."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


def plot_run(records: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Loss and accuracy against round and against wall time, one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = np.array([r["round"] for r in records])
    wall = np.array([r.get("time/wall_s", np.nan) for r in records])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (x, xlabel) in enumerate(((rounds, "round"), (wall, "wall time (s)"))):
        ax = axes[0, col]
        ax.plot(x, [r["train/loss"] for r in records], label="train/loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.legend()
        ax = axes[1, col]
        for scope in metrics_lib.ROUND_SCOPES:
            key = metrics_lib.eval_key(scope, "accuracy")
            pts = [(xi, r[key]) for xi, r in zip(x, records, strict=True) if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        for name in ("exact_match", "f1"):
            key = metrics_lib.eval_key(metrics_lib.GENERALIZED, name)
            pts = [(xi, r[key] / 100.0) for xi, r in zip(x, records, strict=True) if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{key} / 100")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class Progress:
    """A tqdm bar over rounds with ETA and the latest metrics (quiet when not a terminal)."""

    def __init__(self, start: int, total: int, disable: bool = False):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=start, unit="round", dynamic_ncols=True, disable=disable
        )

    def update(self, record: dict[str, Any]) -> None:
        shown = {"loss": record["train/loss"]}
        for scope in metrics_lib.ROUND_SCOPES:
            k = metrics_lib.eval_key(scope, "accuracy")
            if k in record:
                shown[scope[:3] + "_acc"] = record[k]
        self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def final_table(summary: dict[str, Any], reference: str = "") -> str:
    """A short text table for the end of a run: this run's accuracy on all clients' test splits,
    the majority class of the same snippets and, from ``reference`` (``report.reference``: a
    JSON list of ``{"label", "accuracy", "ci95", "source"}`` rows), the figures the config is
    compared with, each labelled with where it comes from. Empty for a run without the
    all-clients evaluation (QA reports exact match / F1 in summary.json instead)."""
    import json

    final = summary.get("final", {})
    key = lambda metric: metrics_lib.eval_key(metrics_lib.ALL_CLIENTS, metric)  # noqa: E731
    if key("accuracy") not in final:
        return ""
    rows = [
        (
            f"this run ({summary.get('method')}, {summary.get('rounds')} rounds)",
            final[key("accuracy")],
            None,
            "this run",
        ),
        (
            "majority class",
            final.get(key(metrics_lib.MAJORITY), float("nan")),
            None,
            "same test snippets",
        ),
    ]
    if reference:
        with open(reference, encoding="utf-8") as f:
            for row in json.load(f):
                rows.append((row["label"], row["accuracy"], row.get("ci95"), row["source"]))
    width = max(len(r[0]) for r in rows)
    n = int(final.get(key(metrics_lib.EXAMPLES), 0))
    lines = [f"Accuracy on all clients' test splits ({n} examples):"]
    for label, acc, ci, source in rows:
        spread = f" +- {ci:.3f}" if ci is not None else "        "
        lines.append(f"  {label:<{width}}  {acc:.3f}{spread}  [{source}]")
    return "\n".join(lines)
