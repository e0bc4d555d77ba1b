"""Command line: ``python -m spry_jax.study --study=experiments/studies/<name>.py --workdir=DIR``.

Runs the study's cells one after another in this process (finished cells are skipped, a killed
study resumes), then writes ``DIR/results.json``, ``DIR/report.md`` and the plots. On a cluster,
one cell per task::

    python -m spry_jax.study --study=S --workdir=D --stage=tune --list_cells    # N cells
    python -m spry_jax.study --study=S --workdir=D --stage=tune --cell_index=$I  # I < N
    python -m spry_jax.study --study=S --workdir=D --stage=final --list_cells   # after tune
    python -m spry_jax.study --study=S --workdir=D --stage=final --cell_index=$I
    python -m spry_jax.study --study=S --workdir=D --stage=report

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
from spry_jax.study.spec import load_study

_STUDY = flags.DEFINE_string("study", None, "Study file (experiments/studies/<name>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one workdir per cell under it.")
_STAGE = flags.DEFINE_enum(
    "stage", "all", ["all", "tune", "final", "report"], "What to run (all = tune, final, report)."
)
_LIST = flags.DEFINE_bool("list_cells", False, "Print the stage's cells (index, state, workdir).")
_CELL = flags.DEFINE_integer("cell_index", None, "Run only this cell of the stage (a job array).")
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


def main(argv):
    logging.get_absl_handler().addFilter(QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    root = _WORKDIR.value
    if _XLA_CACHE.value and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
    try:
        study = load_study(_STUDY.value)
        if _LIST.value:
            _list(study, root, _STAGE.value)
            return
        results = runner.run_study(
            study,
            root,
            stage=_STAGE.value,
            cell_index=_CELL.value,
            command=" ".join(["python -m spry_jax.study", *sys.argv[1:]]),
        )
    except UserError as e:  # StudyError, ConfigError, DataError, checkpoint and memory refusals
        print(f"spry_jax.study: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    if results is not None:
        logging.info("Wrote %s and %s", os.path.join(root, "results.json"), "report.md")


if __name__ == "__main__":
    app.run(main)
