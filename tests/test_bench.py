"""Benchmarks: memory rows from a lowered tiny model, fidelity helpers, throughput timing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from spry_jax import models
from spry_jax.bench import fidelity, memory, throughput
from spry_jax.core import units as units_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_FIELDS = {
    "model", "method", "batch", "seq", "base_dtype", "peak_bytes", "argument_bytes",
    "temp_bytes", "output_bytes", "alias_bytes", "floor_bytes", "peak_over_floor",
}  # fmt: skip

# tiny-bert at 128 tokens is activation-dominated: backprop's stored activations (attention
# scores [8, 4, 128, 128] per layer) dwarf the 0.1 MB of weights.
TINY = dict(num_hidden_layers=2)


def test_memory_rows_forward_below_backprop():
    # FedMeZO's step is forward passes only; backprop stores every layer's activations.
    rows = {
        m: memory.analyse("tiny-bert", m, seq=128, overrides=TINY) for m in ("fedmezo", "fedavg")
    }
    for method, row in rows.items():
        assert ROW_FIELDS <= set(row) and row["scope"] == "client_step"
        assert (row["model"], row["method"], row["batch"], row["seq"]) == (
            "tiny-bert", method, 8, 128,
        )  # fmt: skip
        assert row["base_dtype"] == "float32"
        parts = row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"]
        assert row["peak_bytes"] == parts - row["alias_bytes"]
        # Arguments are exactly trainable + frozen + batch + masks, step mask and key.
        assert row["argument_bytes"] >= row["frozen_bytes"] + row["trainable_bytes"]
        assert row["peak_bytes"] >= row["frozen_bytes"] + row["trainable_bytes"]
    assert rows["fedmezo"]["peak_bytes"] < rows["fedavg"]["peak_bytes"]
    assert rows["fedmezo"]["temp_bytes"] < rows["fedavg"]["temp_bytes"]
    table = memory.markdown_table(list(rows.values()))
    assert "| tiny-bert | client_step | fedavg |" in table and "1.00x" in table


def test_floor_by_hand():
    s = memory.setting_for("llama2-7b")
    assert (s.batch, s.seq, s.quant, s.task) == (8, 64, "int4", "classification")
    assert memory.setting_for("opt-13b").seq == 384
    # llama2-7b, int4 base: the largest activation is the dequantised FFN kernel 4096 x 11008.
    assert memory.largest_activation_bytes("llama2-7b", s) == 4 * 4096 * 11008
    # bert-large, float32, 8 x 64: the FFN hidden [8, 64, 4096].
    assert memory.largest_activation_bytes("bert-large", memory.setting_for("bert-large")) == (
        4 * 8 * 64 * 4096
    )


def test_abstract_split_model_holds_no_arrays():
    model = memory.abstract_split_model("roberta-large", memory.setting_for("roberta-large"))
    leaves = jax.tree.leaves((model.trainable, model.frozen))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    # LoRA r=1 on query/value of 24 layers (2 * 24 * (1024 + 1024)) + the RoBERTa head.
    lora = sum(int(np.prod(v.shape)) for k, v in model.trainable.items() if "lora" in k)
    assert lora == 2 * 24 * 2048


def test_cosine_and_spry_round_by_hand():
    a = {"x": jnp.array([1.0, 0.0]), "y": jnp.array([0.0])}
    b = {"x": jnp.array([1.0, 1.0]), "y": jnp.array([1.0])}
    assert np.isclose(float(fidelity.cosine(a, b)), 1 / np.sqrt(3))
    assert np.isclose(float(fidelity.cosine(a, b, {"x": 1.0, "y": 0.0})), 1 / np.sqrt(2))
    # Estimator that returns its mask: each unit is held by exactly one of M <= G clients.
    params = {f"k{i}": jnp.ones((3,)) for i in range(6)}
    units = units_lib.make_units(tuple(sorted(params)), 2, peft_method="lora")
    est, clients, count = fidelity.spry_round(
        lambda p, m, k: {n: m[n] * p[n] for n in p}, params, units, 2, jax.random.PRNGKey(0)
    )
    assert all(float(c) == 1.0 for c in count.values())
    assert all(np.allclose(v, 1.0) for v in est.values())
    assert sum(float(sum(m.values())) for m, _ in clients) == 6


def test_fidelity_split_beats_no_split_on_tiny_model():
    model = models.make_split_model(
        dict(name="tiny-bert", pretrained=False, dropout=0.0),
        dict(method="lora", lora_rank=2, lora_alpha=2.0, lora_dropout=0.0, target_modules=[]),
        num_labels=2,
    )
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(4, 128, (8, 16)), jnp.int32),
        "attention_mask": jnp.ones((8, 16), jnp.int32),
        "labels": jnp.asarray([0, 1] * 4, jnp.int32),
        "example_mask": jnp.ones((8,), jnp.float32),
    }
    r = fidelity.run(model, batch, ks=[64], ms=[1, 5], repeats=3, m_for_k=5)
    (k64,) = r["vs_k"]
    # A unit here is LoRA A [32, 2] + B [2, 32] (128 weights): K = 64 Gaussian directions
    # give E[cos] ~ sqrt(64 / (64 + 128)) = 0.58 on it, far above the unsplit estimate's.
    assert 0.4 < k64["spry_per_client"] < 0.8
    assert k64["spry_per_client"] > 1.5 * k64["fedfgd"]
    assert r["vs_m"][1]["spry_per_client"] > r["vs_m"][0]["spry_per_client"]


def test_throughput_program_and_loop_time_the_same_round():
    r = throughput.compare_backends(2, repeats=1)
    for backend in ("program", "loop"):
        t = r[backend]
        assert t["round_s"] > 0 and t["first_s"] > 0 and t["num_steps"] >= 1
        assert np.isclose(t["clients_per_s"], 2 / t["round_s"])
    assert np.isclose(r["loop_over_program"], r["loop"]["round_s"] / r["program"]["round_s"])


_IMPORT_PROBE = """
import os
os.environ.pop("XLA_FLAGS", None)
import spry_jax.bench.fidelity, spry_jax.bench.memory, spry_jax.bench.throughput
assert "XLA_FLAGS" not in os.environ, os.environ["XLA_FLAGS"]
from spry_jax.bench import MEMORY_SCHEDULER_FLAG, use_memory_scheduler
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
flags = use_memory_scheduler()
assert flags == "--xla_force_host_platform_device_count=2 " + MEMORY_SCHEDULER_FLAG, flags
assert use_memory_scheduler() == flags  # a scheduler already named: unchanged
import jax
assert jax.device_count() == 2  # the flags set before the backend started are in force
os.environ["XLA_FLAGS"] = ""
try:
    use_memory_scheduler()
except RuntimeError as e:
    assert "XLA_FLAGS=" in str(e)
else:
    raise AssertionError("a flag set after the backend started must be refused")
print("OK")
"""


def test_benchmarks_set_xla_flags_only_from_their_entry():
    """Importing a benchmark leaves XLA_FLAGS alone; the CLI's helper adds the scheduler
    before JAX starts and refuses once the backend runs (the flag would be ignored)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


def test_torch_step_script_times_both_sides_of_the_same_trainable_weights(tmp_path):
    """scripts/bench_torch_step.py on tiny-bert: one fresh process per (side, method), both
    sides train the same number of weights (LoRA r=1 on every query/value + the classifier),
    our FLOPs come from XLA, and the ratio table is filled."""
    import json
    import os

    out = tmp_path / "steps.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [
            sys.executable,
            os.path.join(root, "scripts", "bench_torch_step.py"),
            "--models=tiny-bert",
            "--iters=2",
            "--warmup=1",
            "--seq=16",
            f"--out={out}",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    result = json.loads(out.read_text())
    rows = {(r["side"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("jax", "torch") for m in ("spry", "fedavg")}
    for method in ("spry", "fedavg"):
        assert rows[("jax", method)]["trainable"] == rows[("torch", method)]["trainable"] > 0
        assert rows[("jax", method)]["flops"] > 0
        assert all(r["step_s"] > 0 for r in rows.values())
    (ratio,) = result["ratios"]
    assert set(ratio) == {
        "model",
        "spry_ours_over_torch",
        "fedavg_ours_over_torch",
        "spry_over_backprop_ours",
    }


def test_random_bits_bench_times_every_mask_scheme_of_the_same_step(capsys):
    """The four builds differ only in their masks: same step, rows filled, shares computed from
    the medians (the hashed masks' speed is a benchmark figure, not asserted here)."""
    from spry_jax.bench import random_bits as bench_bits

    (r,) = bench_bits.main(
        ["--models=tiny-bert", "--methods=spry", "--batch=2", "--seq=8", "--warmup=1", "--iters=2"]
    )
    med = r["median_s"]
    assert set(med) == {*bench_bits.ROWS, "tangent draw"}
    assert all(len(r["times_s"][k]) == 2 for k in med)
    floor = med["no dropout"]
    assert r["mask_share"]["hash"] == (med["hash"] - floor) / med["hash"]
    assert r["hash_over_threefry"] == med["hash"] / med["threefry"]
    assert "| tiny-bert | spry |" in capsys.readouterr().out


def test_static_tangents_bench_compares_each_slot_of_the_dealing(capsys):
    """tiny BERT, M = 3 of G = 5 units: slots 0 and 1 hold a layer-0 unit (the full jvp), slot 2
    only layer 1's query, so its branch costs fewer FLOPs; ratios from the medians."""
    from spry_jax.bench import static_tangents as bench_static

    r = bench_static.main(
        ["--model=tiny-bert", "--clients=3", "--batch=2", "--seq=8", "--warmup=1", "--iters=2"]
    )
    assert (r["units"], r["branches"]) == (5, 3)
    assert [s["lowest_layer"] for s in r["slots"]] == [0, 0, 1]
    assert [s["flops_ratio"] for s in r["slots"]][:2] == [1.0, 1.0]
    assert 0 < r["slots"][2]["flops_ratio"] < 0.9
    for s in r["slots"]:
        m = s["median_s"]
        assert s["time_ratio"] == m["static"] / m["runtime mask"]
    assert "| mean |" in capsys.readouterr().out


def test_device_step_bench_runs_each_row_in_its_own_process_on_random_weights(capsys):
    """The GPU script's step rows, on the CPU with the tiny BERT: every row times a real step on
    weights drawn from the model's shapes; a CPU has no device peak, so host RSS is reported and
    labelled; XLA's estimate of the same step sits beside it."""
    from spry_jax.bench import device_step

    rows = device_step.main(
        ["--models=tiny-bert", "--methods=spry,fedavg", "--dtype=float32", "--batch=2", "--seq=8"]
        + ["--warmup=1", "--iters=2"]
    )
    assert [(r["model"], r["method"]) for r in rows] == [
        ("tiny-bert", "spry"),
        ("tiny-bert", "fedavg"),
    ]
    for r in rows:
        assert len(r["times_s"]) == 2 and r["step_ms"] > 0 and r["xla_peak_bytes"] > 0
        assert r["measured"] == "host RSS" and r["measured_peak_bytes"] is None
        assert r["host_rss_bytes"] > 0
    assert "(host RSS)" in capsys.readouterr().out
    # Random weights follow the shapes and dtypes; integer codes use every bit pattern.
    tree = {
        "w": jax.ShapeDtypeStruct((64, 8), jnp.bfloat16),
        "codes": jax.ShapeDtypeStruct((4096,), jnp.uint8),
    }
    drawn = device_step.random_like(tree, jax.random.PRNGKey(0))
    assert drawn["w"].dtype == jnp.bfloat16 and drawn["w"].shape == (64, 8)
    assert 0.01 < float(jnp.std(drawn["w"].astype(jnp.float32))) < 0.03
    assert len(np.unique(np.asarray(drawn["codes"]))) == 256


def test_device_round_bench_chunks_the_round_and_keeps_its_numbers(capsys):
    """The GPU script's chunked-round rows, on the CPU with the tiny BERT: each (M, C) row runs a
    whole round in its own process; chunking changes the program, not the round's numbers."""
    from spry_jax.bench import device_round

    rows = device_round.main(
        ["--model=tiny-bert", "--clients=4", "--chunks=0,2", "--dtype=float32"]
        + ["--batch=2", "--seq=8", "--steps=2", "--repeats=1"]
    )
    assert [(r["M"], r["C"]) for r in rows] == [(4, 0), (4, 2)]
    for r in rows:
        assert r["steps"] == 2 and r["batch"] == 2 and r["seq"] == 8
        assert len(r["times_s"]) == 1 and r["round_s"] > 0 and r["xla_peak_bytes"] > 0
        assert r["measured"] == "host RSS" and r["measured_peak_bytes"] is None
        assert np.isfinite(r["train_loss"])
    np.testing.assert_allclose(rows[1]["train_loss"], rows[0]["train_loss"], rtol=1e-5)
    out = capsys.readouterr().out
    assert "| all |" in out and "| 2 |" in out and "(host RSS)" in out


def test_gpu_bench_script_is_valid_bash_and_calls_existing_benchmarks():
    script = os.path.join(ROOT, "scripts", "gpu_bench.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    for module in (
        "spry_jax.bench.throughput",
        "spry_jax.bench.device_step",
        "spry_jax.bench.device_round",
    ):
        assert f"python -m {module}" in text
        assert importlib.util.find_spec(module) is not None
