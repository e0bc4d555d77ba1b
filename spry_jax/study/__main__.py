"""Command line: ``python -m spry_jax.study --study=experiments/studies/<name>.py --workdir=DIR``.

Runs the study's cells one after another in this process (finished cells are skipped, a killed
study resumes), then writes ``DIR/results.json``, ``DIR/report.md`` and the plots. On a cluster,
one cell per task::

    python -m spry_jax.study --study=S --workdir=D --stage=tune --list_cells    # N cells
    python -m spry_jax.study --study=S --workdir=D --stage=tune --cell_index=$I  # I < N
    python -m spry_jax.study --study=S --workdir=D --stage=final --list_cells   # after tune
    python -m spry_jax.study --study=S --workdir=D --stage=final --cell_index=$I
    python -m spry_jax.study --study=S --workdir=D --stage=report

``--cell_index_env=SLURM_ARRAY_TASK_ID`` reads the index from that environment variable
instead (one line in a job-array script). On one host, ``--workers=N`` runs the cells as N
parallel processes (each exactly such a task), stage by stage, then the report.

A user error (bad study file, unknown config key, a cell directory of another config, bad data,
a run that does not fit in memory: any :class:`spry_jax.errors.UserError`) exits with status 2
and one line.
"""

import os
import sys

import jax
from absl import app, flags, logging

from spry_jax.errors import UserError
from spry_jax.reporting import QuietLibraries
from spry_jax.study import runner
from spry_jax.study.spec import StudyError, load_study

_STUDY = flags.DEFINE_string("study", None, "Study file (experiments/studies/<name>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one workdir per cell under it.")
_STAGE = flags.DEFINE_enum(
    "stage", "all", ["all", "tune", "final", "report"], "What to run (all = tune, final, report)."
)
_LIST = flags.DEFINE_bool("list_cells", False, "Print the stage's cells (index, state, workdir).")
_CELL = flags.DEFINE_integer("cell_index", None, "Run only this cell of the stage (a job array).")
_CELL_ENV = flags.DEFINE_string(
    "cell_index_env",
    None,
    "Read --cell_index from this environment variable (a job array's task index, e.g. "
    "SLURM_ARRAY_TASK_ID; indices count from 0, so submit --array=0-<N-1>).",
)
_CELL_WORKDIR = flags.DEFINE_string(
    "cell_workdir",
    None,
    "With --cell_index: the workdir that cell must have (the --workers runner passes it, so a "
    "study file edited while it runs is refused instead of running the wrong cell).",
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    1,
    "Run the cells as this many parallel processes on this host (each one cell, as a job-array "
    "task would), stage by stage; 1 = one after another in this process.",
)
_XLA_CACHE = flags.DEFINE_bool(
    "xla_cache",
    True,
    "Share compiled programs between cells through a persistent compilation cache in "
    "DIR/xla_cache (unless JAX_COMPILATION_CACHE_DIR is set): seeds of one setting compile once.",
)
flags.mark_flags_as_required(["study", "workdir"])


def _list(study, root: str, stage: str) -> None:
    cells = runner.stage_cells(study, root, "all" if stage == "report" else stage)
    for i, c in enumerate(cells):
        status = runner.cell_status(c, root)
        print(f"{i}\t{c.stage}\t{c.arm}\t{c.point.name}\tseed{c.seed}\t{status}\t{c.workdir}")
    if stage == "all" and all(c.stage == "tune" for c in cells):
        print("(the final cells are known once every tune cell is finished)", file=sys.stderr)


XLA_CACHE_MAX_BYTES = 16 * 2**30


def _cell_index() -> int | None:
    """--cell_index, or the value of the variable --cell_index_env names."""
    name = _CELL_ENV.value
    if _WORKERS.value > 1 and (name or _CELL.value is not None):
        raise StudyError("--workers runs every cell; it does not combine with a cell index")
    if not name:
        return _CELL.value
    if _CELL.value is not None:
        raise StudyError("give --cell_index or --cell_index_env, not both")
    value = os.environ.get(name, "").strip()
    if not value:
        raise StudyError(
            f"--cell_index_env={name} but ${name} is not set (run this as a job-array task, or "
            "pass --cell_index)"
        )
    try:
        return int(value)
    except ValueError:
        raise StudyError(f"${name}={value!r} is not a cell index (an integer)") from None


def main(argv):
    logging.get_absl_handler().addFilter(QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    root = _WORKDIR.value
    if _XLA_CACHE.value and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
        # Cells running at once (workers, job-array tasks) share the cache: a size cap turns on
        # JAX's file lock around its reads and writes, so no process reads a half-written entry.
        if jax.config.jax_compilation_cache_max_size < 0:
            jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)
    try:
        cell_index = _cell_index()
        study = load_study(_STUDY.value)
        if _LIST.value:
            _list(study, root, _STAGE.value)
            return
        results = runner.run_study(
            study,
            root,
            stage=_STAGE.value,
            cell_index=cell_index,
            command=" ".join(["python -m spry_jax.study", *sys.argv[1:]]),
            workers=_WORKERS.value,
            study_path=_STUDY.value,
            worker_args=[] if _XLA_CACHE.value else ["--noxla_cache"],
            expect_workdir=_CELL_WORKDIR.value,
        )
    except UserError as e:  # StudyError, ConfigError, DataError, checkpoint and memory refusals
        print(f"spry_jax.study: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    if results is not None:
        logging.info("Wrote %s and %s", os.path.join(root, "results.json"), "report.md")


if __name__ == "__main__":
    app.run(main)
