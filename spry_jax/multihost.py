"""Several processes, one program: ``jax.distributed`` set-up and who writes the run's files.

Every process runs the same round program over the global device mesh (the client axis spans
all processes' devices), builds the same data from the same seed, and takes part in every
checkpoint (orbax coordinates the processes: each writes the shards it holds, the primary
process the metadata, and the step directory is committed once all have finished). Only the
primary process (``jax.process_index() == 0``) writes ``config.json``, ``metrics.jsonl``,
TensorBoard events, plots and ``summary.json``.
"""

from __future__ import annotations

import os

import jax

# Used when the corresponding argument is not given; ``JAX_COORDINATOR_ADDRESS`` is read by
# ``jax.distributed.initialize`` itself. Without them JAX auto-detects a cluster (Slurm, Open MPI,
# Cloud TPU, Kubernetes).
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> None:
    """Calls ``jax.distributed.initialize`` with the given values, falling back to
    ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID``; what is still
    unset is auto-detected by JAX from the cluster environment.

    Raises:
      ValueError: an inconsistent set (a process id outside ``0..num_processes-1``).
    """
    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes="
            f"{num_processes})"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def is_primary() -> bool:
    """True on the process that writes the run's files (process 0; always, in one process)."""
    return jax.process_index() == 0
