"""The cells of a study, their state on disk, the validation-only selection, and running them.

Layout under the study directory ``DIR``::

    tune/<arm>/<point>/seed<k>/   one ordinary run per (arm, grid point, tune seed)
    final/<arm>/seed<k>/          the chosen point of each arm, per final seed (unless that run
                                  is a tuning run already, see :class:`spry_jax.study.Study`)

A cell is finished when its ``summary.json`` exists (or ``failed.json``: the run stopped on
non-finite values, which a rerun would repeat bit for bit) and its ``config.json`` equals the
cell's resolved config; an unfinished cell resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from spry_jax import config as config_lib
from spry_jax import metrics as metrics_lib
from spry_jax.study.spec import (
    Point,
    Study,
    StudyError,
    base_config,
    cell_config,
    config_json,
    grid_points,
)

# The only figures the selection reads: the final global model on every client's validation
# split. Nothing from the test split is in this list, and selection sees nothing else.
VALIDATION_KEYS = tuple(
    metrics_lib.eval_key(metrics_lib.ALL_CLIENTS_VAL, m) for m in ("accuracy", "loss")
)

DONE, FAILED, PARTIAL, NEW = "done", "failed", "partial", "new"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One ordinary run of a study.

    Attributes:
      stage: "tune" or "final".
      arm, point, seed: what it runs.
      workdir: its directory, relative to the study directory.
      config: its resolved config.
    """

    stage: str
    arm: str
    point: Point
    seed: int
    workdir: str
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.workdir


def tune_cells(study: Study) -> list[Cell]:
    """Every (arm, grid point, tune seed), arms and points in declaration order."""
    base = base_config(study)
    cells = []
    for arm in study.arms:
        for point in grid_points(study, arm):
            for seed in study.tune_seeds:
                cfg = cell_config(study, arm, point, seed, "tune", base=base)
                workdir = os.path.join("tune", arm, point.name, f"seed{seed}")
                cells.append(Cell("tune", arm, point, seed, workdir, cfg))
    return cells


def final_runs(study: Study, chosen: Mapping[str, Point]) -> dict[str, list[Cell]]:
    """Per arm, the final run of each seed: a tuning cell when its config is the same (same
    seed and rounds: the run would be bit-identical), else a cell under ``final/``."""
    base = base_config(study)
    tune = {(c.arm, c.point.name, c.seed): c for c in tune_cells(study)}
    out: dict[str, list[Cell]] = {}
    for arm, point in chosen.items():
        runs = []
        for seed in study.seeds:
            cfg = cell_config(study, arm, point, seed, "final", base=base)
            same = tune.get((arm, point.name, seed))
            if same is not None and config_json(same.config) == config_json(cfg):
                runs.append(same)
            else:
                runs.append(
                    Cell("final", arm, point, seed, os.path.join("final", arm, f"seed{seed}"), cfg)
                )
        out[arm] = runs
    return out


def final_cells(study: Study, chosen: Mapping[str, Point]) -> list[Cell]:
    """The final runs that are not tuning runs (what the final stage has to run)."""
    return [c for runs in final_runs(study, chosen).values() for c in runs if c.stage == "final"]


def num_final_cells(study: Study) -> int:
    """How many final cells there will be, before the selection is known (reuse depends only on
    the seed and the rounds, not on which point is chosen)."""
    first = {arm: grid_points(study, arm)[0] for arm in study.arms}
    return len(final_cells(study, first))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cell_status(cell: Cell, root: str) -> str:
    """ "done", "failed" (finished without a summary, see the module docstring), "partial"
    (started: it resumes from its checkpoint) or "new".

    Raises:
      StudyError: the cell's directory holds a run of a different config (the study file
        changed since): it is neither skipped nor overwritten.
    """
    path = os.path.join(root, cell.workdir)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        return NEW
    with open(cfg_path) as f:
        found = _flat(json.load(f))
    want = _flat(config_json(cell.config))
    # A field added to the code since the cell ran, at its default, is the same experiment.
    diffs = sorted(
        k
        for k in set(found) | set(want)
        if found.get(k) != want.get(k)
        and not (k not in found and config_lib.added_with_default(k, want[k]))
    )
    if diffs:
        detail = ", ".join(f"{k}: {found.get(k)!r} there, {want.get(k)!r} now" for k in diffs[:3])
        raise StudyError(
            f"{path} holds a run of a different config ({detail}); the study changed since it "
            "ran: delete that directory or use a new --workdir"
        )
    if os.path.exists(os.path.join(path, "summary.json")):
        return DONE
    if os.path.exists(os.path.join(path, "failed.json")):
        return FAILED
    return PARTIAL


def is_finished(status: str) -> bool:
    return status in (DONE, FAILED)


def read_summary(path: str) -> dict[str, Any]:
    """A run's ``summary.json`` (``failed.json`` for a run that stopped, as ``{"failed": msg}``)."""
    summary = os.path.join(path, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            return json.load(f)
    with open(os.path.join(path, "failed.json")) as f:
        return {"failed": json.load(f)["error"]}


def validation_view(summary: Mapping[str, Any]) -> dict[str, float] | None:
    """The figures of a run that selection may read: :data:`VALIDATION_KEYS` of its final
    record, or None for a failed run. Reads no other key of the summary."""
    if "failed" in summary:
        return None
    final = summary["final"]
    missing = [k for k in VALIDATION_KEYS if k not in final]
    if missing:
        raise StudyError(f"a tuning run has no {missing[0]} (was data.val_fraction 0?)")
    return {k: float(final[k]) for k in VALIDATION_KEYS}


def point_score(views: Sequence[dict[str, float] | None]) -> dict[str, float] | None:
    """Mean validation accuracy and loss over a point's tune seeds; None if any seed failed
    (a setting that diverges for some seed is not chosen)."""
    if not views or any(v is None for v in views):
        return None
    return {k: sum(v[k] for v in views) / len(views) for k in VALIDATION_KEYS}


def choose_point(scores: Mapping[str, dict[str, float] | None]) -> str | None:
    """The best point by mean validation accuracy; ties by lower validation loss, then the
    first declared. None if every point failed."""
    best, best_key = None, None
    for i, (name, score) in enumerate(scores.items()):
        if score is None:
            continue
        acc, loss = score[VALIDATION_KEYS[0]], score[VALIDATION_KEYS[1]]
        key = (acc, -loss if math.isfinite(loss) else -math.inf, -i)
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best


def tuning_scores(study: Study, root: str) -> dict[str, dict[str, Any]]:
    """Per arm and point: the validation view of each tune seed and their mean, read through
    :func:`validation_view` only.

    Raises:
      StudyError: a tuning cell is not finished.
    """
    out: dict[str, dict[str, Any]] = {arm: {} for arm in study.arms}
    cells = tune_cells(study)
    pending = [c for c in cells if not is_finished(cell_status(c, root))]
    if pending:
        raise StudyError(
            f"the tune stage has {len(pending)} unfinished cell(s) (first: {pending[0].label}); "
            "run --stage=tune (or all) first"
        )
    for c in cells:
        entry = out[c.arm].setdefault(c.point.name, {"point": c.point, "seeds": {}})
        entry["seeds"][c.seed] = validation_view(read_summary(os.path.join(root, c.workdir)))
    for points in out.values():
        for entry in points.values():
            entry["score"] = point_score([entry["seeds"][s] for s in study.tune_seeds])
    return out


def select(study: Study, root: str) -> dict[str, Point]:
    """Per arm, the grid point with the best mean validation accuracy over the tune seeds.

    Raises:
      StudyError: a tuning cell is unfinished, or every point of an arm failed.
    """
    chosen = {}
    for arm, points in tuning_scores(study, root).items():
        name = choose_point({p: e["score"] for p, e in points.items()})
        if name is None:
            raise StudyError(f"arm {arm!r}: every grid point diverged; lower its learning rates")
        chosen[arm] = points[name]["point"]
    return chosen


@contextlib.contextmanager
def cell_lock(cell: Cell, root: str):
    """Holds ``DIR/locks/<cell>.lock`` exclusively while a process runs ``cell``.

    Two processes writing one cell's directory interleave its metrics and checkpoints (a
    worker started from an edited study file, or a job-array task submitted twice, would do
    it); the second one is refused instead. The lock is the operating system's (``flock``), so
    a killed process leaves no stale lock behind.
    """
    lock_dir = os.path.join(root, "locks")
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.join(lock_dir, cell.workdir.replace("/", "__") + ".lock")
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"cell {cell.label} is being run by another process (it holds {path}); two "
                "processes must never write one cell: wait for it, or stop it and rerun"
            ) from None
        yield  # closing the file releases the lock


def run_cell(cell: Cell, root: str) -> str:
    """Runs (or resumes) one cell with :func:`spry_jax.train.train_and_evaluate` under its
    :func:`cell_lock`; returns its status afterwards. A run that stops on non-finite values is
    recorded in ``failed.json``."""
    from spry_jax import train  # local: JAX-heavy

    path = os.path.join(root, cell.workdir)
    with cell_lock(cell, root):
        status = cell_status(cell, root)
        if is_finished(status):  # finished by another process meanwhile
            return status
        try:
            train.train_and_evaluate(cell.config, path)
        except FloatingPointError as e:
            logging.warning("%s stopped: %s", cell.label, e)
            metrics_lib.write_json_atomic(os.path.join(path, "failed.json"), {"error": str(e)})
            return FAILED
    return DONE


def run_cells(
    cells: Sequence[Cell],
    root: str,
    bar: Any = None,
    on_done: Callable[[Cell], None] | None = None,
) -> list[Cell]:
    """Runs the unfinished cells in order (finished ones are skipped); returns those it ran."""
    ran = []
    for cell in cells:
        status = cell_status(cell, root)
        if is_finished(status):
            continue
        if bar is not None:
            bar.set_postfix_str(cell.label, refresh=True)
        logging.info("study cell %s: %s", cell.label, "resuming" if status == PARTIAL else "new")
        run_cell(cell, root)
        ran.append(cell)
        if on_done is not None:
            on_done(cell)
        if bar is not None:
            bar.update(1)
    return ran


def run_cells_in_workers(
    study: Study,
    root: str,
    stage: str,
    workers: int,
    study_path: str,
    extra_args: Sequence[str] = (),
    poll_s: float = 0.2,
) -> list[int]:
    """Runs the unfinished cells of ``stage`` ("tune" or "final") as independent processes,
    ``workers`` at a time, each ``python -m spry_jax.study ... --stage=STAGE --cell_index=I``
    (exactly what one task of a job array runs); returns the indices it ran.

    Every worker writes only its own cell's directory under ``root`` (the layout and files of a
    cell run in-process); its output goes to ``root/logs/<stage>-<index>.log``.

    Raises:
      StudyError: a worker exited with an error (the message names the cells and their logs;
        the other cells still ran).
    """
    if stage not in ("tune", "final"):
        raise StudyError(f"workers run the tune or final stage, not {stage!r}")
    if workers < 1:
        raise StudyError(f"--workers={workers} must be >= 1")
    cells = stage_cells(study, root, stage)
    todo = [i for i, c in enumerate(cells) if not is_finished(cell_status(c, root))]
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    running: dict[subprocess.Popen, tuple[int, Any, str]] = {}
    failed: list[str] = []
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                log_path = os.path.join(log_dir, f"{stage}-{i}.log")
                cmd = [
                    sys.executable,
                    "-m",
                    "spry_jax.study",
                    f"--study={study_path}",
                    f"--workdir={root}",
                    f"--stage={stage}",
                    f"--cell_index={i}",
                    # the worker re-reads the study file: it checks that index i is still this
                    # cell (an edited file shifts the indices)
                    f"--cell_workdir={cells[i].workdir}",
                    *extra_args,
                ]
                log = open(log_path, "w")  # noqa: SIM115 (closed when the worker ends)
                logging.info("study cell %s: worker started (log %s)", cells[i].label, log_path)
                running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = (
                    i,
                    log,
                    log_path,
                )
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                i, log, log_path = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    failed.append(f"{cells[i].label} (exit {proc.returncode}, log {log_path})")
                else:
                    logging.info("study cell %s: done", cells[i].label)
    finally:
        for proc, (_, log, _) in running.items():
            proc.kill()
            proc.wait()
            log.close()
    if failed:
        raise StudyError(
            f"{len(failed)} worker(s) of the {stage} stage failed: {'; '.join(failed)}; rerun "
            "the same command to retry them (finished cells are skipped)"
        )
    return todo


def stage_cells(study: Study, root: str, stage: str) -> list[Cell]:
    """The cells of a stage, in the order ``--cell_index`` counts them: "tune", "final" (known
    once every tuning cell is finished), or "all" (tune, then final when known)."""
    if stage not in ("all", "tune", "final"):
        raise StudyError(f"--cell_index and --list_cells take --stage=all|tune|final, not {stage}")
    tune = tune_cells(study)
    if stage == "tune":
        return tune
    if stage == "final" or all(is_finished(cell_status(c, root)) for c in tune):
        finals = final_cells(study, select(study, root))
        return finals if stage == "final" else tune + finals
    return tune


def run_study(
    study: Study,
    root: str,
    *,
    stage: str = "all",
    cell_index: int | None = None,
    progress: bool = True,
    on_cell_done: Callable[[Cell], None] | None = None,
    command: str = "",
    workers: int = 1,
    study_path: str | None = None,
    worker_args: Sequence[str] = (),
    expect_workdir: str | None = None,
) -> dict[str, Any] | None:
    """Runs a study in ``root``: the unfinished cells of the stage, then (stage "all" or
    "report") writes results.json, report.md and the plots and returns the results.

    Args:
      study: a checked study (:func:`spry_jax.study.load_study`).
      root: the study directory.
      stage: "all" (tune, select, final, report), "tune", "final" or "report" (only the
        outputs; every cell must be finished).
      cell_index: run only this cell of :func:`stage_cells` (one task of a job array), no
        outputs.
      progress: show a tqdm bar over the cells, with ETA.
      on_cell_done: called after each cell that ran (tests use it to interrupt a study).
      command: the command line, printed at the top of report.md.
      workers: > 1: run each stage's unfinished cells as that many parallel processes
        (:func:`run_cells_in_workers`; needs ``study_path``), then select and report here.
      study_path: the study file, for the workers' command line.
      worker_args: further flags for the workers (e.g. ``--noxla_cache``).
      expect_workdir: with ``cell_index``, the workdir that cell must have (the workers'
        ``--cell_workdir``); a different one means the study file changed since the caller
        listed its cells, and the cell is refused.
    """
    from tqdm.auto import tqdm

    from spry_jax.study import report  # local: matplotlib

    if stage not in ("all", "tune", "final", "report"):
        raise StudyError(f"--stage must be all, tune, final or report, not {stage!r}")
    os.makedirs(root, exist_ok=True)
    if workers > 1 and cell_index is None and stage != "report":
        if not study_path:
            raise StudyError("running cells in workers needs the study file's path")
        if stage in ("all", "tune"):
            run_cells_in_workers(study, root, "tune", workers, study_path, worker_args)
        if stage in ("all", "final"):
            run_cells_in_workers(study, root, "final", workers, study_path, worker_args)
        if stage != "all":
            return None
        return report.write_outputs(study, root, select(study, root), command)
    if cell_index is not None:
        cells = stage_cells(study, root, stage)
        if not 0 <= cell_index < len(cells):
            raise StudyError(f"--cell_index={cell_index} is outside 0..{len(cells) - 1}")
        if expect_workdir is not None and cells[cell_index].workdir != expect_workdir:
            raise StudyError(
                f"--cell_index={cell_index} is now cell {cells[cell_index].workdir}, not "
                f"{expect_workdir}: the study file changed since the study started; rerun the "
                "study command (finished cells are kept, the others run)"
            )
        run_cells([cells[cell_index]], root, on_done=on_cell_done)
        return None
    runs_tune, runs_final = stage in ("all", "tune"), stage in ("all", "final")
    tune = tune_cells(study)
    tune_done = [is_finished(cell_status(c, root)) for c in tune]
    total = (len(tune) if runs_tune else 0) + (num_final_cells(study) if runs_final else 0)
    counted = sum(tune_done) if runs_tune else 0
    bar = tqdm(
        total=total,
        initial=counted,
        unit="cell",
        desc=study.name,
        disable=not progress or not total,
    )
    try:
        if runs_tune:
            run_cells(tune, root, bar, on_cell_done)
        if stage == "tune":
            return None
        chosen = select(study, root)
        finals = final_cells(study, chosen)
        if runs_final:
            bar.update(sum(is_finished(cell_status(c, root)) for c in finals))
            run_cells(finals, root, bar, on_cell_done)
    finally:
        bar.close()
    if stage == "final":
        return None
    return report.write_outputs(study, root, chosen, command)
