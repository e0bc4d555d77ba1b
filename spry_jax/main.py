"""Command line: ``python -m spry_jax.main --config=experiments/<name>.py --workdir=DIR``.

Any config field can be overridden with ``--config.KEY=VALUE``; a config file may take a
variant after a colon (``--config=experiments/quickstart.py:local``). Rerunning the same command
resumes from the last checkpoint in ``DIR``.

Several processes (hosts): run the same command in each with ``--multihost`` and, unless the
cluster is auto-detected (Slurm, Open MPI, Cloud TPU, Kubernetes), ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); see :mod:`spry_jax.multihost`.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from spry_jax import multihost, reporting, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (one process per host)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0's coordinator (--multihost; default $JAX_COORDINATOR_ADDRESS, "
    "else auto-detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (--multihost; default $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (--multihost; default $JAX_PROCESS_ID)."
)
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids", None, "Devices this process uses (--multihost; default all local)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        multihost.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None,
        )
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICES)):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --multihost")
    logging.info(
        "process %d of %d; devices: %d local, %d in all: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Done: %s", summary)
    table = reporting.final_table(summary, _CONFIG.value.report.reference)
    if table and multihost.is_primary():
        print(table, flush=True)


if __name__ == "__main__":
    app.run(main)
