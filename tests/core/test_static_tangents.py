"""round.static_tangents: a client's jvp only over its own layers gives the same numbers as the
runtime-mask path, and its branches carry no tangent below the client's lowest unit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import smoke
from spry_jax import config as config_lib
from spry_jax import methods, models, tasks
from spry_jax.bench.static_tangents import branch_flops
from spry_jax.core import estimators as E
from spry_jax.core import round as R
from spry_jax.core import units as U
from spry_jax.errors import ConfigError
from tests.core.test_round import _batches, _spec
from tests.core.toy import make_toy_batches, make_toy_model
from tests.test_methods import _loss_closure
from tests.test_train import _smoke

TOY_ORDER = ("l0/lora_a", "l0/lora_b", "l1/lora_a", "l1/lora_b", "head/kernel", "head/bias")
TOY_LAYER = {"l0/lora_a": 0, "l0/lora_b": 0, "l1/lora_a": 1, "l1/lora_b": 1}


def _toy_units(tensors_per_unit=2):
    model = make_toy_model()
    return U.make_units(model.order, tensors_per_unit, model.head_keys, peft_method="lora")


def test_tangent_sets_start_at_each_slots_lowest_layer():
    units = _toy_units()  # units: l0 (A, B), l1 (A, B), head
    # M = 2: slot 0 has units 0 and 2 (everything from l0), slot 1 unit 1 (from l1 up).
    assert U.tangent_sets(units, 2, TOY_LAYER.get) == (TOY_ORDER[2:], TOY_ORDER)
    # M = 3, and M = 7 > G = 3 (each slot one unit): head, from l1, from l0.
    want = (TOY_ORDER[4:], TOY_ORDER[2:], TOY_ORDER)
    assert U.tangent_sets(units, 3, TOY_LAYER.get) == want
    assert U.tangent_sets(units, 7, TOY_LAYER.get) == want
    # A and B apart (5 units): the slots holding l0/lora_b or l1/lora_b start at their layer's
    # first leaf, so 5 slots share 3 sets.
    assert U.tangent_sets(_toy_units(1), 5, TOY_LAYER.get) == want
    # Without layers every leaf starts its own set.
    assert U.tangent_sets(_toy_units(1), 5, lambda k: None) == tuple(
        TOY_ORDER[p:] for p in (4, 3, 2, 1, 0)
    )


def _toy_problem():
    model = make_toy_model(dropout=0.1)
    b = make_toy_batches(1, 1, 4, seed=3)
    batch = {k: v[0, 0] for k, v in b.items() if k != "step_mask"}
    loss_fn = tasks.make_loss_fn(model)
    f = lambda p: loss_fn(p, model.frozen, batch, jax.random.PRNGKey(5))  # noqa: E731
    # Move every leaf so that no gradient is trivially zero.
    params = {
        k: v + 0.2 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
        for i, (k, v) in enumerate(sorted(model.trainable.items()))
    }
    return model, f, params


def _masks(units):
    """Every slot mask of the M = 2 and M = 3 dealings, an empty (padded) slot, and a mask that
    fits only the full set."""
    out = []
    for m in (2, 3):
        assign = U.assign_units(jax.random.PRNGKey(m), m, units.num_units)
        masks = U.unit_masks(units, assign)
        out += [{k: v[c] for k, v in masks.items()} for c in range(m)]
    out.append({k: jnp.float32(0) for k in units.keys})
    out.append({k: jnp.float32(k in ("l0/lora_b", "head/bias")) for k in units.keys})
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"head_keys": ("head/kernel", "head/bias"), "head_mode": "separate", "head_tangents": 3},
        {"frozen_keys": ("l0/lora_a", "l1/lora_a"), "distribution": "rademacher"},
        {"batching": "map"},
    ],
    ids=["joint", "separate-head", "frozen-A", "map"],
)
def test_restricted_estimate_equals_the_runtime_mask_estimate(kwargs):
    model, f, params = _toy_problem()
    units = _toy_units()
    sets = U.tangent_sets(units, 3, TOY_LAYER.get)
    plain = jax.jit(lambda p, m, k: E.forward(3, 0.7, **kwargs)(f, p, m, k))
    static = jax.jit(lambda p, m, k: E.forward(3, 0.7, tangent_sets=sets, **kwargs)(f, p, m, k))
    for i, mask in enumerate(_masks(units)):
        key = jax.random.PRNGKey(10 + i)
        want, got = plain(params, mask, key), static(params, mask, key)
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-6)
        np.testing.assert_allclose(got.jvps, want.jvps, rtol=1e-5, atol=1e-7)
        for k in params:
            np.testing.assert_allclose(got.grad[k], want.grad[k], rtol=1e-5, atol=1e-7, err_msg=k)
            if not any(mask[k] for k in params):
                assert not np.any(np.asarray(got.grad[k]))
        assert (got.estimated is None) == (want.estimated is None)
        if want.estimated is not None:
            for k in params:
                np.testing.assert_array_equal(got.estimated[k], want.estimated[k])


def test_branches_carry_no_tangent_below_the_lowest_layer():
    """The real tiny BERT (LoRA on query/value of 2 layers): the branch starting at layer 1 costs
    fewer FLOPs than the full jvp, the head's branch fewer still, the empty one least."""
    c = smoke.get_config()
    model = models.make_split_model(c.model, c.peft, task="classification", num_labels=2, seed=0)
    units = U.make_units(model.order, 2, model.head_keys, peft_method="lora")
    sets = U.tangent_sets(units, units.num_units, E.layer_index)
    assert len(sets) == 3 and sets[-1] == model.order  # head, from layer 1, everything
    f = _loss_closure(model)
    mask = {k: jnp.float32(1) for k in model.trainable}
    empty, head, upper, full = branch_flops(
        E.forward(1, tangent_sets=sets), f, model.trainable, mask, jax.random.PRNGKey(1)
    )
    assert empty < head < upper < full, (empty, head, upper, full)
    # The layer-1 branch saves about one layer's tangent pass of the two.
    assert upper < 0.9 * full


def _static_spec(spec, m, chunk=None):
    units = spec.units
    sets = U.tangent_sets(units, m, TOY_LAYER.get)
    est = E.forward(2, 1.0, tangent_sets=sets)
    changes = {"estimator": est}
    if chunk is not None:
        changes["client_chunk"] = chunk
    return R.RoundSpec(**{**spec.__dict__, **changes})


@pytest.mark.parametrize("mode", ["per_epoch", "per_iteration"])
@pytest.mark.parametrize(
    ("backend", "m", "slots"), [("vmap", 5, 8), ("vmap", 7, 8), ("shard_map", 11, 16)]
)
def test_round_with_static_tangents_gives_the_same_numbers(mode, backend, m, slots):
    """Clients one at a time (client_chunk = 1) with the switch vs all slots vmapped with the
    runtime mask; M = 7 > G = 3 shares units; 8 fake devices for shard_map."""
    model = make_toy_model(dropout=0.1)
    batches = _batches(m=m, slots=slots)
    whole = _spec(model, backend, mode, m=m, slots=slots)
    static = _static_spec(whole, m, chunk=1)
    state = R.init_server_state(model.trainable, whole.server_optimizer, seed=0)
    (ref_state, ref), (got_state, got) = [
        R.make_round_fn(spec)(state, model.frozen, batches, client_deltas=True)
        for spec in (whole, static)
    ]
    for k in model.order:
        np.testing.assert_allclose(got_state.params[k], ref_state.params[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(
            got["client_deltas"][k], ref["client_deltas"][k], atol=1e-6, err_msg=k
        )
    for name in ("train/loss", "train/examples", "train/steps", "train/clients"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=name)
    assert float(got["train/clients"]) == m
    assert all(float(np.abs(got["client_deltas"][k][:m]).max()) > 0 for k in model.order)


def test_loop_backend_with_static_tangents_gives_the_same_numbers():
    model = make_toy_model(dropout=0.1)
    batches = _batches()
    plain = _spec(model, "loop")
    static = _static_spec(plain, 5)
    state = R.init_server_state(model.trainable, plain.server_optimizer, seed=0)
    (ref_state, ref), (got_state, got) = [
        R.make_round_fn(spec)(state, model.frozen, batches) for spec in (plain, static)
    ]
    for k in model.order:
        np.testing.assert_allclose(got_state.params[k], ref_state.params[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got["train/loss"], ref["train/loss"], rtol=1e-6)


def test_config_resolution_and_refusals():
    units = _toy_units()
    # auto: on where a client is traced alone and the method splits forward gradients.
    sharded = {"round.backend": "shard_map"}  # the default backend, all slots vmapped
    assert methods.static_tangent_sets(_smoke(**sharded), units) == ()
    assert methods.static_tangent_sets(_smoke(), units) == ()  # vmap, all slots at once
    auto = methods.static_tangent_sets(_smoke(**{"round.client_chunk": 1}), units)
    assert auto == U.tangent_sets(units, 4, E.layer_index) and auto
    assert methods.static_tangent_sets(_smoke(**{"round.backend": "loop"}), units) == auto
    assert (
        methods.static_tangent_sets(_smoke(method="fedavg", **{"round.backend": "loop"}), units)
        == ()
    )
    off = _smoke(**{"round.client_chunk": 1, "round.static_tangents": "off"})
    assert methods.static_tangent_sets(off, units) == ()
    # on, where it cannot apply: refused naming the field and the fix.
    with pytest.raises(ConfigError, match=r"round.static_tangents='on'.*round.client_chunk=1"):
        methods.static_tangent_sets(_smoke(**sharded, **{"round.static_tangents": "on"}), units)
    on_fedfgd = _smoke(method="fedfgd", **{"round.static_tangents": "on", "round.backend": "loop"})
    with pytest.raises(ConfigError, match="no weight split"):
        methods.static_tangent_sets(on_fedfgd, units)
    with pytest.raises(ConfigError, match="round.static_tangents='sometimes'"):
        config_lib.validate(_smoke(**{"round.static_tangents": "sometimes"}))
    # Records written before the field ran the runtime-mask path.
    assert config_lib.added_with_default("round.static_tangents", "off")
    assert not config_lib.added_with_default("round.static_tangents", "auto")


def test_training_with_static_tangents_matches_the_runtime_mask_run(tmp_path, monkeypatch):
    """The CLI's path: the smoke config one client at a time, auto (on) against off."""
    from spry_jax import train

    resolved = []
    resolve = methods.static_tangent_sets
    monkeypatch.setattr(
        methods, "static_tangent_sets", lambda c, u: resolved.append(resolve(c, u)) or resolved[-1]
    )
    summaries = {}
    for mode in ("auto", "off"):
        cfg = _smoke(
            rounds=1,
            eval_all_clients=False,
            **{"round.backend": "vmap", "round.client_chunk": 1, "round.static_tangents": mode},
        )
        summaries[mode] = train.train_and_evaluate(cfg, str(tmp_path / mode))
    assert len(resolved) == 2 and resolved[0] and not resolved[1]
    np.testing.assert_allclose(
        summaries["auto"]["train/loss"], summaries["off"]["train/loss"], rtol=1e-6
    )
