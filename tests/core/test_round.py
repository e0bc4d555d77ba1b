"""The round program: backends agree, aggregation is per unit, masks are honoured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spry_jax import comm, tasks
from spry_jax.core import client as C
from spry_jax.core import estimators as E
from spry_jax.core import round as R
from spry_jax.core import server as S
from spry_jax.core import units as U
from spry_jax.core import zero_order as Z
from tests.core.toy import make_toy_batches, make_toy_model

M, SLOTS, STEPS, BATCH = 5, 8, 3, 4


def _spec(
    model,
    backend="vmap",
    mode="per_epoch",
    estimator=None,
    split=True,
    server="fedyogi",
    m=M,
    slots=SLOTS,
    tensors_per_unit=2,
    lr=1e-2,
    round_optimizer=False,
):
    return R.RoundSpec(
        loss_fn=tasks.make_loss_fn(model),
        estimator=estimator or E.forward(2, 1.0),
        client_optimizer=C.make_client_optimizer("adamw", lr),
        server_optimizer=S.make_server_optimizer(server, 1e-2 if server != "fedavg" else 1.0),
        units=U.make_units(
            model.order, tensors_per_unit, model.head_keys, peft_method=model.peft_method
        ),
        split=split,
        clients_per_round=m,
        num_slots=slots,
        comm_mode=mode,
        backend=backend,
        mesh=R.make_client_mesh() if backend == "shard_map" else None,
        fwd_sigma=1.0,
        per_iteration_round_optimizer=round_optimizer,
    )


def _batches(m=M, slots=SLOTS, seed=0):
    b = make_toy_batches(slots, STEPS, BATCH, seed=seed)
    b["step_mask"] = b["step_mask"].at[m:].set(0)
    b["example_mask"] = b["example_mask"].at[m:].set(0)
    return b


def _run(spec, model, batches, rounds=2):
    fn = R.make_round_fn(spec)
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    for _ in range(rounds):
        state, metrics = fn(state, model.frozen, batches)
    return state, metrics


def test_eight_devices_are_visible():
    assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"


@pytest.mark.parametrize("mode", ["per_epoch", "per_iteration"])
def test_backends_give_the_same_numbers(mode):
    model = make_toy_model(dropout=0.1)
    batches = _batches()
    ref_state, ref_metrics = _run(_spec(model, "vmap", mode), model, batches)
    for backend in ("shard_map", "loop", "debug"):
        state, metrics = _run(_spec(model, backend, mode), model, batches)
        for k in model.order:
            np.testing.assert_allclose(
                state.params[k], ref_state.params[k], atol=1e-5, rtol=0, err_msg=f"{backend} {k}"
            )
        np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
        assert int(state.round) == 2


def test_sharded_round_with_fewer_clients_than_devices():
    model = make_toy_model()
    batches = _batches(m=3)
    a, _ = _run(_spec(model, "vmap", m=3), model, batches, rounds=1)
    b, _ = _run(_spec(model, "shard_map", m=3), model, batches, rounds=1)
    for k in model.order:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-5)


def test_per_epoch_aggregation_is_the_per_unit_weighted_mean_of_client_updates():
    model = make_toy_model()
    spec = _spec(model, "vmap", server="fedavg")
    batches = _batches()
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, _ = R.make_round_fn(spec)(state, model.frozen, batches)

    # Independent recomputation: same assignment and keys, clients one by one, numpy averaging.
    round_key = jax.random.fold_in(state.rng, state.round)
    masks, keys = R._masks_and_keys(spec, round_key)
    update = jax.jit(C.make_client_update(spec.loss_fn, spec.estimator, spec.client_optimizer))
    num = {k: np.zeros(v.shape) for k, v in model.trainable.items()}
    den = {k: 0.0 for k in model.trainable}
    for c in range(SLOTS):
        mask_c = {k: masks[k][c] for k in masks}
        batch_c = {k: v[c] for k, v in batches.items() if k != "step_mask"}
        res = update(
            model.trainable, model.frozen, mask_c, batch_c, batches["step_mask"][c], keys[c]
        )
        n = float(
            np.sum(
                np.asarray(batches["example_mask"][c])
                * np.asarray(batches["step_mask"][c])[:, None]
            )
        )
        for k in num:
            num[k] += n * float(mask_c[k]) * np.asarray(res.delta[k])
            den[k] += n * float(mask_c[k])
    for k in model.order:
        expected = np.asarray(model.trainable[k]) + (num[k] / den[k] if den[k] > 0 else 0.0)
        np.testing.assert_allclose(new_state.params[k], expected, atol=2e-6, err_msg=k)


def test_untrained_units_do_not_move_under_fedavg():
    # 2 clients, 3 units -> every unit trained; 2 clients with 1 tensor per unit -> M < G still
    # covers all; force an untrained unit with classifier_share off and M=1 client but only one
    # client's data real: the other units must stay bit-identical.
    model = make_toy_model()
    spec = _spec(model, "vmap", server="fedavg", m=1, slots=1, tensors_per_unit=2)
    batches = _batches(m=1, slots=1)
    state, _ = _run(spec, model, batches, rounds=1)
    changed = {k for k in model.order if not np.array_equal(state.params[k], model.trainable[k])}
    assert changed == set(model.order)  # M=1 trains every unit (g mod 1 = 0)

    spec = _spec(model, "vmap", server="fedavg", m=2, slots=2, tensors_per_unit=2)
    batches = _batches(m=2, slots=2)
    batches["step_mask"] = batches["step_mask"].at[1].set(0)  # client 1 has no data
    batches["example_mask"] = batches["example_mask"].at[1].set(0)
    state, _ = _run(spec, model, batches, rounds=1)
    round_key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    masks, _ = R._masks_and_keys(spec, round_key)
    for k in model.order:
        moved = not np.array_equal(state.params[k], model.trainable[k])
        assert moved == bool(masks[k][0]), k


def test_client_update_changes_only_masked_leaves_and_ignores_padded_steps():
    model = make_toy_model(dropout=0.1)
    loss_fn = tasks.make_loss_fn(model)
    update = C.make_client_update(loss_fn, E.forward(1), C.make_client_optimizer("adamw", 1e-2))
    mask = {k: jnp.float32(k.startswith("l1/")) for k in model.trainable}
    b = make_toy_batches(1, 4, BATCH, seed=3)
    batch = {k: v[0] for k, v in b.items() if k != "step_mask"}
    full = update(model.trainable, model.frozen, mask, batch, jnp.ones(4), jax.random.PRNGKey(0))
    for k in model.trainable:
        assert (float(jnp.abs(full.delta[k]).max()) > 0) == k.startswith("l1/"), k
    # Three real steps padded to four == the same three steps alone.
    padded = update(
        model.trainable, model.frozen, mask, batch, jnp.array([1.0, 1, 1, 0]), jax.random.PRNGKey(0)
    )
    cut = update(
        model.trainable,
        model.frozen,
        mask,
        {k: v[:3] for k, v in batch.items()},
        jnp.ones(3),
        jax.random.PRNGKey(0),
    )
    for k in model.trainable:
        np.testing.assert_allclose(padded.delta[k], cut.delta[k], atol=1e-7)
    np.testing.assert_allclose(padded.loss, cut.loss, rtol=1e-6)


def test_backprop_round_runs_and_is_deterministic():
    model = make_toy_model()
    spec = _spec(model, "vmap", estimator=E.backprop(), split=False, server="fedavg")
    a, ma = _run(spec, model, _batches())
    b, mb = _run(spec, model, _batches())
    for k in model.order:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert np.isfinite(float(ma["train/loss"]))


@pytest.mark.parametrize(
    "mode,backend",
    [
        ("per_epoch", "vmap"),
        ("per_epoch", "shard_map"),
        ("per_epoch", "loop"),
        ("per_iteration", "vmap"),
        ("per_iteration", "shard_map"),
    ],
)
def test_client_deltas_are_each_slots_local_change(mode, backend):
    model = make_toy_model()
    spec = _spec(model, backend, mode)
    batches = _batches()
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, metrics = R.make_round_fn(spec)(state, model.frozen, batches, client_deltas=True)
    deltas = metrics["client_deltas"]
    if mode == "per_epoch":  # each client's own update, one client at a time
        masks, keys = R._masks_and_keys(spec, jax.random.fold_in(state.rng, state.round))
        update = jax.jit(C.make_client_update(spec.loss_fn, spec.estimator, spec.client_optimizer))
        expected = []
        for c in range(SLOTS):
            res = update(
                model.trainable,
                model.frozen,
                {k: m[c] for k, m in masks.items()},
                {k: v[c] for k, v in batches.items() if k != "step_mask"},
                batches["step_mask"][c],
                keys[c],
            )
            expected.append(res.delta)
    else:  # every real client holds the server's weights
        shared = {k: new_state.params[k] - model.trainable[k] for k in model.order}
        expected = [shared if c < M else jax.tree.map(jnp.zeros_like, shared) for c in range(SLOTS)]
    for c in range(SLOTS):
        for k in model.order:
            assert deltas[k].shape == (SLOTS, *model.trainable[k].shape)
            np.testing.assert_allclose(deltas[k][c], expected[c][k], atol=1e-6, err_msg=f"{c} {k}")
    # Without the flag the round returns no per-client weights (and the same state).
    plain_state, plain = R.make_round_fn(spec)(state, model.frozen, batches)
    assert "client_deltas" not in plain
    for k in model.order:
        np.testing.assert_array_equal(plain_state.params[k], new_state.params[k])


def _per_iteration_by_hand(spec, model, batches, state):
    """The per-iteration round written out: at each step every client's own forward gradient
    (``est.grad``, not regenerated from its jvp scalars), averaged per leaf over the clients that
    hold it weighted by their examples, then one step of the per-step optimizer."""
    masks, keys = R._masks_and_keys(spec, jax.random.fold_in(state.rng, state.round))
    opt = spec.client_optimizer
    p = dict(state.params)
    opt_state = opt.init(p)
    for t in range(batches["step_mask"].shape[1]):
        num = {k: np.zeros(v.shape) for k, v in p.items()}
        den = dict.fromkeys(p, 0.0)
        for c in range(spec.num_slots):
            batch = {k: v[c, t] for k, v in batches.items() if k != "step_mask"}
            mask = {k: m[c] for k, m in masks.items()}
            drop_key, est_key = C.step_keys(keys[c], t)
            est = spec.estimator(
                lambda w, b=batch, d=drop_key: spec.loss_fn(w, model.frozen, b, d), p, mask, est_key
            )
            weight = float(batches["step_mask"][c, t]) * float(np.sum(batch["example_mask"]))
            for k in p:
                num[k] += weight * float(mask[k]) * np.asarray(est.grad[k], np.float64)
                den[k] += weight * float(mask[k])
        grad = {k: jnp.asarray(num[k] / max(den[k], 1e-30), jnp.float32) for k in p}
        updates, opt_state = opt.update(grad, opt_state, p)
        p = {k: p[k] + (updates[k] if den[k] > 0 else 0.0) for k in p}
    return p


def test_per_iteration_default_is_the_per_step_optimizer_alone():
    model = make_toy_model(dropout=0.1)
    spec = _spec(model, "vmap", "per_iteration")  # server_optimizer FedYogi: must not be applied
    batches = _batches()
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, _ = R.make_round_fn(spec)(state, model.frozen, batches)
    expected = _per_iteration_by_hand(spec, model, batches, state)
    for k in model.order:
        np.testing.assert_allclose(new_state.params[k], expected[k], atol=2e-6, rtol=0, err_msg=k)
        assert not np.allclose(expected[k], model.trainable[k], atol=1e-4), k
    before, after = jax.tree.leaves(state.opt_state), jax.tree.leaves(new_state.opt_state)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # no round-level optimizer step


def test_per_iteration_round_optimizer_option_also_applies_the_server_optimizer():
    model = make_toy_model(dropout=0.1)
    spec = _spec(model, "vmap", "per_iteration", round_optimizer=True)
    batches = _batches()
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    new_state, _ = R.make_round_fn(spec)(state, model.frozen, batches)
    after_steps = _per_iteration_by_hand(spec, model, batches, state)
    # The old two-optimizer form: Flower FedYogi (lr 1e-2) on the round's net change.
    delta = {k: np.asarray(after_steps[k], np.float64) - model.trainable[k] for k in model.order}
    m = {k: 0.1 * d for k, d in delta.items()}
    v = {k: 0.01 * d * d for k, d in delta.items()}  # v0 = 0: v - 0.01 d^2 sign(0 - d^2)
    for k in model.order:
        expected = model.trainable[k] + 1e-2 * m[k] / (np.sqrt(v[k]) + 1e-3)
        np.testing.assert_allclose(new_state.params[k], expected, atol=2e-6, rtol=0, err_msg=k)
        assert not np.allclose(expected, after_steps[k], atol=1e-4), k


def test_comm_bytes_per_epoch_and_per_iteration():
    model = make_toy_model()
    nbytes = {k: v.size * 4 for k, v in model.trainable.items()}
    total = sum(nbytes.values())
    spec = _spec(model, "vmap")
    _, metrics = _run(spec, model, _batches(), rounds=1)
    up, down = comm.round_bytes(spec.comm_mode, model.trainable, metrics)
    # M=5 clients > G=3 units: each client sends exactly the one unit it trained.
    masks, _ = R._masks_and_keys(spec, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    per_client = [sum(nbytes[k] for k in masks if float(masks[k][c])) for c in range(M)]
    assert sorted(per_client)[0] > 0 and len(set(per_client)) <= 2
    assert up == sum(per_client) + 4 * M
    assert down == M * total
    spec = _spec(model, "vmap", mode="per_iteration")
    _, metrics = _run(spec, model, _batches(), rounds=1)
    up, down = comm.round_bytes(spec.comm_mode, model.trainable, metrics, num_tangents=2)
    real_steps = float(np.sum(np.asarray(_batches()["step_mask"])))
    assert up == 4 * 2 * real_steps
    assert down > M * total


def test_bad_specs_are_rejected():
    model = make_toy_model()
    with pytest.raises(ValueError, match="per_iteration"):
        R.RoundSpec(**{**_spec(model).__dict__, "comm_mode": "per_iteration", "fwd_sigma": None})
    with pytest.raises(ValueError, match="multiple"):
        _spec(model, "shard_map", slots=5)
    with pytest.raises(ValueError, match="backend"):
        _spec(model, "pmap")


# --------------------------------------------------------------------------------------------
# FwdLLM+'s server-side client filter
# --------------------------------------------------------------------------------------------


def _filter_spec(model, backend="vmap", threshold=0.0):
    base = _spec(model, backend, estimator=Z.fwdllm(6, 3, 1e-2), split=False, server="fedavg")
    return R.RoundSpec(**{**base.__dict__, "client_var_threshold": threshold})


def _client_results(spec, model, batches):
    """Every slot's client update run by hand, with the round's masks and keys."""
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    masks, keys = R._masks_and_keys(spec, jax.random.fold_in(state.rng, state.round))
    update = jax.jit(
        C.make_client_update(
            spec.loss_fn, spec.estimator, spec.client_optimizer, report_variance=True
        )
    )
    inputs = E.EstimatorInputs(step=state.round * STEPS, guide=state.last_delta)
    out = []
    for c in range(SLOTS):
        mask_c = {k: masks[k][c] for k in masks}
        batch_c = {k: v[c] for k, v in batches.items() if k != "step_mask"}
        res = update(
            model.trainable,
            model.frozen,
            mask_c,
            batch_c,
            batches["step_mask"][c],
            keys[c],
            inputs,
        )
        out.append((mask_c, res))
    return out


def test_clients_at_or_above_the_variance_threshold_are_left_out_of_the_aggregate():
    model = make_toy_model()
    batches = _batches()
    results = _client_results(_filter_spec(model), model, batches)
    variances = np.array([float(r.variance) for _, r in results[:M]])
    assert np.all(variances > 0) and len(set(variances)) == M
    # Drop the two noisiest real clients: the threshold sits between the 3rd and 4th variance.
    threshold = float(np.mean(np.sort(variances)[2:4]))
    kept = [c for c in range(SLOTS) if c >= M or variances[c] < threshold]
    num = {k: np.zeros(v.shape) for k, v in model.trainable.items()}
    den = dict.fromkeys(model.trainable, 0.0)
    for c in kept:
        mask_c, res = results[c]
        for k in num:
            num[k] += float(res.num_examples) * float(mask_c[k]) * np.asarray(res.delta[k])
            den[k] += float(res.num_examples) * float(mask_c[k])

    state, metrics = _run(_filter_spec(model, "vmap", threshold), model, batches, rounds=1)
    assert float(metrics["train/dropped_clients"]) == 2
    assert float(metrics["train/clients"]) == M
    np.testing.assert_allclose(metrics["train/client_variance"], variances.mean(), rtol=1e-5)
    for k in model.order:
        expected = np.asarray(model.trainable[k]) + num[k] / den[k]
        np.testing.assert_allclose(state.params[k], expected, atol=2e-6, err_msg=k)

    # Above every client's variance nothing is dropped: every client's update is averaged in.
    high, m_high = _run(_filter_spec(model, threshold=2 * variances.max()), model, batches, 1)
    assert float(m_high["train/dropped_clients"]) == 0
    for k in model.order:
        n = sum(float(r.num_examples) * float(m[k]) * np.asarray(r.delta[k]) for m, r in results)
        d = sum(float(r.num_examples) * float(m[k]) for m, r in results)
        np.testing.assert_allclose(high.params[k], model.trainable[k] + n / d, atol=2e-6)


# Each backend compiles its own FwdLLM+ round program (~25 s each on a shared 2-core machine).
@pytest.mark.slow
def test_client_filter_gives_the_same_numbers_in_every_backend():
    model = make_toy_model()
    batches = _batches()
    variances = sorted(
        float(r.variance) for _, r in _client_results(_filter_spec(model), model, batches)[:M]
    )
    threshold = float(np.mean(variances[2:4]))
    ref, _ = _run(_filter_spec(model, "vmap", threshold), model, batches, rounds=1)
    for backend in ("shard_map", "loop", "debug"):
        state, metrics = _run(_filter_spec(model, backend, threshold), model, batches, rounds=1)
        assert float(metrics["train/dropped_clients"]) == 2, backend
        for k in model.order:
            np.testing.assert_allclose(
                state.params[k], ref.params[k], atol=1e-6, err_msg=f"{backend} {k}"
            )


def test_client_filter_is_per_epoch_only():
    model = make_toy_model()
    with pytest.raises(ValueError, match="per_epoch"):
        R.RoundSpec(**{**_spec(model, mode="per_iteration").__dict__, "client_var_threshold": 1.0})
    with pytest.raises(ValueError, match="client_var_threshold"):
        R.RoundSpec(**{**_spec(model).__dict__, "client_var_threshold": -1.0})


def test_per_iteration_server_step_leaves_an_untrained_leaf_and_its_state_alone():
    model = make_toy_model()
    spec = _spec(model, mode="per_iteration")
    p = model.trainable
    states = C.init_leaf_states(spec.client_optimizer, p)
    num = {k: jnp.ones_like(v) for k, v in p.items()}
    den = {k: jnp.float32(k != "l1/lora_a") for k in p}  # nobody trained l1/lora_a this step
    for _ in range(2):
        p, states = R._server_step(spec, p, states, num, den)
    np.testing.assert_array_equal(p["l1/lora_a"], model.trainable["l1/lora_a"])
    fresh = spec.client_optimizer.init(model.trainable["l1/lora_a"])
    for a, b in zip(jax.tree.leaves(states["l1/lora_a"]), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(p["l0/lora_a"], model.trainable["l0/lora_a"])


# --------------------------------------------------------------------------------------------
# Clients in chunks (round.client_chunk)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_epoch", "per_iteration"])
@pytest.mark.parametrize(("backend", "chunk"), [("vmap", 4), ("shard_map", 1)])
def test_client_chunks_give_the_same_numbers(mode, backend, chunk):
    """16 slots: vmap in 4 chunks of 4; shard_map 2 slots per device in 2 chunks of 1."""
    model = make_toy_model(dropout=0.1)
    slots = 16
    batches = _batches(m=11, slots=slots)
    whole = _spec(model, backend, mode, m=11, slots=slots)
    chunked = R.RoundSpec(**{**whole.__dict__, "client_chunk": chunk})
    state = R.init_server_state(model.trainable, whole.server_optimizer, seed=0)
    outs = [
        R.make_round_fn(spec)(state, model.frozen, batches, client_deltas=True)
        for spec in (whole, chunked)
    ]
    (ref_state, ref), (got_state, got) = outs
    for k in model.order:
        np.testing.assert_allclose(got_state.params[k], ref_state.params[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(
            got["client_deltas"][k], ref["client_deltas"][k], atol=1e-6, err_msg=k
        )
        np.testing.assert_allclose(got["trainers"][k], ref["trainers"][k])
    for name in ("train/loss", "train/examples", "train/steps", "train/clients"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=name)
    # Real work was done and chunking did not drop a client: 11 real clients counted.
    assert float(got["train/clients"]) == 11
    assert any(float(np.abs(got["client_deltas"][k][10]).max()) > 0 for k in model.order)


def test_bad_client_chunks_are_rejected():
    model = make_toy_model()
    base = _spec(model, "vmap")
    with pytest.raises(ValueError, match="client_chunk=3 must divide"):
        R.RoundSpec(**{**base.__dict__, "client_chunk": 3})
    with pytest.raises(ValueError, match="client_chunk must be >= 0"):
        R.RoundSpec(**{**base.__dict__, "client_chunk": -1})
    loop = _spec(model, "loop")
    with pytest.raises(ValueError, match="round.backend='loop' already runs one client"):
        R.RoundSpec(**{**loop.__dict__, "client_chunk": 2})
    sharded = _spec(model, "shard_map", slots=16)
    with pytest.raises(ValueError, match=r"padded_slots\(M, 8, 4\)"):
        R.RoundSpec(**{**sharded.__dict__, "client_chunk": 4})
    assert R.padded_slots(11, 8, 1) == 16 and R.padded_slots(11, 8, 4) == 32
    assert R.padded_slots(11, 1, 4) == 12 and R.padded_slots(11, 8) == 16
