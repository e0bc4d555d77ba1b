"""Studies: grids of ordinary runs, hyper-parameters chosen per arm on a validation split, then
the chosen setting run with several seeds, summarised with 95 % confidence intervals.

    python -m spry_jax.study --study=experiments/studies/smoke.py --workdir=DIR

A study file defines ``get_study()`` returning a :class:`Study`::

    from spry_jax.study import Arm, Claim, Study

    def get_study():
        return Study(
            base="experiments/smoke.py",
            overrides={"data.val_fraction": 0.25},
            arms={
                "spry": Arm({"method": "spry"}, grid={"client.lr": [1e-3, 1e-2]}),
                "fedavg": Arm({"method": "fedavg"}, grid={"client.lr": [1e-3, 1e-2]}),
            },
            tune_seeds=(0,),
            seeds=(0, 1, 2),
            pairs=[("spry", "fedavg")],
            claims=[Claim("Spry < FedAvg", lhs="spry", rhs="fedavg", op="<")],
        )

Stage 1 (tune) runs every (arm, grid point, tune seed); the selection takes per arm the point
with the best mean ``eval/all_clients_val_accuracy`` and reads nothing else
(:data:`VALIDATION_KEYS`). Stage 2 (final) runs the chosen point with every final seed. Every
cell is an ordinary resumable run in its own workdir, so a killed study rerun skips finished
cells and resumes the rest. Outputs: ``DIR/results.json``, ``DIR/report.md``,
``DIR/accuracy.png``, ``DIR/curves.png``.
"""

from spry_jax.study.runner import (
    VALIDATION_KEYS,
    Cell,
    cell_status,
    choose_point,
    final_runs,
    run_study,
    select,
    stage_cells,
    tune_cells,
    validation_view,
)
from spry_jax.study.spec import Arm, Claim, Point, Study, StudyError, check_study, load_study

__all__ = [
    "VALIDATION_KEYS",
    "Arm",
    "Cell",
    "Claim",
    "Point",
    "Study",
    "StudyError",
    "cell_status",
    "check_study",
    "choose_point",
    "final_runs",
    "load_study",
    "run_study",
    "select",
    "stage_cells",
    "tune_cells",
    "validation_view",
]
