"""Zero-order / finite-difference estimators against hand computations and their expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spry_jax.core import estimators as E
from spry_jax.core import zero_order as Z

KEY = jax.random.PRNGKey(3)
A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], np.float32)
C = np.array([0.3, -0.2, 0.1], np.float32)
PARAMS = {"a": jnp.array([0.5, -1.0, 0.8]), "b": jnp.array([[0.2, -0.4], [0.7, 0.1]])}
MASK = {"a": jnp.float32(1.0), "b": jnp.float32(1.0)}


def quadratic(w):
    """Coupled quadratic in `a`, separable in `b`; gradient known in closed form."""
    r = w["a"] - C
    return 0.5 * r @ (A @ r) + jnp.sum(w["b"] ** 2 * jnp.array([[1.0, 2.0], [3.0, 4.0]]))


def quadratic_grad(w):
    a = np.asarray(w["a"], np.float64)
    b = np.asarray(w["b"], np.float64)
    return {"a": A.astype(np.float64) @ (a - C), "b": 2 * b * np.array([[1.0, 2.0], [3.0, 4.0]])}


def quartic(w):
    return sum(jnp.sum(v**4) / 4 for v in w.values())


def _direction(key):
    # The documented generator: leaf i of z is normal(fold_in(key, i)) in sorted-key order.
    return {
        k: np.asarray(jax.random.normal(jax.random.fold_in(key, i), (1, *PARAMS[k].shape))[0])
        for i, k in enumerate(sorted(PARAMS))
    }


def _hand_central(f, z, eps):
    w = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    plus = float(f({k: jnp.asarray(w[k] + eps * z[k], jnp.float32) for k in w}))
    minus = float(f({k: jnp.asarray(w[k] - eps * z[k], jnp.float32) for k in w}))
    return (plus - minus) / (2 * eps), (plus + minus) / 2


@pytest.mark.parametrize("k,eps", [(1, 1e-3), (3, 1e-2), (10, 1e-4)])
def test_spsa_is_its_finite_difference_definition_with_equal_weights(k, eps):
    est = jax.jit(lambda key: Z.spsa(k, eps)(quadratic, PARAMS, MASK, key))(KEY)
    g = quadratic_grad(PARAMS)
    expected = {n: np.zeros(v.shape) for n, v in PARAMS.items()}
    losses = []
    for i in range(k):
        z = _direction(jax.random.fold_in(KEY, i))
        d, loss = _hand_central(quadratic, z, eps)
        # On a quadratic the central difference is exactly the directional derivative.
        exact = sum(float(np.sum(g[n] * z[n])) for n in g)
        # float32 loss rounding (~6e-8 * |f|) divided by 2 eps bounds the difference.
        np.testing.assert_allclose(float(est.jvps[i]), exact, atol=2e-7 / eps + 1e-4)
        np.testing.assert_allclose(float(est.jvps[i]), d, rtol=1e-3, atol=1e-3)
        for n in expected:
            expected[n] += d * z[n] / k  # every perturbation weighted 1/K
        losses.append(loss)
    for n in expected:
        np.testing.assert_allclose(est.grad[n], expected[n], rtol=2e-3, atol=2e-3, err_msg=n)
    np.testing.assert_allclose(float(est.loss), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(est.loss), float(quadratic(PARAMS)), rtol=1e-3)


def test_spsa_is_unbiased_for_the_gaussian_smoothed_loss_not_the_loss():
    # f = sum w^4 / 4: grad f_eps(w) = E[(w + eps u)^3] = w^3 + 3 eps^2 w.
    eps, n = 0.5, 8000
    keys = jax.random.split(KEY, n)
    grads = jax.jit(jax.vmap(lambda k: Z.spsa(1, eps)(quartic, PARAMS, MASK, k).grad))(keys)
    for name, w in PARAMS.items():
        w = np.asarray(w, np.float64)
        samples = np.asarray(grads[name], np.float64)
        mean = samples.mean(0)
        tol = 5 * samples.std(0, ddof=1) / np.sqrt(n)  # 5 standard errors per coordinate
        smoothed = w**3 + 3 * eps**2 * w
        assert np.all(np.abs(mean - smoothed) < tol), (name, mean, smoothed, tol)
        # ...and the test can tell the smoothed gradient from the plain one.
        assert np.any(np.abs(mean - w**3) > 3 * tol), name


def test_zero_order_estimates_vanish_off_the_mask():
    mask = {"a": jnp.float32(0.0), "b": jnp.float32(1.0)}
    for est in (
        Z.spsa(3, 1e-2)(quadratic, PARAMS, mask, KEY),
        Z.fwdllm(4, 2)(quadratic, PARAMS, mask, KEY, E.EstimatorInputs(guide=None)),
    ):
        assert np.all(np.asarray(est.grad["a"]) == 0)
        assert np.any(np.asarray(est.grad["b"]) != 0)


def _candidates(num):
    return {
        k: np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), (num, *PARAMS[k].shape)))
        for i, k in enumerate(sorted(PARAMS))
    }


def _flat(tree, i=None):
    return np.concatenate([np.ravel(tree[k] if i is None else tree[k][i]) for k in sorted(tree)])


@pytest.mark.parametrize("guided", [False, True])
def test_fwdllm_uses_the_most_aligned_candidates_by_hand(guided):
    num_c, k, eps = 6, 2, 1e-2
    cands = _candidates(num_c)
    if guided:
        guide = {"a": jnp.array([1.0, 0.0, -2.0]), "b": jnp.array([[0.0, 1.0], [0.5, 0.0]])}
        gv = _flat(guide)
        cos = [
            abs(_flat(cands, i) @ gv) / np.linalg.norm(_flat(cands, i)) / np.linalg.norm(gv)
            for i in range(num_c)
        ]
        chosen = list(np.argsort(cos)[::-1][:k])
    else:
        guide, chosen = {n: jnp.zeros_like(v) for n, v in PARAMS.items()}, [0, 1]  # round 0
    est = Z.fwdllm(num_c, k, eps)(quadratic, PARAMS, MASK, KEY, E.EstimatorInputs(guide=guide))
    expected = {n: np.zeros(v.shape) for n, v in PARAMS.items()}
    for j, i in enumerate(chosen):
        z = {n: cands[n][i] for n in cands}
        d, _ = _hand_central(quadratic, z, eps)
        np.testing.assert_allclose(float(est.jvps[j]), d, rtol=1e-3, atol=1e-3)
        for n in expected:
            expected[n] += d * z[n] / k
    for n in expected:
        np.testing.assert_allclose(est.grad[n], expected[n], rtol=2e-3, atol=2e-3, err_msg=n)


def test_fwdllm_guided_by_the_true_gradient_aligns_better_than_random():
    g = {k: jnp.asarray(v, jnp.float32) for k, v in quadratic_grad(PARAMS).items()}
    gv = _flat(quadratic_grad(PARAMS))
    keys = jax.random.split(KEY, 500)

    def mean_cos(guide):
        fn = jax.vmap(
            lambda key: (
                Z.fwdllm(10, 2, 1e-3)(
                    quadratic, PARAMS, MASK, key, E.EstimatorInputs(guide=guide)
                ).grad
            )
        )
        grads = jax.jit(fn)(keys)
        flat = np.concatenate([np.asarray(grads[k]).reshape(len(keys), -1) for k in sorted(g)], 1)
        return np.mean(flat @ gv / np.linalg.norm(flat, axis=1) / np.linalg.norm(gv))

    assert mean_cos(g) > mean_cos(None) + 0.2


def test_relative_variance_by_hand_and_the_filter_fires():
    cands = _candidates(3)
    ds = jnp.array([0.5, -1.0, 2.0])
    z = [_flat(cands, i) for i in range(3)]
    terms = np.stack([float(ds[i]) * z[i] for i in range(3)])
    mean = terms.mean(0)
    hand = np.sum((terms - mean) ** 2) / (3 * 2) / np.sum(mean**2)
    r = float(Z.relative_variance(ds, {k: jnp.asarray(v) for k, v in cands.items()}))
    np.testing.assert_allclose(r, hand, rtol=1e-5)

    base = Z.fwdllm(10, 4, 1e-3)(quadratic, PARAMS, MASK, KEY, E.NO_INPUTS)
    kept = Z.fwdllm(10, 4, 1e-3, var_threshold=1e9)(quadratic, PARAMS, MASK, KEY, E.NO_INPUTS)
    dropped = Z.fwdllm(10, 4, 1e-3, var_threshold=1e-9)(quadratic, PARAMS, MASK, KEY, E.NO_INPUTS)
    cands10 = {k: v[:4] for k, v in _candidates(10).items()}
    ratio = float(Z.relative_variance(base.jvps, {k: jnp.asarray(v) for k, v in cands10.items()}))
    assert 1e-9 < ratio < 1e9
    for k in PARAMS:
        np.testing.assert_array_equal(kept.grad[k], base.grad[k])
        assert np.all(np.asarray(dropped.grad[k]) == 0)
        assert np.any(np.asarray(base.grad[k]) != 0)
    mid = Z.fwdllm(10, 4, 1e-3, var_threshold=ratio * 0.99)(
        quadratic, PARAMS, MASK, KEY, E.NO_INPUTS
    )
    assert all(np.all(np.asarray(mid.grad[k]) == 0) for k in PARAMS)
    mid = Z.fwdllm(10, 4, 1e-3, var_threshold=ratio * 1.01)(
        quadratic, PARAMS, MASK, KEY, E.NO_INPUTS
    )
    assert all(np.any(np.asarray(mid.grad[k]) != 0) for k in PARAMS)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="num_perturbations"):
        Z.spsa(0)
    with pytest.raises(ValueError, match="eps"):
        Z.spsa(1, 0.0)
    with pytest.raises(ValueError, match="fwdllm_num_candidates"):
        Z.fwdllm(1, 2)
    with pytest.raises(ValueError, match="fwdllm_var_threshold"):
        Z.fwdllm(10, 1, var_threshold=0.5)
    with pytest.raises(ValueError, match="layers_per_step"):
        E.lcsb(0)
