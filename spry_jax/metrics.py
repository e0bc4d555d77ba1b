"""Metrics files: ``metrics.jsonl`` (one record per round), atomic JSON writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` via a temp file and rename, so a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` ([] if it is missing), skipping a torn last line."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# Evaluation keys, defined once: ``eval/{scope}_{metric}`` (spry_jax.evaluation computes them).
# Scopes -- which model is scored on which examples:
GENERALIZED = "generalized"  # the global model, on the round's sampled clients' test splits
PERSONALIZED = "personalized"  # each sampled client's model after its local training, own split
ALL_CLIENTS = "all_clients"  # the global model on the union of every client's test split
ALL_CLIENTS_VAL = "all_clients_val"  # ... of every client's validation split
HELDOUT = "heldout"  # the global model on the dataset's global held-out set
ROUND_SCOPES = (GENERALIZED, PERSONALIZED)
# Metrics per task. Accuracy and loss (classification), SQuAD v2 exact match and F1 (QA, in
# percent), the examples scored and, beside every host-scored accuracy, the majority class of
# the same examples (the control an accuracy is read against).
TASK_METRICS = {"classification": ("accuracy", "loss"), "qa": ("exact_match", "f1")}
EXAMPLES = "examples"
MAJORITY = "majority_accuracy"
# A round's two scopes score the same examples, so a round record has one count.
ROUND_EXAMPLES = "eval/examples"
# Which model a round record's evaluation is of (the global model after that many rounds).
MODEL_AFTER_ROUNDS = "eval/model_after_rounds"


def eval_key(scope: str, metric: str) -> str:
    """``eval/{scope}_{metric}``, e.g. ``eval_key(ALL_CLIENTS, "accuracy")``."""
    return f"eval/{scope}_{metric}"


def brief(record: dict[str, Any]) -> str:
    keys = (
        "train/loss",
        eval_key(GENERALIZED, "accuracy"),
        eval_key(PERSONALIZED, "accuracy"),
        eval_key(GENERALIZED, "exact_match"),
        eval_key(GENERALIZED, "f1"),
        eval_key(PERSONALIZED, "f1"),
        eval_key(ALL_CLIENTS, "accuracy"),
        eval_key(ALL_CLIENTS, "f1"),
        eval_key(ALL_CLIENTS_VAL, "accuracy"),
        "time/round_s",
    )
    return " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)


class MetricsLog:
    """Append-only ``metrics.jsonl``.

    On resume (``keep_before=r``) the records of rounds ``>= r`` -- written after the checkpoint
    that is being resumed -- are dropped (atomically) so the file holds each round once. A torn
    last line from a killed process is dropped too. With ``write=False`` (a process other
    than the primary one of a multi-process run) it reads the file but never changes it.
    """

    def __init__(self, path: str, keep_before: int = 0, write: bool = True):
        self.path = path
        self.write = write
        self.records = [
            rec for rec in read_records(path) if rec.get("round", math.inf) < keep_before
        ]
        if not write:
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def last(self, key: str) -> Any:
        for rec in reversed(self.records):
            if key in rec:
                return rec[key]
        return None

    def last_eval(self) -> dict[str, float]:
        for rec in reversed(self.records):
            found = {k: v for k, v in rec.items() if k.startswith("eval/")}
            if found:
                return found
        return {}

    def total(self, key: str) -> float:
        return float(sum(rec.get(key, 0) for rec in self.records))
