"""Faults and user errors: one clear line, nothing silently wrong, nothing lost (issue 14)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from spry_jax import memory as memory_lib
from spry_jax import train
from spry_jax.checkpoint import CheckpointError
from spry_jax.errors import ConfigError, UserError
from tests.test_train import ROOT, _records, _smoke, _strip_times

_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's log prefix


def _cli(module, *args):
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    message = [ln for ln in out.stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
    message = [ln for ln in message if "Warning" not in ln and not ln.startswith("  warnings.")]
    message = [ln for ln in message if "cell/s" not in ln]  # the study's progress bar
    return out.returncode, message


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--config.data.alpha=-1"], r"data\.alpha must be a positive finite number, got -1"),
        (["--config.data.colums=1"], r"'data\.colums' is not a config field; did you mean "),
        (["--config.rouds=3"], r"'rouds' is not a config field; did you mean rounds\?"),
        (
            [
                "--config.data.name=jsonl",
                "--config.data.path=/no.jsonl",
                "--config.model.tokenizer=minilm",
            ],
            r"data\.path '/no\.jsonl' is not a file",
        ),
        (["--config.data.name=jsonl", "--config.data.path=/no.jsonl"], r"tokenizer 'tiny-bert'"),
    ],
)
def test_a_user_error_exits_2_with_one_line(tmp_path, args, expect):
    workdir = tmp_path / "w"
    rc, message = _cli(
        "spry_jax.main", "--config=experiments/smoke.py", f"--workdir={workdir}", *args
    )
    assert rc == 2, message
    assert len(message) == 1, message
    assert message[0].startswith("spry_jax.main: error: ")
    assert re.search(expect, message[0]), message[0]
    assert not workdir.exists()  # a refused start leaves nothing behind


def test_a_missing_config_file_is_named(tmp_path):
    rc, message = _cli("spry_jax.main", "--config=experiments/nope.py", f"--workdir={tmp_path}")
    assert rc == 2 and len(message) == 1, message
    assert "no such file 'experiments/nope.py'" in message[0]


def test_the_study_cli_exits_2_with_one_line_for_a_run_that_does_not_fit(tmp_path):
    study = tmp_path / "s.py"
    study.write_text(
        "from spry_jax.study import Arm, Study\n\n"
        "def get_study():\n"
        "    return Study(base='experiments/smoke.py', arms={'a': Arm()},\n"
        "                 overrides={'data.val_fraction': 0.25, 'memory.budget_gib': 1e-6},\n"
        "                 tune_seeds=(0,), seeds=(0,), rounds=1)\n"
    )
    rc, message = _cli("spry_jax.study", f"--study={study}", f"--workdir={tmp_path / 'out'}")
    assert rc == 2 and len(message) == 1, message
    assert message[0].startswith("spry_jax.study: error: Not enough memory")


def test_an_oversized_run_is_refused_before_round_0_with_the_estimate(tmp_path):
    cfg = _smoke(**{"memory.budget_gib": 1e-4})  # 105 KB: far below one client step
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match="Not enough memory") as e:
        train.train_and_evaluate(cfg, str(workdir))
    exp = train.build_experiment(cfg)
    step = memory_lib.experiment_step_memory(exp)
    frozen = sum(np.asarray(x).nbytes for x in jax.tree.leaves(exp.model.frozen))
    per_client = (step["peak_bytes"] - frozen) / 2**30
    msg = str(e.value)
    assert f"{cfg.clients_per_round} client(s) at once x {per_client:.2f} GiB" in msg
    assert f"about {cfg.clients_per_round * per_client:.2f} GiB for the round" in msg
    assert "0.00 GiB available (memory.budget_gib)" in msg
    for knob in ("client.batch_size (8)", "data.max_length (16)", "clients_per_round (4)"):
        assert knob in msg
    assert "--config.memory.check=False" in msg
    assert not workdir.exists()  # no litter (item 7)
    # An existing empty workdir is left empty too, and the check can be switched off.
    workdir.mkdir()
    with pytest.raises(ConfigError):
        train.train_and_evaluate(cfg, str(workdir))
    assert os.listdir(workdir) == []


def test_client_chunks_lower_the_round_estimate_to_the_chunk():
    """round.client_chunk = C: the round holds C client steps at a time, and says so."""
    cfg = _smoke(**{"memory.budget_gib": 1e-4, "round.backend": "vmap", "round.client_chunk": 2})
    exp = train.build_experiment(cfg)
    assert exp.spec.client_chunk == 2 and exp.spec.num_slots == 4
    assert memory_lib.clients_at_once(exp) == 2
    with pytest.raises(ConfigError, match=r"2 client\(s\) at once") as e:
        memory_lib.check_round_memory(exp, memory_lib.experiment_step_memory(exp))
    assert "round.client_chunk, now 2" in str(e.value)


def test_host_available_memory_is_memavailable_or_the_cgroup_room():
    available, source = memory_lib.host_available_bytes()
    with open("/proc/meminfo") as f:
        meminfo = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
    assert source in ("MemAvailable", "cgroup memory.max", "cgroup v1 limit")
    # Both are read at slightly different times; the figure is at most MemAvailable (+ noise).
    assert 0 < available <= meminfo["MemAvailable"] * 1.05


def _blobs(step_dir):
    files = []
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        files += [os.path.join(root, n) for n in names if os.sep + "d" in root]
    return sorted(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    """An uninterrupted 3-round run with a checkpoint after every round."""
    ref = tmp_path_factory.mktemp("ref")
    cfg = _smoke(rounds=3, keep_checkpoints=3)
    train.train_and_evaluate(cfg, str(ref))
    with open(ref / "summary.json") as f:
        summary = json.load(f)
    return cfg, [_strip_times(r) for r in _records(ref)], summary


def _run_copy(tmp_path, cfg):
    train.train_and_evaluate(cfg, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        return [_strip_times(r) for r in _records(tmp_path)], json.load(f)


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_step(tmp_path, three_rounds):
    cfg, want_records, want_summary = three_rounds
    train.train_and_evaluate(cfg, str(tmp_path))
    # Truncate the largest array blob of the newest step (OUT_OF_RANGE on read).
    blob = _blobs(tmp_path / "checkpoints" / "3")[-1]
    with open(blob, "r+b") as f:
        f.truncate(os.path.getsize(blob) // 2)
    records, summary = _run_copy(tmp_path, cfg)
    assert records == want_records  # round 2 rerun from step 2, bit for bit
    assert summary["final"] == want_summary["final"]
    aside = os.listdir(tmp_path / "corrupt_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("3-")  # set aside, never deleted
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]
    # A torn identity file of the (new) newest step: the same fallback.
    ident = tmp_path / "checkpoints" / "3" / "identity" / "metadata"
    ident.write_text(ident.read_text()[:40])
    records, summary = _run_copy(tmp_path, cfg)
    assert records == want_records
    assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 2
    # Every step corrupt: refused in one line naming the directory; nothing moved.
    for step in ("1", "2", "3"):
        ident = tmp_path / "checkpoints" / step / "identity" / "metadata"
        ident.write_text("{")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .*checkpoints restores \(step 3"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]


def test_a_deleted_metrics_file_is_refused_and_the_record_survives(tmp_path, three_rounds):
    cfg, want_records, want_summary = three_rounds
    train.train_and_evaluate(cfg, str(tmp_path))
    summary_before = (tmp_path / "summary.json").read_bytes()
    config_mtime = os.stat(tmp_path / "config.json").st_mtime_ns
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.unlink()
    with pytest.raises(UserError, match=r"metrics.jsonl lacks rounds 0..2 \(3 of the 3"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert (tmp_path / "summary.json").read_bytes() == summary_before
    # A partial file (round 1 lost) is refused the same way.
    lines = kept.splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[2])
    with pytest.raises(UserError, match=r"lacks rounds 1 \(1 of the 3"):
        train.train_and_evaluate(cfg, str(tmp_path))
    metrics.write_text(kept)
    # A rerun with an evaluation switched off keeps the figures summary.json had.
    off = _smoke(rounds=3, keep_checkpoints=3, eval_all_clients=False)
    train.train_and_evaluate(off, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        after = json.load(f)
    assert after["final"] == want_summary["final"]
    assert after["train/loss"] == want_summary["train/loss"]
    assert [_strip_times(r) for r in _records(tmp_path)] == want_records
    # config.json is rewritten only when a resumable field changed (eval_all_clients here).
    assert os.stat(tmp_path / "config.json").st_mtime_ns != config_mtime
    mtime = os.stat(tmp_path / "config.json").st_mtime_ns
    train.train_and_evaluate(off, str(tmp_path))
    assert os.stat(tmp_path / "config.json").st_mtime_ns == mtime


def test_a_split_column_is_a_heldout_set_scored_after_the_last_round(tmp_path):
    # Pre-tokenised data is only synthetic, so this uses a local file and the real tokenizer.
    pytest.importorskip("tokenizers")
    rows = []
    rng = np.random.default_rng(0)
    for i in range(96):
        y = int(rng.integers(2))
        word = "good" if y else "bad"
        rows.append(
            {"text": f"{word} film {i}", "label": y, "split": "test" if i % 4 == 0 else "train"}
        )
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _smoke(
        **{
            "data.name": "jsonl",
            "data.path": str(path),
            "model.tokenizer": "minilm",
            "model.overrides": {"vocab_size": 30522},
            "rounds": 1,
            "num_clients": 4,
            "clients_per_round": 2,
            "data.max_length": 16,
        }
    )
    summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
    final = summary["final"]
    assert final["eval/heldout_examples"] == 24.0
    exp = train.build_experiment(cfg)
    assert len(exp.fed.heldout["labels"]) == 24
    held_labels = np.asarray(exp.fed.heldout["labels"])
    want_majority = np.bincount(held_labels).max() / len(held_labels)
    assert final["eval/heldout_majority_accuracy"] == pytest.approx(want_majority)
    assert 0.0 <= final["eval/heldout_accuracy"] <= 1.0
    # No test row reached a client.
    pooled = np.concatenate([np.r_[tr, te] for tr, te in exp.fed.client_examples])
    assert not np.isin(pooled, np.flatnonzero(exp.fed.dataset.heldout)).any()
