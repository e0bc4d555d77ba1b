"""SIGKILL during and between checkpoint writes, then the same command again: the run resumes
and every later metric equals an uninterrupted run's, bit for bit."""

import json
import os
import subprocess
import sys

import pytest

from tests.xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config=experiments/smoke.py",
    "--config.rounds=3",
    "--config.round.backend=vmap",
    "--config.log_memory=False",
]


def _run(workdir, fault=None):
    env = {**os.environ, "XLA_FLAGS": with_fast_compile()}
    env.pop("SPRY_JAX_FAULT", None)
    if fault:
        env["SPRY_JAX_FAULT"] = fault
    cmd = [sys.executable, "-m", "spry_jax.main", *ARGS, f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "train/examples_per_s"}
        for r in recs
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = _run(workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    return _metrics(workdir)


@pytest.mark.parametrize("fault", ["during_checkpoint:2", "after_checkpoint:2"])
def test_sigkill_then_rerun_resumes_bitwise(tmp_path, reference, fault):
    killed = _run(tmp_path, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.exists(tmp_path / "checkpoints" / "1")
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _metrics(tmp_path) == reference
    steps = sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps == ["2", "3"]
