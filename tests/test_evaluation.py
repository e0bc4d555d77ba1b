"""The evaluation stage: one evaluator per task, the same figures in the round program and on
the host, metric keys from one table."""

import dataclasses

import numpy as np
import pytest

from experiments import smoke
from spry_jax import evaluation, train
from spry_jax import metrics as M


@pytest.fixture(scope="module")
def exp():
    cfg = smoke.get_config()
    cfg.round.backend = "vmap"
    cfg.eval_batch_size = 5  # divides no client's test split: padding is in play
    cfg.data.val_fraction = 0.2
    return train.build_experiment(cfg)


def test_round_and_host_evaluations_agree_on_the_round_clients(exp):
    """The round program's generalized sums (vmapped over the round's clients, batches padded
    per client) and the host path (the union of the same clients' splits in one packed table)
    are two different reductions of one evaluator's batch sums: they must give one figure."""
    state = exp.init_state()
    frozen = exp.replicate(exp.model.frozen)
    _, _, record = train.run_round(exp, state, frozen, evaluate=True)
    clients = exp.sample_clients(0)
    host = exp.evaluator.score(
        state.params, frozen, [exp.fed.test[c] for c in clients], M.GENERALIZED
    )
    assert record[M.ROUND_EXAMPLES] == host[M.eval_key(M.GENERALIZED, M.EXAMPLES)] > 0
    acc, loss = (M.eval_key(M.GENERALIZED, m) for m in ("accuracy", "loss"))
    assert record[acc] == pytest.approx(host[acc], abs=1e-9)
    assert record[loss] == pytest.approx(host[loss], rel=1e-5)
    # The personalized figure is of other models (after local training), so it moved.
    assert record[M.eval_key(M.PERSONALIZED, "loss")] != record[loss]


def test_host_scopes_report_the_declared_keys_and_the_majority_control(exp):
    params, frozen = exp.model.trainable, exp.model.frozen
    got = exp.evaluator.all_clients(params, frozen)
    metrics = (*M.TASK_METRICS["classification"], M.EXAMPLES, M.MAJORITY)
    assert set(got) == {M.eval_key(M.ALL_CLIENTS, m) for m in metrics}
    labels = np.concatenate([t["labels"] for t in exp.fed.test])
    want = np.bincount(labels).max() / len(labels)
    assert got[M.eval_key(M.ALL_CLIENTS, M.MAJORITY)] == pytest.approx(want)
    val = exp.evaluator.all_clients(params, frozen, split="val")
    assert set(val) == {M.eval_key(M.ALL_CLIENTS_VAL, m) for m in metrics}
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        exp.evaluator.all_clients(params, frozen, split="train")
    assert exp.evaluator.heldout(params, frozen) == {}  # the smoke data has no held-out set


def test_the_evaluator_follows_the_task_and_refuses_an_unknown_one(exp):
    assert isinstance(exp.evaluator, evaluation.ClassificationEvaluator)
    assert exp.spec.eval_fn is exp.evaluator.batch_sums  # the round sums with the evaluator's
    other = dataclasses.replace(exp.fed, task="causal_lm")
    with pytest.raises(ValueError, match="no evaluator for task 'causal_lm'"):
        evaluation.make_evaluator(exp.model, other, 8)
    assert evaluation.QAEvaluator.batch_sums is None  # QA is scored on the host
