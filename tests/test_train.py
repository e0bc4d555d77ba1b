"""End to end: the CLI on the smoke config, resume equality, the NaN guard, config errors."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from experiments import smoke, squad_v2
from spry_jax import config as config_lib
from spry_jax import train
from spry_jax.checkpoint import CheckpointMismatchError
from spry_jax.core import client as C
from spry_jax.core import estimators as E
from spry_jax.core import round as R
from tests.xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(**overrides) -> ml_collections.ConfigDict:
    cfg = smoke.get_config()
    cfg.round.backend = "vmap"
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip_times(rec):
    return {
        k: v for k, v in rec.items() if not k.startswith("time/") and k != "train/examples_per_s"
    }


def test_cli_runs_two_rounds_of_spry_and_writes_the_contract_files(tmp_path):
    workdir = tmp_path / "smoke"
    env = {**os.environ, "XLA_FLAGS": with_fast_compile()}  # one CPU device, as a user runs it
    cmd = [
        sys.executable,
        "-m",
        "spry_jax.main",
        "--config=experiments/smoke.py",
        f"--workdir={workdir}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["method"] == "spry" and cfg["rounds"] == 2
    records = _records(workdir)
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        for key in (
            "train/loss",
            "time/round_s",
            "comm/up_bytes",
            "comm/down_bytes",
            "eval/generalized_accuracy",
            "eval/personalized_accuracy",
        ):
            assert key in r, key
        assert 0.0 <= r["eval/generalized_accuracy"] <= 1.0
        assert r["comm/up_bytes"] > 0 and r["comm/down_bytes"] > r["comm/up_bytes"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["rounds"] == 2 and "eval/generalized_accuracy" in summary["final"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]

    # Rerunning the same command resumes (nothing left to do) and does not lose metrics.
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["round"] for r in _records(workdir)] == [0, 1]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train.train_and_evaluate(_smoke(rounds=3), str(full))
    train.train_and_evaluate(_smoke(rounds=2), str(part))  # "interrupted" after round 1
    train.train_and_evaluate(_smoke(rounds=3), str(part))  # the same command again: resumes
    a, b = _records(full), _records(part)
    assert [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert _strip_times(ra) == _strip_times(rb)


def test_all_clients_eval_matches_a_per_example_recomputation(tmp_path):
    import numpy as np

    from spry_jax import checkpoint as ckpt_lib

    cfg = _smoke(rounds=1, eval_batch_size=7)  # 7 does not divide the test set: padding counts
    summary = train.train_and_evaluate(cfg, str(tmp_path))
    final = summary["final"]
    exp = train.build_experiment(cfg)
    manager = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), 2)
    state, _ = manager.restore_latest(exp.init_state(), train._identity(exp))
    correct = losses = count = 0
    for c in range(cfg.num_clients):  # one example at a time, plain numpy softmax
        t = exp.fed.test[c]
        for i in range(len(t["labels"])):
            logits = np.asarray(
                exp.model.apply_fn(
                    state.params,
                    exp.model.frozen,
                    t["input_ids"][i : i + 1],
                    t["attention_mask"][i : i + 1],
                    None,
                ),
                np.float64,
            )[0]
            y = int(t["labels"][i])
            correct += int(np.argmax(logits) == y)
            losses += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y]
            count += 1
    assert (
        final["eval/all_clients_examples"] == count == sum(len(t["labels"]) for t in exp.fed.test)
    )
    assert final["eval/all_clients_accuracy"] == pytest.approx(correct / count, abs=1e-9)
    assert final["eval/all_clients_loss"] == pytest.approx(losses / count, rel=1e-4)
    labels = np.concatenate([t["labels"] for t in exp.fed.test])
    counts = [int(np.sum(labels == y)) for y in np.unique(labels)]
    assert final["eval/all_clients_majority_accuracy"] == pytest.approx(max(counts) / count)


def _restore(exp, workdir):
    from spry_jax import checkpoint as ckpt_lib

    manager = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), 2)
    state, _ = manager.restore_latest(exp.init_state(), train._identity(exp))
    manager.close()
    return state


def _client_models(exp, state, clients):
    """Each client's model after its local training in round ``state.round``, one client at a
    time through the plain client update (not the round program)."""
    spec = exp.spec
    masks, keys = R._masks_and_keys(spec, jax.random.fold_in(state.rng, state.round))
    batches = exp.round_batches(int(state.round), clients)
    update = jax.jit(C.make_client_update(spec.loss_fn, spec.estimator, spec.client_optimizer))
    steps = batches["step_mask"].shape[1]
    inputs = E.EstimatorInputs(step=state.round * steps, guide=state.last_delta)
    models = []
    for i in range(len(clients)):
        res = update(
            state.params,
            exp.model.frozen,
            {k: m[i] for k, m in masks.items()},
            {k: v[i] for k, v in batches.items() if k != "step_mask"},
            batches["step_mask"][i],
            keys[i],
            inputs,
        )
        models.append(
            {k: np.asarray(state.params[k]) + np.asarray(res.delta[k]) for k in res.delta}
        )
    return models


def _accuracy_and_loss(exp, models, clients):
    """Example-weighted accuracy and mean loss of ``models[i]`` on client ``clients[i]``'s test
    split, one example at a time with a float64 numpy softmax."""
    correct = losses = count = 0
    for params, c in zip(models, clients, strict=True):
        t = exp.fed.test[c]
        for i in range(len(t["labels"])):
            logits = np.asarray(
                exp.model.apply_fn(
                    params,
                    exp.model.frozen,
                    t["input_ids"][i : i + 1],
                    t["attention_mask"][i : i + 1],
                    None,
                ),
                np.float64,
            )[0]
            y = int(t["labels"][i])
            correct += int(np.argmax(logits) == y)
            losses += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y]
            count += 1
    return correct / count, losses / count


def test_final_figures_are_of_the_final_model(tmp_path):
    cfg = _smoke(rounds=2, log_memory=False)
    summary = train.train_and_evaluate(cfg, str(tmp_path))
    final = summary["final"]
    exp = train.build_experiment(cfg)
    state = _restore(exp, tmp_path)
    assert int(state.round) == 2
    # The final model is evaluated as the round it would start next (round 2) does: on that
    # round's sampled clients, before (generalized) and after (personalized) local training.
    clients = exp.sample_clients(2)
    gen_acc, gen_loss = _accuracy_and_loss(exp, [state.params] * len(clients), clients)
    per_acc, per_loss = _accuracy_and_loss(exp, _client_models(exp, state, clients), clients)
    assert final["eval/generalized_accuracy"] == pytest.approx(gen_acc, abs=1e-9)
    assert final["eval/generalized_loss"] == pytest.approx(gen_loss, rel=1e-4)
    assert final["eval/personalized_accuracy"] == pytest.approx(per_acc, abs=1e-9)
    assert final["eval/personalized_loss"] == pytest.approx(per_loss, rel=1e-4)
    assert final["eval/model_after_rounds"] == 2
    # Per-round records measure the model each round starts from.
    assert [r["eval/model_after_rounds"] for r in _records(tmp_path)] == [0, 1]


_WORDS = (
    "red green blue river stone cloud north south quiet bright old young tall small warm".split()
)


def _write_squad(path, per_title=10, seed=0):
    """Two articles of short answerable questions in the SQuAD v2 JSON layout: big enough test
    splits that the EM/F1 of a random model and of its locally trained copies differ."""
    rng = np.random.default_rng(seed)
    data = []
    for title in ("Alpha", "Beta"):
        paragraphs = []
        for j in range(per_title):
            prefix = " ".join(rng.choice(_WORDS, 6))
            answer = " ".join(rng.choice(_WORDS, 4))
            context = f"{prefix} {answer} {' '.join(rng.choice(_WORDS, 6))}."
            qa = {
                "id": f"{title}-{j}",
                "question": f"which words follow item {j}?",
                "answers": [{"text": answer, "answer_start": len(prefix) + 1}],
                "is_impossible": False,
            }
            paragraphs.append({"context": context, "qas": [qa]})
        data.append({"title": title, "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))


def _qa_scores(exp, models, clients):
    """SQuAD v2 EM/F1 of ``models[i]`` on client ``clients[i]``'s test features, one feature
    at a time, then the standard n-best post-processing."""
    from spry_jax import data as data_lib

    ds = exp.fed.dataset
    preds = {}
    for params, c in zip(models, clients, strict=True):
        t = exp.fed.test[c]
        logits = np.concatenate(
            [
                np.asarray(
                    exp.model.apply_fn(
                        params,
                        exp.model.frozen,
                        t["input_ids"][i : i + 1],
                        t["attention_mask"][i : i + 1],
                        None,
                    )
                )
                for i in range(len(t["input_ids"]))
            ]
        )
        preds.update(
            data_lib.postprocess_qa(
                logits[..., 0], logits[..., 1], t["offsets"], t["example_index"], ds.text_pairs
            )
        )
    refs = {ex: list(ds.answers[ex]["text"]) for ex in preds}
    scores = data_lib.squad_v2_metrics(preds, refs)
    return scores["exact"], scores["f1"]


def test_personalized_qa_is_each_clients_model_after_local_training(tmp_path):
    cfg = squad_v2.get_config("local")
    _write_squad(tmp_path / "squad.json")
    cfg.data.path = str(tmp_path / "squad.json")
    cfg.data.test_fraction = 0.5
    cfg.rounds, cfg.clients_per_round = 1, 1  # the round's figure is one client's
    cfg.log_memory, cfg.eval_all_clients = False, False
    cfg.client.lr = 0.05  # far enough from the global model that the predictions change
    workdir = tmp_path / "run"
    summary = train.train_and_evaluate(cfg, str(workdir))
    exp = train.build_experiment(cfg)
    # Round 0 (from the initial model) and the final evaluation (from the final checkpoint).
    for record, state in (
        (_records(workdir)[0], exp.init_state()),
        (summary["final"], _restore(exp, workdir)),
    ):
        clients = exp.sample_clients(int(state.round))
        assert record["eval/model_after_rounds"] == int(state.round)
        gen = _qa_scores(exp, [state.params], clients)
        per = _qa_scores(exp, _client_models(exp, state, clients), clients)
        assert gen != per, "the test needs personalized predictions that differ"
        got_gen = (record["eval/generalized_exact_match"], record["eval/generalized_f1"])
        got_per = (record["eval/personalized_exact_match"], record["eval/personalized_f1"])
        assert got_gen == pytest.approx(gen, abs=1e-9)
        assert got_per == pytest.approx(per, abs=1e-9)


def test_eval_checkpoints_script_scores_each_saved_round(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "eval_checkpoints", os.path.join(ROOT, "scripts/eval_checkpoints.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = train.train_and_evaluate(_smoke(rounds=2), str(tmp_path))
    rows = mod.evaluate_checkpoints(str(tmp_path))
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1] == {"round": 2, **{k: v for k, v in summary["final"].items() if "all_" in k}}
    with pytest.raises(ValueError, match="no checkpoint after 7 rounds"):
        mod.evaluate_checkpoints(str(tmp_path), [7])
    # A run written before a field existed (here: its checkpoints record no fwd.lora_a) is
    # still evaluated, as train resumes it: the field at its default is the same experiment.
    for step in ("1", "2"):
        path = tmp_path / "checkpoints" / step / "identity" / "metadata"
        saved = json.loads(path.read_text())
        assert saved.pop("fwd.lora_a") == "perturb"
        path.write_text(json.dumps(saved))
    assert mod.evaluate_checkpoints(str(tmp_path)) == rows


def test_checkpoint_from_another_method_is_refused(tmp_path):
    train.train_and_evaluate(_smoke(rounds=1), str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="method"):
        train.train_and_evaluate(_smoke(rounds=2, method="fedfgd"), str(tmp_path))


_FAST = {"log_memory": False, "eval_all_clients": False}


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """A workdir with the checkpoint after round 0 of the smoke config."""
    workdir = tmp_path_factory.mktemp("one_round")
    train.train_and_evaluate(_smoke(rounds=1, **_FAST), str(workdir))
    return workdir


@pytest.mark.parametrize(
    "field,new,old",
    [
        ("server.optimizer", "fedadam", "fedyogi"),  # 'auto' resolves to Spry's FedYogi
        ("fwd.num_tangents", 2, 1),
        ("client.lr", 2e-3, 1e-3),
        ("split.tensors_per_unit", 1, 2),
        ("zo.eps", 1e-2, 1e-3),
        ("seed", 1, 0),
    ],
)
def test_resume_refuses_a_changed_trajectory_field(one_round, field, new, old):
    before = sorted(os.listdir(one_round / "checkpoints")), _records(one_round)
    with pytest.raises(CheckpointMismatchError) as err:
        train.train_and_evaluate(_smoke(rounds=2, **_FAST, **{field: new}), str(one_round))
    message = str(err.value)
    assert f"{field}: checkpoint has {old!r}, config has {new!r}" in message
    assert "new --workdir" in message
    assert (sorted(os.listdir(one_round / "checkpoints")), _records(one_round)) == before


def test_resume_allows_more_rounds_and_non_trajectory_changes(tmp_path):
    train.train_and_evaluate(_smoke(rounds=1, **_FAST), str(tmp_path))
    changed = {
        "eval_every": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "eval_batch_size": 5,
        "eval_all_clients": True,
        "round.backend": "loop",
    }
    train.train_and_evaluate(_smoke(rounds=2, log_memory=True, **changed), str(tmp_path))
    assert [r["round"] for r in _records(tmp_path)] == [0, 1]


def test_a_rounds_dependent_schedule_refuses_more_rounds_unless_allowed(tmp_path):
    cosine = {**_FAST, "server.schedule": "cosine"}
    train.train_and_evaluate(_smoke(rounds=1, **cosine), str(tmp_path))
    with pytest.raises(CheckpointMismatchError) as err:
        train.train_and_evaluate(_smoke(rounds=2, **cosine), str(tmp_path))
    message = str(err.value)
    assert "rounds: checkpoint has 1, config has 2" in message
    assert "server.schedule='cosine'" in message and "resume_allow_schedule_change" in message
    assert [r["round"] for r in _records(tmp_path)] == [0]
    allowed = {**cosine, "resume_allow_schedule_change": True}
    train.train_and_evaluate(_smoke(rounds=2, **allowed), str(tmp_path))
    assert [r["round"] for r in _records(tmp_path)] == [0, 1]


def _blow_up_from(first: int, monkeypatch) -> None:
    """Rounds ``first`` on start from non-finite weights (the loop's ``dispatch_round``)."""
    real_round = train.dispatch_round

    def blow_up(exp, state, frozen, evaluate, inputs=None):
        if int(state.round) >= first:
            state = state._replace(params=jax.tree.map(lambda x: x * np.inf, state.params))
        return real_round(exp, state, frozen, evaluate, inputs)

    monkeypatch.setattr(train, "dispatch_round", blow_up)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # A diverging config stops before anything is saved.
    diverging = tmp_path / "diverging"
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train_and_evaluate(
            _smoke(rounds=3, **{"client.lr": 1e38, "fwd.sigma": 1e10}), str(diverging)
        )
    # Nothing is saved, and a run that fails in its first round leaves no workdir behind.
    assert not diverging.exists()
    # A blow-up after a checkpoint keeps it. The same experiment must blow up there (resuming
    # with another lr is refused), so round 1 starts from non-finite weights.
    train.train_and_evaluate(_smoke(rounds=1), str(tmp_path))
    before = _records(tmp_path)
    _blow_up_from(1, monkeypatch)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train_and_evaluate(_smoke(rounds=3), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert _records(tmp_path) == before


def test_reading_back_every_few_rounds_gives_the_same_records(tmp_path):
    """``log_every = 3`` keeps rounds' metrics on the device between read-backs: the same
    records (one per round), in the same file, as reading every round back."""
    every, stretch = tmp_path / "every", tmp_path / "stretch"
    train.train_and_evaluate(_smoke(rounds=4, eval_every=0, checkpoint_every=0), str(every))
    cfg = _smoke(rounds=4, eval_every=0, checkpoint_every=0, log_every=3)
    train.train_and_evaluate(cfg, str(stretch))
    want = [_strip_times(r) for r in _records(every)]
    assert [_strip_times(r) for r in _records(stretch)] == want
    assert [r["round"] for r in want] == [0, 1, 2, 3]


def test_a_non_finite_round_inside_a_stretch_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    """Rounds 3-5 are read back together (log_every = 5); round 4 blows up. The checkpoint after
    round 2 (read back first) is kept, round 3's finite record is written, nothing after."""
    _blow_up_from(4, monkeypatch)
    cfg = _smoke(rounds=6, eval_every=0, checkpoint_every=3, log_every=5)
    with pytest.raises(FloatingPointError, match="after round 4; stopping without saving"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert [r["round"] for r in _records(tmp_path)] == [0, 1, 2, 3]


def test_non_eval_rounds_donate_the_state_and_eval_rounds_keep_it():
    exp = train.build_experiment(_smoke())
    frozen = exp.replicate(exp.model.frozen)
    state = exp.init_state()
    train.dispatch_round(exp, state, frozen, evaluate=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    inputs = train.prepare_round(exp, 0, evaluate=False)
    want, _ = exp.round_fn(jax.tree.map(np.copy, state), frozen, inputs.batches)
    got, _ = train.dispatch_round(exp, state, frozen, evaluate=False, inputs=inputs)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"clients_per_round": 9}, "clients_per_round"),
        ({"client.lr": 0.0}, "client.lr"),
        ({"client.lr": -1e-3}, "client.lr"),
        ({"method": "fedprox"}, "method"),
        ({"data.name": "imagenet"}, "data.name"),
        ({"comm_mode": "per_iteration", "method": "fedavg"}, "comm_mode"),
        ({"fwd.num_tangents": 0}, "fwd.num_tangents"),
        ({"client.optimizer": "sgd", "client.momentum": 1.0}, "client.momentum"),
        ({"client.optimizer": "sgd", "client.momentum": -0.5}, "client.momentum"),
        # momentum is SGD's: the method's AdamW would silently ignore it
        ({"client.momentum": 0.9}, "client.momentum"),
        ({"server.optimizer": "fedprox"}, "server.optimizer"),
        # Per-iteration's plain form has no round-level optimizer to configure.
        ({"comm_mode": "per_iteration", "server.optimizer": "fedadam"}, "server.optimizer"),
        ({"comm_mode": "per_iteration", "server.schedule": "cosine"}, "server.schedule"),
    ],
)
def test_invalid_configs_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.validate(_smoke(**overrides))


def test_per_iteration_server_settings_apply_with_the_round_optimizer_option():
    cfg = _smoke(
        comm_mode="per_iteration",
        **{"server.optimizer": "fedadam", "per_iteration.server_round_optimizer": True},
    )
    config_lib.validate(cfg)
    exp = train.build_experiment(cfg)
    assert exp.spec.per_iteration_round_optimizer
    assert not train.build_experiment(
        _smoke(comm_mode="per_iteration")
    ).spec.per_iteration_round_optimizer


def test_unknown_model_is_rejected_clearly(tmp_path):
    with pytest.raises(Exception, match="no-such-model"):
        train.train_and_evaluate(_smoke(**{"model.name": "no-such-model"}), str(tmp_path))
