"""The method table: every row trains end to end; MeSP/LCSB/FedSGD/FedAvgSplit are what they
claim to be, checked against plain ``jax.grad``, optax and hand aggregation."""

import collections
import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import smoke
from spry_jax import methods, models, tasks
from spry_jax.config import default_config
from spry_jax.core import client as C
from spry_jax.core import estimators as E
from spry_jax.core import round as R
from spry_jax.core import units as U
from tests.core.toy import make_toy_batches, make_toy_model


# Compiling one method's round program for the tiny BERT takes ~15-40 s on a 2-core machine,
# so the 13-row sweep is marked slow (CI still runs it); the settings shrink the data only.
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_two_smoke_rounds(method, tmp_path):
    from spry_jax import train

    c = smoke.get_config()
    c.method = method
    c.round.backend = "vmap"
    c.num_clients = 4
    c.clients_per_round = 2
    c.data.num_examples = 96
    c.eval_every = 1  # every round evaluates: one compiled program instead of two
    c.checkpoint_every = 2
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(summary["train/loss"]), method
    assert 0.0 <= summary["final"]["eval/generalized_accuracy"] <= 1.0


# --------------------------------------------------------------------------------------------
# MeSP and LCSB on the real tiny BERT (LoRA on query/value of 2 layers, a classifier head)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    c = smoke.get_config()
    model = models.make_split_model(c.model, c.peft, task="classification", num_labels=2, seed=0)
    # LoRA B starts at zero (so would grad A); move it to make every gradient non-trivial.
    params = {
        k: v + 0.1 * jax.random.normal(jax.random.PRNGKey(i), v.shape, v.dtype)
        for i, (k, v) in enumerate(sorted(model.trainable.items()))
    }
    f = _loss_closure(model)
    return model, params, f, jax.jit(jax.value_and_grad(f))(params)  # jitted: one compile


def _loss_closure(model):
    """The model's loss on one fixed batch with a fixed dropout key."""
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(4, 128, (4, 16)), jnp.int32),
        "attention_mask": jnp.ones((4, 16), jnp.int32),
        "labels": jnp.asarray([0, 1, 1, 0], jnp.int32),
        "example_mask": jnp.ones((4,), jnp.float32),
    }
    loss_fn = tasks.make_loss_fn(model)
    return lambda w: loss_fn(w, model.frozen, batch, jax.random.PRNGKey(7))


def _ones(params):
    return {k: jnp.float32(1.0) for k in params}


def test_mesp_gradient_is_backprop_and_only_xa_is_recomputed(bert):
    """``fedavg_mesp``'s row builds the model with ``remat="lora"``; its estimator, plain
    backprop over that build, gives the plain build's gradient and stores no ``xA``."""
    model, params, f, (loss, grad) = bert
    c = smoke.get_config()
    assert methods.model_options("fedavg_mesp")["remat"] == "lora"
    mesp_model = models.make_split_model(
        c.model,
        c.peft,
        task="classification",
        num_labels=2,
        seed=0,
        **methods.model_options("fedavg_mesp"),
    )
    f_mesp = _loss_closure(mesp_model)
    cfg = default_config()
    cfg.method = "fedavg_mesp"
    mesp = methods.build_round_parts(cfg).estimator
    est = jax.jit(lambda p: mesp(f_mesp, p, _ones(p), jax.random.PRNGKey(0)))(params)
    np.testing.assert_allclose(est.loss, loss, rtol=1e-6)
    for k in params:
        assert np.any(np.asarray(grad[k]) != 0), k
        np.testing.assert_allclose(est.grad[k], grad[k], rtol=1e-5, atol=1e-7, err_msg=k)

    def residual_shapes(loss_closure):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(loss_closure, params)
        return [line.split(" ")[0] for line in out.getvalue().splitlines()]

    # xA is [batch=4, seq=16, rank=2] per adapted projection (2 layers x query/value).
    xa = "f32[4,16,2]"
    plain, recomputed = residual_shapes(f), residual_shapes(f_mesp)
    assert plain.count(xa) == 4
    assert recomputed.count(xa) == 0
    # Nothing else of activation size is added (only references to the LoRA weights).
    added = collections.Counter(recomputed) - collections.Counter(plain)
    weights = {f"f32[{','.join(map(str, v.shape))}]" for v in params.values()}
    assert set(added) <= weights, added
    assert sum((collections.Counter(plain) - collections.Counter(recomputed)).values()) == 4


def _count(jaxpr, prim="dot_general"):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == prim
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(sub, "jaxpr"):
                    n += _count(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                elif hasattr(sub, "eqns"):
                    n += _count(sub)
    return n


def test_lcsb_is_backprop_on_the_cyclic_block_and_zero_elsewhere(bert):
    model, params, f, (loss, grad) = bert
    blocks = E.lcsb_blocks(sorted(params), 1)
    head = ["classifier/bias", "classifier/kernel"]
    assert [sorted(b) for b in blocks] == [
        sorted([k for k in params if k.startswith("encoder/layer/0/")] + head),
        sorted([k for k in params if k.startswith("encoder/layer/1/")] + head),
    ]
    assert E.lcsb_blocks(sorted(params), 2) == [sorted(params)[2:] + sorted(params)[:2]] or (
        sorted(E.lcsb_blocks(sorted(params), 2)[0]) == sorted(params)
    )
    est_fn = E.lcsb(1)
    run = jax.jit(lambda p, s: est_fn(f, p, _ones(p), jax.random.PRNGKey(0), E.EstimatorInputs(s)))
    for step in range(4):
        est = run(params, step)
        selected = set(blocks[step % 2])
        np.testing.assert_allclose(est.loss, loss, rtol=1e-6)
        for k in params:
            if k in selected:
                np.testing.assert_allclose(est.grad[k], grad[k], rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert np.all(np.asarray(est.grad[k]) == 0), k

    # The cycle continues across rounds: global step = round * steps_per_round + step (the
    # round passes step = round * steps; estimate_step adds the local step).
    seen = []

    def spy(f, p, m, k, inputs):
        seen.append(int(inputs.step))
        return est_fn(f, p, m, k, inputs)

    for local in range(2):
        C.estimate_step(
            spy,
            lambda w, fr, b, key: f(w),
            params,
            None,
            _ones(params),
            None,
            jax.random.PRNGKey(0),
            local,
            E.EstimatorInputs(step=1 * 3),
        )
    assert seen == [3, 4]

    # Backprop stops at the block's lowest layer: the top block's branch has fewer matmuls.
    jaxpr = jax.make_jaxpr(
        lambda p: est_fn(f, p, _ones(p), jax.random.PRNGKey(0), E.EstimatorInputs(0))
    )(params)
    cond = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond")
    low, high = (_count(b.jaxpr) for b in cond.params["branches"])
    assert high < low, (low, high)


# --------------------------------------------------------------------------------------------
# FedSGD, FedAvgSplit and the server's last_delta on the toy model and the round program
# --------------------------------------------------------------------------------------------

M, BATCH = 4, 5


def _spec(cfg, model, m=M):
    parts = methods.build_round_parts(cfg)
    return R.RoundSpec(
        loss_fn=tasks.make_loss_fn(model),
        estimator=parts.estimator,
        client_optimizer=parts.client_optimizer,
        server_optimizer=parts.server_optimizer,
        units=U.make_units(
            model.order, cfg.split.tensors_per_unit, model.head_keys, peft_method=model.peft_method
        ),
        split=parts.split,
        clients_per_round=m,
        num_slots=m,
        backend="vmap",
        fwd_sigma=parts.fwd_sigma,
    )


def _cfg(method):
    c = default_config()
    c.method = method
    return c


@pytest.mark.parametrize("server", ["auto", "sgd"])
def test_one_fedsgd_round_is_one_centralised_step_on_the_union(server):
    model = make_toy_model()
    b = make_toy_batches(M, 2, BATCH, seed=3)
    # One local step per client (FedSGD's max_steps = 1); ragged example masks kept.
    batches = {k: v[:, :1] for k, v in b.items()}
    batches["step_mask"] = jnp.ones((M, 1), jnp.float32)
    cfg = _cfg("fedsgd")
    cfg.server.optimizer = server
    if server == "sgd":  # plain SGD exposes the aggregated gradient itself, not just its sign
        cfg.server.lr = 0.5
    spec = _spec(cfg, model)
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, _ = R.make_round_fn(spec)(state, model.frozen, batches)

    # Centralised: the example-weighted mean loss over the union of the clients' examples.
    union = {
        k: v[:, 0].reshape((M * BATCH, *v.shape[3:]))
        for k, v in batches.items()
        if k != "step_mask"
    }
    assert float(jnp.sum(union["example_mask"])) < M * BATCH  # some padding examples
    loss_fn = tasks.make_loss_fn(model)
    g = jax.grad(lambda w: loss_fn(w, model.frozen, union, None))(model.trainable)
    if server == "sgd":
        opt = optax.sgd(0.5)
    else:
        opt = optax.adam(methods.SERVER_DEFAULT_LR["adam"], b1=cfg.server.b1, b2=cfg.server.b2)
    updates, _ = opt.update(g, opt.init(model.trainable), model.trainable)
    expected = optax.apply_updates(model.trainable, updates)
    for k in model.order:
        assert np.any(np.asarray(expected[k]) != np.asarray(model.trainable[k]))
        np.testing.assert_allclose(new_state.params[k], expected[k], atol=1e-6, err_msg=k)


def test_fedavg_split_trains_spry_assignment_with_backprop():
    model = make_toy_model()
    batches = make_toy_batches(M, 2, BATCH, seed=4)
    spec = _spec(_cfg("fedavg_split"), model)
    spry = _spec(_cfg("spry"), model)
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, metrics = R.make_round_fn(spec)(state, model.frozen, batches)
    _, spry_metrics = R.make_round_fn(spry)(
        R.init_server_state(model.trainable, spry.server_optimizer, seed=0), model.frozen, batches
    )
    round_key = jax.random.fold_in(state.rng, state.round)
    masks, keys = R._masks_and_keys(spec, round_key)
    spry_masks, _ = R._masks_and_keys(spry, round_key)
    for k in masks:
        np.testing.assert_array_equal(masks[k], spry_masks[k])
        np.testing.assert_array_equal(metrics["trainers"][k], spry_metrics["trainers"][k])
    assert any(float(np.min(masks[k])) == 0 for k in masks), "split: not everyone trains all"

    # Hand: each client runs plain backprop (jax.grad) + AdamW on its units only; per-unit
    # example-weighted mean; FedAvg adds it.
    cfg = _cfg("fedavg_split")
    loss_fn = tasks.make_loss_fn(model)
    num = {k: np.zeros(v.shape) for k, v in model.trainable.items()}
    den = dict.fromkeys(model.trainable, 0.0)
    for c in range(M):
        mask = {k: float(masks[k][c]) for k in masks}
        p = dict(model.trainable)
        opt = optax.adamw(cfg.client.lr, weight_decay=cfg.client.weight_decay)
        s = opt.init(p)
        n = 0.0
        for step in range(2):
            if float(batches["step_mask"][c, step]) == 0:
                continue
            batch = {k: v[c, step] for k, v in batches.items() if k != "step_mask"}
            drop_key, _ = C.step_keys(keys[c], step)
            g = jax.grad(lambda w, b=batch, d=drop_key: loss_fn(w, model.frozen, b, d))(p)
            g = {k: g[k] * mask[k] for k in g}
            u, s = opt.update(g, s, p)
            p = {k: p[k] + u[k] * mask[k] for k in p}
            n += float(jnp.sum(batch["example_mask"]))
        for k in num:
            num[k] += n * mask[k] * np.asarray(p[k] - model.trainable[k])
            den[k] += n * mask[k]
    for k in model.order:
        expected = np.asarray(model.trainable[k]) + (num[k] / den[k] if den[k] else 0.0)
        np.testing.assert_allclose(new_state.params[k], expected, atol=2e-6, err_msg=k)


def test_last_delta_is_the_aggregated_update_and_guides_fwdllm():
    model = make_toy_model()
    batches = make_toy_batches(M, 2, BATCH, seed=5)
    spec = _spec(_cfg("fedavg"), model)
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    assert all(np.all(np.asarray(v) == 0) for v in state.last_delta.values())
    new_state, _ = R.make_round_fn(spec)(state, model.frozen, batches)
    for k in model.order:  # FedAvg with lr 1: the applied update is the aggregated delta
        np.testing.assert_allclose(
            new_state.last_delta[k], new_state.params[k] - state.params[k], atol=1e-7
        )

    cfg = _cfg("fwdllm_plus")
    spec = _spec(cfg, model)
    fn = R.make_round_fn(spec)
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    state1, _ = fn(state, model.frozen, batches)
    assert any(np.any(np.asarray(v) != 0) for v in state1.last_delta.values())
    guided, _ = fn(state1, model.frozen, batches)
    unguided, _ = fn(state1._replace(last_delta=None), model.frozen, batches)
    zero_guide, _ = fn(
        state1._replace(last_delta=jax.tree.map(jnp.zeros_like, state1.last_delta)),
        model.frozen,
        batches,
    )
    for k in model.order:  # no guide and an all-zero guide both mean "random directions"
        np.testing.assert_array_equal(unguided.params[k], zero_guide.params[k])
    assert any(not np.allclose(guided.params[k], unguided.params[k]) for k in model.order), (
        "the previous update must change which directions FwdLLM+ uses"
    )


def test_new_rows_have_the_documented_settings():
    c = default_config()
    assert (c.zo.eps, c.zo.num_perturbations) == (1e-3, 1)
    assert (c.zo.baffle_num_perturbations, c.zo.baffle_sigma) == (10, 1e-4)
    for name, server in [
        ("fedmezo", "fedavg"),
        ("baffle_plus", "fedyogi"),
        ("fwdllm_plus", "fedyogi"),
        ("fedavg_mesp", "fedavg"),
        ("fedavg_lcsb", "fedavg"),
    ]:
        row = methods.get_method(name)
        assert row.server == server and not row.split and row.doc
        c.method = name
        methods.build_round_parts(c)
    c.method = "fwdllm_plus"
    c.comm_mode = "per_iteration"
    with pytest.raises(ValueError, match="comm_mode"):
        methods.build_round_parts(c)


def test_fwdllm_plus_defaults_are_the_release_settings():
    c = default_config()
    assert c.zo.fwdllm_client_var_threshold == 1e2  # the published client filter, on
    assert c.zo.fwdllm_var_threshold == 0.0  # the step filter is an option, off
    assert (c.zo.fwdllm_num_perturbations, c.zo.fwdllm_eps) == (20, 1e-2)
    assert c.zo.fwdllm_num_candidates == 10 * c.zo.fwdllm_num_perturbations
    c.method = "fwdllm_plus"
    assert methods.build_round_parts(c).client_var_threshold == 1e2
    c.zo.fwdllm_client_var_threshold = 0.0
    assert methods.build_round_parts(c).client_var_threshold == 0.0
    c.zo.fwdllm_client_var_threshold = 1e2
    for other in ("spry", "fedavg", "baffle_plus", "fedavg_lcsb"):
        c.method = other
        assert methods.build_round_parts(c).client_var_threshold == 0.0, other
