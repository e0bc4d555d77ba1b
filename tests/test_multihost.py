"""Several processes, one run: 2 processes x 4 CPU devices on localhost (``jax.distributed``
with JAX's CPU collectives, gloo) against one process with 8 devices.

The same command line (``python -m spry_jax.main --multihost --coordinator_address=...
--num_processes=2 --process_id=I``) must give the same losses, evaluation figures and final
weights bit for bit, in both communication modes; only process 0 writes the run's files; and a
2-process run killed with SIGKILL while a checkpoint is being written resumes bit for bit.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 3
ARGS = [
    "--config=experiments/smoke.py",
    f"--config.rounds={ROUNDS}",
    "--config.clients_per_round=8",  # every device, on both processes, gets a real client
    "--config.log_memory=False",
]
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, fault: str | None) -> dict[str, str]:
    flags = with_fast_compile(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "XLA_FLAGS": flags}
    env.pop("SPRY_JAX_FAULT", None)
    if fault:
        env["SPRY_JAX_FAULT"] = fault
    return env


def _run(workdir, mode: str, processes: int, fault: str | None = None) -> list[int]:
    """Runs the smoke config in ``processes`` processes with ``8 / processes`` CPU devices each;
    returns their exit codes (process 0 first)."""
    cmd = [
        sys.executable,
        "-m",
        "spry_jax.main",
        *ARGS,
        f"--config.comm_mode={mode}",
        f"--workdir={workdir}",
    ]
    if processes == 1:
        out = subprocess.run(
            cmd, cwd=ROOT, env=_env(8, fault), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert out.returncode in (0, -9), out.stderr[-3000:]
        return [out.returncode]
    port = _free_port()
    procs = []
    logs = []
    for i in range(processes):
        log = open(os.path.join(workdir, f"process{i}.log"), "w")  # noqa: SIM115
        logs.append(log)
        flags = [
            "--multihost",
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={processes}",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                cmd + flags,
                cwd=ROOT,
                env=_env(8 // processes, fault),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if fault is None:
        for i, c in enumerate(codes):
            with open(os.path.join(workdir, f"process{i}.log")) as f:
                assert c == 0, f"process {i} exited {c}:\n{f.read()[-3000:]}"
    return codes


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "train/examples_per_s"}
        for r in recs
    ]


def _final(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)["final"]


def _weights(workdir) -> dict[str, np.ndarray]:
    """The trainable weights of the last checkpoint, read with orbax alone (no template)."""
    path = os.path.join(workdir, "checkpoints", str(ROUNDS), "state")
    reader = ocp.PyTreeCheckpointer()
    # As numpy arrays: the saved shardings name the writer's devices, not this process's.
    tree = reader.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return dict(state["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(mode)`` -> (single-process workdir, 2-process workdir), each run once per module."""
    done = {}

    def get(mode):
        if mode not in done:
            one = tmp_path_factory.mktemp(f"one_{mode}")
            two = tmp_path_factory.mktemp(f"two_{mode}")
            _run(one, mode, 1)
            _run(two, mode, 2)
            done[mode] = one, two
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["per_epoch", "per_iteration"])
def test_two_processes_equal_one_process_bitwise(runs, mode):
    one, two = runs(mode)
    a, b = _metrics(one), _metrics(two)
    assert [r["round"] for r in b] == list(range(ROUNDS))
    assert "eval/generalized_accuracy" in b[0] and "eval/personalized_loss" in b[-1]
    assert a == b
    assert _final(one) == _final(two)
    assert "eval/all_clients_accuracy" in _final(two)
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_only_process_zero_writes_the_run_files(runs):
    _, two = runs("per_epoch")
    # Two writers would append every round twice and leave two TensorBoard event files.
    assert [r["round"] for r in _metrics(two)] == list(range(ROUNDS))
    events = os.listdir(os.path.join(two, "tensorboard"))
    assert len(events) == 1, events
    for name in ("config.json", "summary.json", "curves.png"):
        assert os.path.exists(os.path.join(two, name)), name
    # Both processes ran the whole thing and reached the end.
    for i in (0, 1):
        with open(os.path.join(two, f"process{i}.log")) as f:
            log = f.read()
        assert f"process {i} of 2; devices: 4 local, 8 in all" in log
        assert "Done:" in log


def test_two_processes_sigkilled_mid_checkpoint_resume_bitwise(runs, tmp_path):
    mode = "per_epoch"
    _, two = runs(mode)
    codes = _run(tmp_path, mode, 2, fault="during_checkpoint:2")
    assert codes == [-9, -9], codes
    assert os.path.exists(tmp_path / "checkpoints" / "1")
    assert not os.path.exists(tmp_path / "summary.json")
    _run(tmp_path, mode, 2)
    assert _metrics(tmp_path) == _metrics(two)
    assert _final(tmp_path) == _final(two)
    wa, wb = _weights(two), _weights(tmp_path)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    with open(os.path.join(tmp_path, "process0.log")) as f:
        assert "Resumed from the checkpoint after round" in f.read()
