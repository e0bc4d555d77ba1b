"""The study runner on experiments/studies/smoke.py: resume, validation-only selection, the
confidence intervals and the FLOP column, each against an independent computation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import filelock
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spry_jax import checkpoint as ckpt_lib
from spry_jax import train
from spry_jax.core.client import make_client_update
from spry_jax.study import (
    VALIDATION_KEYS,
    Arm,
    Study,
    StudyError,
    check_study,
    load_study,
    run_study,
    runner,
    select,
    stats,
    tune_cells,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "experiments/studies/smoke.py"


@pytest.fixture(scope="module", autouse=True)
def _at_repo_root():
    """Study files name their base config relative to the current directory, as --config."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, _at_repo_root):
    """One uninterrupted run of the smoke study, shared by the tests below.

    Under pytest-xdist the tests below land on several workers, and each used to run the whole
    study (~4 min on one core): now the first worker to get here runs it once for the session
    and every worker copies the finished tree, on which ``run_study`` runs no cell and returns
    the results (the resume test checks that a finished study reruns nothing).
    """
    root = str(tmp_path_factory.mktemp("study") / "smoke")
    study = load_study(SMOKE)
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return study, root, run_study(study, root, progress=False)
    shared = tmp_path_factory.getbasetemp().parent / "study_smoke"  # this session's, all workers
    with filelock.FileLock(f"{shared}.lock"):
        if not (shared / "results.json").exists():
            run_study(study, str(shared), progress=False)
    shutil.copytree(shared, root)
    ran: list[str] = []
    results = run_study(study, root, progress=False, on_cell_done=lambda c: ran.append(c.workdir))
    assert ran == [], ran
    return study, root, results


def _cell_config(root: str, workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(root, workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


# --- (a) killed mid-study and restarted ------------------------------------------------------


class _Killed(Exception):
    """Stands in for the process dying: raised right after a checkpoint is on disk."""


def test_interrupted_study_resumes_only_unfinished_cells_and_ends_identical(
    smoke, tmp_path, monkeypatch
):
    study, ref_root, _ = smoke
    root = str(tmp_path / "interrupted")
    cells = tune_cells(study)
    done: list[str] = []

    def fault(point: str, step: int) -> None:
        # Two cells finished: the third dies after its first round's checkpoint.
        if len(done) == 2 and point == "after_checkpoint" and step == 1:
            raise _Killed()

    monkeypatch.setattr(ckpt_lib, "_inject_fault", fault)
    with pytest.raises(_Killed):
        run_study(study, root, progress=False, on_cell_done=lambda c: done.append(c.workdir))
    status = [runner.cell_status(c, root) for c in cells]
    assert status == ["done", "done", "partial", "new"]
    killed = os.path.join(root, cells[2].workdir)
    assert sorted(os.listdir(os.path.join(killed, "checkpoints"))) == ["1"]
    with open(os.path.join(killed, "metrics.jsonl")) as f:
        round0 = f.readline()
    stamps = {
        c.workdir: os.stat(os.path.join(root, c.workdir, "summary.json")).st_mtime_ns
        for c in cells[:2]
    }

    monkeypatch.setattr(ckpt_lib, "_inject_fault", lambda point, step: None)
    ran: list[str] = []
    run_study(study, root, progress=False, on_cell_done=lambda c: ran.append(c.workdir))
    # Only the unfinished cells ran: the killed one, the untouched one, and the final seed 1.
    assert ran == [cells[2].workdir, cells[3].workdir, "final/spry/seed1", "final/fedavg/seed1"]
    for workdir, stamp in stamps.items():
        assert os.stat(os.path.join(root, workdir, "summary.json")).st_mtime_ns == stamp
    with open(os.path.join(killed, "metrics.jsonl")) as f:
        assert f.readline() == round0, "the killed cell must resume, not start over"
    for name in ("results.json", "report.md"):
        with open(os.path.join(root, name)) as a, open(os.path.join(ref_root, name)) as b:
            assert a.read() == b.read(), name
    # A rerun of a finished study runs nothing and rewrites the same results.
    ran.clear()
    run_study(study, root, progress=False, on_cell_done=lambda c: ran.append(c.workdir))
    assert ran == []


# --- (b) selection reads only the validation split --------------------------------------------


class _TestSplitTouched(AssertionError):
    pass


class _Poisoned(dict):
    """A summary (or its ``final`` record) on which reading any figure outside
    VALIDATION_KEYS -- any test-split figure above all -- fails the test."""

    ALLOWED = (*VALIDATION_KEYS, "final", "failed")

    def _check(self, key):
        if key not in self.ALLOWED:
            raise _TestSplitTouched(f"selection read {key!r}")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def _no_iteration(self, *args):
        raise _TestSplitTouched("selection iterated over a summary")

    __iter__ = keys = values = items = copy = _no_iteration


def _poison(summary: dict) -> _Poisoned:
    out = _Poisoned(summary)
    if "final" in summary:
        dict.__setitem__(out, "final", _Poisoned(summary["final"]))
    return out


def _adversarial(val_best: str):
    """Summaries where the point ``val_best`` is best on validation and worst on test."""

    def read(path: str) -> dict:
        best = os.path.basename(os.path.dirname(path)) == val_best
        final = {
            "eval/all_clients_val_accuracy": 0.9 if best else 0.6,
            "eval/all_clients_val_loss": 0.3 if best else 0.6,
            "eval/all_clients_accuracy": 0.1 if best else 0.99,
            "eval/all_clients_loss": 2.0 if best else 0.01,
        }
        return _poison({"final": final, "comm/up_bytes": 1.0})

    return read


def test_selection_reads_only_validation_figures(smoke, monkeypatch):
    study, root, results = smoke
    real = runner.read_summary
    monkeypatch.setattr(runner, "read_summary", lambda path: _poison(real(path)))
    chosen = select(study, root)  # raises _TestSplitTouched if a test figure is read
    assert {a: p.name for a, p in chosen.items()} == {
        a: r["chosen"]["point"] for a, r in results["arms"].items()
    }
    for r in results["arms"].values():
        # Best mean validation accuracy; ties to the lower validation loss, then the first.
        _, best = max(
            enumerate(r["grid"]), key=lambda t: (t[1]["val_accuracy"], -t[1]["val_loss"], -t[0])
        )
        assert r["chosen"]["point"] == best["point"]
    # Test figures that point the other way change nothing; validation decides.
    for val_best in ("client.lr=0.001", "client.lr=0.01"):
        monkeypatch.setattr(runner, "read_summary", _adversarial(val_best))
        assert {p.name for p in select(study, root).values()} == {val_best}


def test_val_evaluation_never_touches_the_test_split(smoke):
    study, root, _ = smoke
    exp = train.build_experiment(_cell_config(root, tune_cells(study)[0].workdir))

    class Forbidden(list):
        def __getitem__(self, i):
            raise _TestSplitTouched("the validation figure read a test-split example")

    real_test = exp.fed.test
    exp.fed.test = Forbidden(real_test)
    got = exp.evaluator.all_clients(exp.model.trainable, exp.model.frozen, split="val")
    # The same machinery pointed at the validation arrays as if they were the test split.
    exp.fed.test = exp.fed.val
    want = exp.evaluator.all_clients(exp.model.trainable, exp.model.frozen)
    assert got == {k.replace("all_clients_", "all_clients_val_"): v for k, v in want.items()}
    assert got["eval/all_clients_val_examples"] == sum(len(v["labels"]) for v in exp.fed.val)
    exp.fed.test = real_test


# --- (c) confidence intervals against a hand computation --------------------------------------


def test_ci_of_hand_made_numbers_equals_the_hand_computation():
    ci = stats.mean_ci([0.70, 0.72, 0.74])
    assert ci["n"] == 3
    assert ci["mean"] == pytest.approx(0.72, abs=1e-12)
    assert ci["sd"] == pytest.approx(0.02, abs=1e-12)
    assert stats.t_quantile_975(2) == pytest.approx(4.303, abs=5e-4)  # t_{0.975, 2}, 3 d.p.
    assert ci["half_width"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert ci["lo"] == pytest.approx(0.72 - ci["half_width"]) and ci["hi"] > ci["mean"]
    # Paired by seed: differences 0.02, 0.021, 0.019 (seed 9 is in one arm only), so mean
    # 0.02, sd 0.001, CI 0.02 +- 0.00248: above 0, around 0.02, below 0.03.
    d = stats.paired_difference({0: 0.72, 1: 0.741, 2: 0.709, 9: 0.0}, {0: 0.70, 1: 0.72, 2: 0.69})
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(0.02)
    assert d["half_width"] == pytest.approx(4.302653 * 0.001 / math.sqrt(3), rel=1e-6)
    assert stats.verdict(d, ">") == "reproduced" and stats.verdict(d, "<") == "contradicted"
    assert stats.verdict(d, ">", margin=0.02) == "not reproduced"
    assert stats.verdict(d, ">", margin=0.03) == "contradicted"
    assert stats.verdict(d, "<", margin=0.03) == "reproduced"
    wide = stats.paired_difference({0: 0.72, 1: 0.75, 2: 0.70}, {0: 0.70, 1: 0.72, 2: 0.69})
    assert wide["lo"] < 0 < wide["hi"] and stats.verdict(wide, ">") == "not reproduced"
    assert stats.verdict(stats.paired_difference({0: 1.0}, {0: 0.0}), ">") == "not reproduced"
    assert stats.mean_ci([0.5])["half_width"] is None


def test_t_quantiles_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in [*range(1, 61), 100, 1000]:
        assert stats.t_quantile_975(dof) == pytest.approx(
            scipy_stats.t.ppf(0.975, dof), abs=1e-6
        ), dof


# --- (d) the FLOP column is XLA's cost analysis of the step -----------------------------------


def test_flop_column_equals_xla_cost_analysis_of_the_client_step(smoke):
    study, root, results = smoke
    for arm, r in results["arms"].items():
        run = r["runs"][0]
        exp = train.build_experiment(_cell_config(root, run["workdir"]))
        # The client step compiled here from the round's own parts, not via spry_jax.memory.
        update = make_client_update(exp.spec.loss_fn, exp.spec.estimator, exp.spec.client_optimizer)
        mask = {k: jnp.float32(1.0) for k in exp.model.trainable}
        b = exp.config.client.batch_size
        batch = {
            k: jnp.asarray(np.resize(v, (1, b, *v.shape[1:]))) for k, v in exp.fed.train[0].items()
        }
        batch["example_mask"] = jnp.ones((1, b), jnp.float32)
        step = jax.jit(lambda p, f, x, key: update(p, f, mask, x, jnp.ones((1,)), key))
        compiled = step.lower(
            exp.model.trainable, exp.model.frozen, batch, jax.random.PRNGKey(0)
        ).compile()
        flops = compiled.cost_analysis()["flops"]
        assert flops > 0
        assert r["client_step_flops"] == run["client_step_flops"] == flops, arm
        with open(os.path.join(root, run["workdir"], "metrics.jsonl")) as f:
            steps = sum(json.loads(line)["train/steps"] for line in f)
        assert run["client_flops"] == pytest.approx(flops * steps, rel=1e-12)
        with open(os.path.join(root, "report.md")) as f:
            row = next(line for line in f if line.startswith(f"| {arm} |"))
        assert f"| {flops:.3g} |" in row


# --- outputs and user errors ----------------------------------------------------------------


def test_results_report_and_plots(smoke):
    study, root, results = smoke
    assert list(results["arms"]) == ["spry", "fedavg"]
    for arm, r in results["arms"].items():
        assert [g["point"] for g in r["grid"]] == ["client.lr=0.001", "client.lr=0.01"]
        assert all(set(t) == {"seed", *VALIDATION_KEYS} for g in r["grid"] for t in g["tune"])
        seeds = [run["seed"] for run in r["runs"]]
        assert seeds == [0, 1]
        # Seed 0 of the final runs is the tuning run itself (same config), seed 1 is new.
        assert r["runs"][0]["workdir"] == f"tune/{arm}/{r['chosen']['point']}/seed0"
        assert r["runs"][1]["workdir"] == f"final/{arm}/seed1"
        accs = [run["test_accuracy"] for run in r["runs"]]
        assert r["test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
        curves = r["runs"][1]["curves"]
        assert curves["round"] == [0, 1] and len(curves["train_loss"]) == 2
        assert curves["up_bytes_cum"][-1] == r["runs"][1]["up_bytes"]
        assert r["client_step_peak_bytes"] > 0
    (pair,) = results["pairs"]
    a = {run["seed"]: run["test_accuracy"] for run in results["arms"]["spry"]["runs"]}
    b = {run["seed"]: run["test_accuracy"] for run in results["arms"]["fedavg"]["runs"]}
    assert pair["mean"] == pytest.approx(np.mean([a[s] - b[s] for s in (0, 1)]))
    (claim,) = results["claims"]
    assert claim["verdict"] in stats.VERDICTS
    with open(os.path.join(root, "report.md")) as f:
        report = f.read()
    for heading in ("## Arms", "## Tuning (validation split only)", "## Claims", "## Runs"):
        assert heading in report
    assert claim["verdict"] in report
    for png in ("accuracy.png", "curves.png"):
        assert os.path.getsize(os.path.join(root, png)) > 1000


def test_a_changed_study_does_not_reuse_or_overwrite_a_cell(smoke, tmp_path):
    study, root, _ = smoke
    cell = tune_cells(study)[0]
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(root, cell.workdir), copy / cell.workdir)
    with open(copy / cell.workdir / "config.json") as f:
        cfg = json.load(f)
    cfg["client"]["lr"] = 0.5
    with open(copy / cell.workdir / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(StudyError, match="client.lr"):
        runner.cell_status(cell, str(copy))


def test_a_cell_another_process_is_running_is_refused(tmp_path):
    """Two processes writing one cell interleave its metrics.jsonl (seen when a study file was
    edited under running workers): the second is refused while the first holds the lock."""
    study = load_study(SMOKE)
    cell = tune_cells(study)[0]
    root = str(tmp_path)
    with runner.cell_lock(cell, root):
        with pytest.raises(StudyError, match="being run by another process"):
            runner.run_cell(cell, root)
        with pytest.raises(StudyError, match="being run by another process"):
            run_study(study, root, stage="tune", cell_index=0, progress=False)
    assert not os.path.exists(os.path.join(root, cell.workdir, "metrics.jsonl"))
    with runner.cell_lock(cell, root):  # released: it can be taken again
        pass


def test_a_worker_whose_cell_index_moved_is_refused(tmp_path):
    """A worker re-reads the study file; if it was edited (a grid point added), index i names
    another cell, and the worker must not run it."""
    study = load_study(SMOKE)
    cells = tune_cells(study)
    with pytest.raises(StudyError, match="the study file changed"):
        run_study(
            study,
            str(tmp_path),
            stage="tune",
            cell_index=0,
            progress=False,
            expect_workdir=cells[1].workdir,
        )
    assert not os.path.exists(tmp_path / cells[0].workdir)


def test_study_errors_name_the_fault():
    base = {"base": "experiments/smoke.py", "overrides": {"data.val_fraction": 0.25}}
    with pytest.raises(StudyError, match="unknown config key 'client.lrr'"):
        check_study(Study(**base, arms={"a": Arm(grid={"client.lrr": [1.0]})}))
    with pytest.raises(StudyError, match="unknown arm"):
        check_study(Study(**base, arms={"a": Arm()}, pairs=[("a", "b")]))
    with pytest.raises(StudyError, match="val_fraction is 0"):
        check_study(Study(base="experiments/smoke.py", arms={"a": Arm()}))
    with pytest.raises(StudyError, match="client.lr must be > 0"):
        check_study(Study(**base, arms={"a": Arm(grid={"client.lr": [-1.0]})}))
    with pytest.raises(StudyError, match="not found"):
        load_study("experiments/studies/missing.py")


def test_cli_exits_2_with_one_line_on_a_user_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from spry_jax.study import Arm, Study\n"
        "def get_study():\n"
        "    return Study(base='experiments/smoke.py', overrides={'data.val_fraction': 0.2},\n"
        "                 arms={'a': Arm({'clinet.lr': 1.0})})\n"
    )
    cmd = [sys.executable, "-m", "spry_jax.study", f"--study={bad}", f"--workdir={tmp_path}/w"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    expected = "spry_jax.study: error: arm 'a': unknown config key 'clinet.lr'"
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == expected
    assert [line for line in lines if line.startswith("spry_jax.study")] == [expected]


@pytest.mark.parametrize(
    "study_file",
    [
        "experiments/studies/smoke.py",
        "experiments/studies/spry_learns.py",
        "experiments/studies/spry_learns.py:long",
        "experiments/studies/spry_learns.py:long_seeds",
        "experiments/studies/spry_learns.py:wide",
        "experiments/studies/paper_cpu.py",
        "experiments/studies/paper_cpu.py:k",
        "experiments/studies/paper_cpu.py:clients",
        "experiments/studies/paper_cpu.py:peft",
        "experiments/studies/paper_cpu.py:comm",
        "experiments/studies/paper_gpu.py",
        "experiments/studies/paper_gpu.py:offline",
    ],
)
def test_every_shipped_study_cell_is_a_valid_config(study_file):
    """A typo in a study file (a method, a field, a value) must fail here, not hours into it."""
    from spry_jax.config import validate
    from spry_jax.study import runner as study_runner
    from spry_jax.study.spec import load_study

    study = load_study(study_file)
    cells = study_runner.tune_cells(study)
    assert cells
    for cell in cells:
        validate(cell.config)


# --- cells as independent processes: a job-array task, then parallel workers ------------------


def _without_timings(results: dict) -> dict:
    """results.json minus what differs between two executions of the same cells."""
    drop = ("time", "wall", "seconds", "command")

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not any(d in k for d in drop)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(results)


def test_job_array_task_and_two_parallel_workers_equal_the_in_process_study(smoke, tmp_path):
    study, ref_root, ref_results = smoke
    root = str(tmp_path / "parallel")
    base = [sys.executable, "-m", "spry_jax.study", f"--study={SMOKE}", f"--workdir={root}"]
    # One task of a job array: the cell index comes from the environment.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
    task = base + ["--stage=tune", "--cell_index_env=SLURM_ARRAY_TASK_ID"]
    out = subprocess.run(task, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = tune_cells(study)
    status = [runner.cell_status(c, root) for c in cells]
    assert status == ["new", "done", "new", "new"]
    # Two workers run the rest (cell 1 is skipped), stage by stage, then the report here.
    out = subprocess.run(
        base + ["--workers=2"], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logs = sorted(os.listdir(os.path.join(root, "logs")))
    assert logs == ["final-0.log", "final-1.log", "tune-0.log", "tune-2.log", "tune-3.log"]
    with open(os.path.join(root, "results.json")) as f:
        results = json.load(f)
    assert _without_timings(results) == _without_timings(json.loads(json.dumps(ref_results)))
    # Every cell's metrics, bit for bit (not only what results.json summarises).
    for cell in [*cells, *runner.final_cells(study, select(study, root))]:
        for name in ("metrics.jsonl",):
            with open(os.path.join(root, cell.workdir, name)) as f:
                got = [json.loads(line) for line in f]
            with open(os.path.join(ref_root, cell.workdir, name)) as f:
                want = [json.loads(line) for line in f]
            strip = lambda recs: [  # noqa: E731
                {k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}
                for r in recs
            ]
            assert strip(got) == strip(want), cell.workdir
    assert os.path.exists(os.path.join(root, "report.md"))


def test_cell_index_env_errors_exit_2_with_one_line(tmp_path):
    base = [sys.executable, "-m", "spry_jax.study", f"--study={SMOKE}", f"--workdir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "SPRY_TASK"}
    cases = [
        ([], "--cell_index_env=SPRY_TASK but $SPRY_TASK is not set"),
        (["--workers=2"], "--workers runs every cell; it does not combine with a cell index"),
    ]
    for extra, expected in cases:
        cmd = base + ["--stage=tune", "--cell_index_env=SPRY_TASK", *extra]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(f"spry_jax.study: error: {expected}")
