"""Benchmarks: memory from shapes, round throughput and scaling, gradient fidelity.

Each runs as ``python -m spry_jax.bench.memory|throughput|fidelity`` from the repository root.
Importing a benchmark changes nothing in the process: XLA flags are set by the command-line
entry only (:func:`use_memory_scheduler`), before JAX starts its backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_ROW = "ROW "

MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def use_memory_scheduler() -> str:
    """Adds XLA's memory-optimising CPU scheduler to ``XLA_FLAGS`` unless a scheduler is
    already named, and returns the flags. How memory is measured here: the default CPU
    scheduler keeps buffers alive far longer than needed, so estimates from it say little.

    Call it first thing in a command-line entry: XLA reads its flags once, when JAX starts
    its backend.

    Raises:
      RuntimeError: the backend has already started without a scheduler flag (the flag would
        be silently ignored); set ``XLA_FLAGS`` before starting Python instead.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_scheduler_type" in flags:
        return flags
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "JAX's backend started before the memory scheduler flag was set; run with "
            f"XLA_FLAGS={MEMORY_SCHEDULER_FLAG} in the environment."
        )
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    return os.environ["XLA_FLAGS"]


def run_row(code: str, env: dict[str, str], what: str) -> dict[str, Any]:
    """Runs ``code`` in a fresh interpreter with ``env`` and returns the JSON it printed after
    ``"ROW "`` (the benchmarks that need fresh process state -- XLA flags, peak RSS -- use it).

    Raises:
      RuntimeError: the subprocess failed or printed no row; ``what`` names the measurement.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    rows = [x for x in proc.stdout.splitlines() if x.startswith(_ROW)]
    if proc.returncode or not rows:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(rows[0][len(_ROW) :])
