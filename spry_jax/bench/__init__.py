"""Benchmarks: memory from shapes, round throughput and scaling, gradient fidelity."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_ROW = "ROW "


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
