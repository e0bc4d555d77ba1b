"""A finished study's outputs: ``results.json``, ``report.md``, ``accuracy.png``, ``curves.png``.

Everything here is read after the selection, from the cells' own files (summary.json,
metrics.jsonl); nothing depends on wall time or absolute paths, so a study that was killed and
resumed writes the same results as one that ran straight through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spry_jax import metrics as metrics_lib
from spry_jax.study import runner, stats
from spry_jax.study.spec import Point, Study, StudyError

TEST_KEY = metrics_lib.eval_key(metrics_lib.ALL_CLIENTS, "accuracy")


def _read_metrics(path: str) -> list[dict[str, Any]]:
    return metrics_lib.read_records(os.path.join(path, "metrics.jsonl"))


def run_curves(records: Sequence[Mapping[str, Any]], flops: float | None) -> dict[str, Any]:
    """Learning curves of one run from its metrics records.

    ``client_flops_cum`` is the FLOPs of one local step (XLA) times the real local steps taken
    by all the round's clients, summed over rounds; None if the run did not log either.
    Evaluation figures exist only on eval rounds (``eval_round``).
    """
    rounds = [int(r["round"]) for r in records]
    up = np.cumsum([float(r.get("comm/up_bytes", 0)) for r in records]).tolist()
    steps = [r.get("train/steps") for r in records]
    flops_cum = None
    if flops is not None and records and all(s is not None for s in steps):
        flops_cum = (np.cumsum(np.asarray(steps, dtype=np.float64)) * float(flops)).tolist()
    gen = metrics_lib.eval_key(metrics_lib.GENERALIZED, "accuracy")
    per = metrics_lib.eval_key(metrics_lib.PERSONALIZED, "accuracy")
    evals = [r for r in records if gen in r]
    return {
        "round": rounds,
        "train_loss": [float(r["train/loss"]) for r in records],
        "up_bytes_cum": up,
        "client_flops_cum": flops_cum,
        "eval_round": [int(r["round"]) for r in evals],
        "eval_generalized_accuracy": [float(r[gen]) for r in evals],
        "eval_personalized_accuracy": [r.get(per) for r in evals],
    }


def run_record(cell: runner.Cell, root: str) -> dict[str, Any]:
    """One final run: its test and validation figures, communication, the client step's XLA
    peak memory and FLOPs (logged in round 0), and its learning curves."""
    path = os.path.join(root, cell.workdir)
    summary = runner.read_summary(path)
    rec: dict[str, Any] = {"seed": cell.seed, "workdir": cell.workdir, "stage": cell.stage}
    rec["failed"] = summary.get("failed")
    records = _read_metrics(path)
    first = records[0] if records and records[0].get("round") == 0 else {}
    step = {
        k[len("memory/client_step_") :]: v
        for k, v in first.items()
        if k.startswith("memory/client_step_")
    }
    rec["client_step_flops"] = step.get("flops")
    rec["client_step_peak_bytes"] = step.get("peak_bytes")
    if rec["failed"]:
        return rec
    final = summary["final"]
    rec.update(
        test_accuracy=final.get(TEST_KEY),
        test_loss=final.get(metrics_lib.eval_key(metrics_lib.ALL_CLIENTS, "loss")),
        val_accuracy=final.get(runner.VALIDATION_KEYS[0]),
        val_loss=final.get(runner.VALIDATION_KEYS[1]),
        up_bytes=summary.get("comm/up_bytes"),
        down_bytes=summary.get("comm/down_bytes"),
        rounds=summary.get("rounds"),
        curves=run_curves(records, rec["client_step_flops"]),
    )
    flops_cum = rec["curves"]["client_flops_cum"]
    rec["client_flops"] = flops_cum[-1] if flops_cum else None
    return rec


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _by_seed(runs: Sequence[Mapping[str, Any]], metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in runs if not r["failed"] and r.get(metric) is not None}


def collect(study: Study, root: str, chosen: Mapping[str, Point]) -> dict[str, Any]:
    """The results of a study whose cells are all finished (see module docstring).

    Raises:
      StudyError: a final cell is not finished.
    """
    scores = runner.tuning_scores(study, root)
    finals = runner.final_runs(study, chosen)
    pending = [c for runs in finals.values() for c in runs]
    pending = [c for c in pending if not runner.is_finished(runner.cell_status(c, root))]
    if pending:
        raise StudyError(
            f"the final stage has {len(pending)} unfinished cell(s) (first: {pending[0].label}); "
            "run --stage=final (or all) first"
        )
    arms = {}
    for arm, spec in study.arms.items():
        grid = []
        for name, entry in scores[arm].items():
            score = entry["score"]
            grid.append(
                {
                    "point": name,
                    "overrides": dict(entry["point"].overrides),
                    "tune": [
                        {"seed": s, **(entry["seeds"][s] or {"failed": True})}
                        for s in study.tune_seeds
                    ],
                    "val_accuracy": score[runner.VALIDATION_KEYS[0]] if score else None,
                    "val_loss": score[runner.VALIDATION_KEYS[1]] if score else None,
                    "chosen": name == chosen[arm].name,
                }
            )
        runs = [run_record(c, root) for c in finals[arm]]
        ok = [r for r in runs if not r["failed"]]
        arms[arm] = {
            "overrides": dict(spec.overrides),
            "grid": grid,
            "chosen": {"point": chosen[arm].name, "overrides": dict(chosen[arm].overrides)},
            "runs": runs,
            "failed_seeds": [r["seed"] for r in runs if r["failed"]],
            "test_accuracy": stats.mean_ci([r["test_accuracy"] for r in ok]),
            "val_accuracy": stats.mean_ci([r["val_accuracy"] for r in ok]),
            "up_bytes": _mean([r["up_bytes"] for r in ok]),
            "client_flops": _mean([r["client_flops"] for r in ok]),
            "client_step_flops": _mean([r["client_step_flops"] for r in runs]),
            "client_step_peak_bytes": _mean([r["client_step_peak_bytes"] for r in runs]),
        }
    pairs = []
    for a, b in study.pairs:
        diff = stats.paired_difference(
            _by_seed(arms[a]["runs"], "test_accuracy"), _by_seed(arms[b]["runs"], "test_accuracy")
        )
        pairs.append({"lhs": a, "rhs": b, "metric": "test_accuracy", **diff})
    claims = []
    for c in study.claims:
        diff = stats.paired_difference(
            _by_seed(arms[c.lhs]["runs"], c.metric), _by_seed(arms[c.rhs]["runs"], c.metric)
        )
        claims.append(
            {
                "text": c.text,
                "lhs": c.lhs,
                "rhs": c.rhs,
                "op": c.op,
                "margin": c.margin,
                "metric": c.metric,
                "verdict": stats.verdict(diff, c.op, c.margin),
                **diff,
            }
        )
    return {
        "study": {
            "name": study.name,
            "base": study.base if isinstance(study.base, str) else "(a config object)",
            "overrides": dict(study.overrides),
            "rounds": study.rounds,
            "tune_rounds": study.tune_rounds,
            "tune_seeds": list(study.tune_seeds),
            "seeds": list(study.seeds),
            "selection": list(runner.VALIDATION_KEYS),
        },
        "arms": arms,
        "pairs": pairs,
        "claims": claims,
    }


def _ci_text(ci: Mapping[str, Any], digits: int = 4) -> str:
    if ci.get("mean") is None:
        return "n/a"
    if ci.get("half_width") is None:
        return f"{ci['mean']:.{digits}f} (n={ci['n']})"
    return f"{ci['mean']:.{digits}f} ± {ci['half_width']:.{digits}f} (n={ci['n']})"


def _interval(ci: Mapping[str, Any], digits: int = 4) -> str:
    if ci.get("lo") is None:
        return "n/a"
    return f"[{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def _bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return "n/a"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _overrides_text(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "(defaults)"


def report_markdown(results: Mapping[str, Any], command: str = "") -> str:
    """``report.md``: per arm its chosen setting and final figures, the validation-only tuning
    tables, paired differences, the claims with their verdicts, and the plots."""
    s, arms = results["study"], results["arms"]
    lines = [f"# Study `{s['name']}`", ""]
    if command:
        lines += ["```", command, "```", ""]
    rounds = s["rounds"] if s["rounds"] is not None else "the base config's"
    tune_rounds = s["tune_rounds"] or rounds
    lines += [
        f"Base `{s['base']}` with {_overrides_text(s['overrides'])}; {rounds} rounds "
        f"(tuning runs: {tune_rounds}); tune seeds {s['tune_seeds']}, final seeds {s['seeds']}.",
        "",
        f"Each arm's hyper-parameters are the grid point with the best mean `{s['selection'][0]}`"
        " over the tune seeds: the final global model on every client's validation split, held "
        "out of its local training data. The selection reads nothing else; test figures are read "
        "only for the final runs below. Test accuracy is the final global model on every "
        "client's test split; ± is the 95 % CI half-width over seeds (Student's t, n − 1 dof).",
        "",
    ]
    if len(s["seeds"]) < 3:
        lines += [
            "**Fewer than 3 final seeds: the intervals are wide and no claim is strong.**",
            "",
        ]
    lines += [
        "## Arms",
        "",
        "| arm | chosen | test accuracy | val accuracy | uplink / run | client-step peak "
        "| FLOPs / local step | client FLOPs / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        chosen = _overrides_text(a["chosen"]["overrides"])
        failed = f" ({len(a['failed_seeds'])} seed(s) diverged)" if a["failed_seeds"] else ""
        lines.append(
            f"| {name} | {chosen} | {_ci_text(a['test_accuracy'])}{failed} "
            f"| {_ci_text(a['val_accuracy'])} | {_bytes(a['up_bytes'])} "
            f"| {_bytes(a['client_step_peak_bytes'])} | {_num(a['client_step_flops'])} "
            f"| {_num(a['client_flops'])} |"
        )
    lines += [
        "",
        "Uplink: bytes all clients sent, summed over rounds. Client-step peak: XLA's memory "
        "estimate of one local step. FLOPs / local step: XLA's cost analysis of that step; "
        "client FLOPs: that times the local steps all clients took.",
        "",
        "## Tuning (validation split only)",
        "",
    ]
    for name, a in arms.items():
        lines += [
            f"### {name} ({_overrides_text(a['overrides'])})",
            "",
            "| point | val accuracy | val loss | |",
            "|---|---|---|---|",
        ]
        for g in a["grid"]:
            acc = "diverged" if g["val_accuracy"] is None else f"{g['val_accuracy']:.4f}"
            loss = "" if g["val_loss"] is None else f"{g['val_loss']:.4f}"
            lines.append(f"| {g['point']} | {acc} | {loss} | {'chosen' if g['chosen'] else ''} |")
        lines.append("")
    if results["pairs"]:
        lines += [
            "## Paired differences (test accuracy, same seed)",
            "",
            "| a − b | mean ± 95 % CI | 95 % CI | seeds |",
            "|---|---|---|---|",
        ]
        for p in results["pairs"]:
            lines.append(
                f"| {p['lhs']} − {p['rhs']} | {_ci_text(p)} | {_interval(p)} | {p['seeds']} |"
            )
        lines.append("")
    if results["claims"]:
        lines += [
            "## Claims",
            "",
            "reproduced: the 95 % CI of the paired difference lhs − rhs lies on the claimed side "
            "of the margin; contradicted: it lies entirely on the other side; otherwise not "
            "reproduced.",
            "",
            "| claim | verdict | lhs − rhs | 95 % CI | claimed |",
            "|---|---|---|---|---|",
        ]
        for c in results["claims"]:
            claimed = f"{c['lhs']} − {c['rhs']} {c['op']} {c['margin']:g} ({c['metric']})"
            lines.append(
                f"| {c['text']} | **{c['verdict']}** | {_ci_text(c)} | {_interval(c)} | {claimed} |"
            )
        lines.append("")
    lines += [
        "## Plots",
        "",
        "![final test accuracy per arm](accuracy.png)",
        "",
        "![learning curves](curves.png)",
        "",
        "## Runs",
        "",
        "| arm | seed | test accuracy | val accuracy | workdir |",
        "|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        for r in a["runs"]:
            test = "diverged" if r["failed"] else f"{r['test_accuracy']:.4f}"
            val = "" if r["failed"] else f"{r['val_accuracy']:.4f}"
            lines.append(f"| {name} | {r['seed']} | {test} | {val} | `{r['workdir']}` |")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: Mapping[str, Any], path: str) -> None:
    """Final test accuracy per arm: mean with 95 % CI error bars, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["arms"])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    for i, name in enumerate(names):
        a = results["arms"][name]
        ci = a["test_accuracy"]
        if ci["mean"] is None:
            continue
        ax.bar(i, ci["mean"], color=f"C{i}", alpha=0.6)
        if ci["half_width"] is not None:
            ax.errorbar(i, ci["mean"], yerr=ci["half_width"], color="k", capsize=5)
        ax.plot([i] * len(ci["values"]), ci["values"], "o", color="k", ms=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy, all clients (mean ± 95 % CI)")
    ax.set_ylim(0, 1)
    ax.set_title(results["study"]["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(results: Mapping[str, Any], path: str) -> None:
    """Train loss (every round) and generalized accuracy (eval rounds) of every final run,
    against rounds, client FLOPs and uplink bytes; one colour per arm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = (
        ("round", "round"),
        ("client_flops_cum", "client FLOPs"),
        ("up_bytes_cum", "uplink bytes"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for i, (name, a) in enumerate(results["arms"].items()):
        for j, r in enumerate(r for r in a["runs"] if not r["failed"]):
            c = r["curves"]
            label = name if j == 0 else None
            for col, (key, _) in enumerate(xs):
                x = c[key]
                if x is None:
                    continue
                axes[0, col].plot(x, c["train_loss"], color=f"C{i}", lw=1, label=label)
                at = {rd: k for k, rd in enumerate(c["round"])}
                ex = [x[at[rd]] for rd in c["eval_round"]]
                axes[1, col].plot(
                    ex, c["eval_generalized_accuracy"], "o-", color=f"C{i}", ms=3, lw=1, label=label
                )
    for col, (_, xlabel) in enumerate(xs):
        axes[0, col].set_ylabel("train loss")
        axes[1, col].set_ylabel("generalized accuracy (sampled clients' test)")
        for row in (0, 1):
            axes[row, col].set_xlabel(xlabel)
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"{results['study']['name']}: final runs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(
    study: Study, root: str, chosen: Mapping[str, Point], command: str = ""
) -> dict[str, Any]:
    """Writes ``results.json``, ``report.md``, ``accuracy.png`` and ``curves.png`` under
    ``root``; returns the results."""
    results = collect(study, root, chosen)
    metrics_lib.write_json_atomic(os.path.join(root, "results.json"), results)
    plot_accuracy(results, os.path.join(root, "accuracy.png"))
    plot_curves(results, os.path.join(root, "curves.png"))
    tmp = os.path.join(root, ".report.md.tmp")
    with open(tmp, "w") as f:
        f.write(report_markdown(results, command))
    os.replace(tmp, os.path.join(root, "report.md"))
    return results
