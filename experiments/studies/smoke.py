"""Smoke study: the smoke model, Spry against FedAvg, two learning rates each, two rounds.

    python -m spry_jax.study --study=experiments/studies/smoke.py --workdir=/tmp/spry_study

Four tuning runs (2 arms x 2 client learning rates, seed 0), the learning rate chosen per arm on
the validation split (a quarter of each client's local training examples), then the chosen
setting with seeds 0 and 1; seed 0 is the tuning run itself (same config), so six runs in all,
a few minutes on one CPU core (most of it compiling). Two final seeds keep it small: real
studies use at least three. Expected: DIR/results.json, DIR/report.md, DIR/accuracy.png and
DIR/curves.png, accuracies near chance (two rounds of a random model on synthetic data).
"""

from spry_jax.study import Arm, Claim, Study


def get_study():
    lrs = [1e-3, 1e-2]
    return Study(
        base="experiments/smoke.py",
        overrides={
            "data.val_fraction": 0.25,
            # One program on any number of devices, so the numbers do not depend on the host.
            "round.backend": "vmap",
        },
        arms={
            "spry": Arm({"method": "spry"}, grid={"client.lr": lrs}),
            "fedavg": Arm({"method": "fedavg"}, grid={"client.lr": lrs}),
        },
        tune_seeds=(0,),
        seeds=(0, 1),
        rounds=2,
        pairs=[("spry", "fedavg")],
        claims=[
            Claim("FedAvg (backprop) beats Spry on the smoke task", "fedavg", "spry", ">"),
        ],
    )
