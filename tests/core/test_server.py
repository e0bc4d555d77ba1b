import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spry_jax.core import server


def _run(opt, w, deltas):
    state = opt.init(w)
    for d in deltas:
        upd, state = opt.update(jnp.negative(d), state, w)
        w = optax.apply_updates(w, upd)
    return np.asarray(w)


def _hand(w, deltas, lr, b1, b2, tau, yogi):
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if yogi:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        w = w + lr * m / (np.sqrt(v) + tau)
    return w


W = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
DELTAS = [
    np.array(x, np.float32)
    for x in ([0.1, -0.2, 0.0, 0.3], [-0.05, 0.4, 0.1, 0.3], [0.2, 0.0, -0.3, -0.1])
]


def test_flower_yogi_first_step_by_hand():
    # v0 = 0: v1 = (1-b2) d^2 ; m1 = (1-b1) d ; w1 = w + lr m1 / (sqrt(v1) + tau).
    d = DELTAS[0]
    expected = W + 1e-2 * (0.1 * d) / (np.sqrt(0.01 * d * d) + 1e-3)
    np.testing.assert_allclose(
        _run(server.flower_yogi(), jnp.asarray(W), DELTAS[:1]), expected, rtol=1e-6
    )


@pytest.mark.parametrize("yogi", [True, False])
def test_flower_moments_match_hand_computation(yogi):
    opt = (
        server.flower_yogi(1e-2, 0.9, 0.99, 1e-3)
        if yogi
        else server.flower_adam(1e-2, 0.9, 0.99, 1e-3)
    )
    got = _run(opt, jnp.asarray(W), DELTAS)
    np.testing.assert_allclose(
        got, _hand(W, DELTAS, 1e-2, 0.9, 0.99, 1e-3, yogi), rtol=1e-5, atol=1e-7
    )


def test_yogi_and_adam_differ_once_v_exceeds_delta_squared():
    a = _run(server.flower_yogi(), jnp.asarray(W), DELTAS)
    b = _run(server.flower_adam(), jnp.asarray(W), DELTAS)
    assert np.abs(a - b).max() > 5e-5


def test_fedavg_adds_the_mean_delta():
    np.testing.assert_allclose(
        _run(server.make_server_optimizer("fedavg", 1.0), jnp.asarray(W), DELTAS[:1]),
        W + DELTAS[0],
        rtol=1e-7,
    )


def test_optax_bias_corrected_variants_are_selectable_and_differ():
    flower = _run(server.make_server_optimizer("fedadam", 1e-2), jnp.asarray(W), DELTAS)
    biased = _run(server.make_server_optimizer("optax_adam", 1e-2), jnp.asarray(W), DELTAS)
    # optax.adam with eps=tau on g = -delta: bias-corrected, so the first step is lr*sign(delta)-ish.
    ref = _run(optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3), jnp.asarray(W), DELTAS)
    np.testing.assert_allclose(biased, ref, rtol=1e-6)
    assert np.abs(flower - biased).max() > 1e-4
    _run(server.make_server_optimizer("optax_yogi", 1e-2), jnp.asarray(W), DELTAS)


def test_unknown_server_optimizer_is_rejected():
    with pytest.raises(ValueError, match="server.optimizer"):
        server.make_server_optimizer("fedprox", 1.0)


@pytest.mark.parametrize(
    "schedule, final, factors",
    [
        ("cosine", 0.0, [1.0, 0.5, 0.0, 0.0]),  # 0.5 * (1 + cos(pi * t)), t = r / (rounds - 1)
        ("linear", 0.2, [1.0, 0.6, 0.2, 0.2]),  # 0.2 + 0.8 * (1 - t); held after the last round
    ],
)
def test_server_schedule_scales_each_rounds_step_by_hand(schedule, final, factors):
    opt = server.with_schedule(server.make_server_optimizer("fedavg", 2.0), schedule, 3, final)
    w = {"a": jnp.zeros(2)}
    state = opt.init(w)
    delta = {"a": jnp.array([1.0, -3.0])}
    for f in factors:
        before = np.asarray(w["a"])
        updates, state = opt.update({"a": -delta["a"]}, state, w)
        w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(
            np.asarray(w["a"]) - before, 2.0 * f * np.array([1.0, -3.0]), atol=1e-6
        )


def test_constant_schedule_keeps_the_optimizer_and_bad_names_are_rejected():
    opt = server.make_server_optimizer("fedyogi", 1e-2)
    assert server.with_schedule(opt, "constant", 10) is opt
    with pytest.raises(ValueError, match="server.schedule"):
        server.with_schedule(opt, "step", 10)
    with pytest.raises(ValueError, match="server.final_fraction"):
        server.with_schedule(opt, "cosine", 10, 1.5)
