"""Forward-gradient estimates against jax.grad, with tolerances derived from the sample count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spry_jax import tasks
from spry_jax.core import estimators as E
from tests.core.toy import make_toy_batches, make_toy_model

N_SAMPLES = 20000


@pytest.fixture(scope="module")
def problem():
    model = make_toy_model(seed=1)
    batches = make_toy_batches(1, 1, 16, seed=2)
    batch = {k: v[0, 0] for k, v in batches.items() if k != "step_mask"}
    loss_fn = tasks.make_loss_fn(model)
    f = lambda w: loss_fn(w, model.frozen, batch, None)  # noqa: E731
    return model, f, jax.grad(f)(model.trainable)


def _mask(model, keys):
    return {k: jnp.float32(k in keys) for k in model.trainable}


def _flat(tree, keys):
    return np.concatenate([np.ravel(tree[k]) for k in keys])


def _samples(estimator, f, params, mask, n=N_SAMPLES):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    return jax.jit(jax.vmap(lambda k: estimator(f, params, mask, k).grad))(keys)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_forward_gradient_is_unbiased_on_the_mask_and_zero_off_it(problem, sigma):
    model, f, grad = problem
    unit = ("l0/lora_a", "l0/lora_b")
    samples = _samples(E.forward(1, sigma), f, model.trainable, _mask(model, unit))
    g = _flat(grad, unit) * sigma**2
    est = np.concatenate([np.asarray(samples[k]).reshape(N_SAMPLES, -1) for k in unit], 1)
    mean = est.mean(0)
    # For v ~ N(0, s^2 I) on the mask: Var[(grad.v) v_i] = s^4 (|grad|^2 + grad_i^2) per sample.
    var = sigma**4 * (np.sum(_flat(grad, unit) ** 2) + _flat(grad, unit) ** 2)
    z = (mean - g) / np.sqrt(var / N_SAMPLES)
    assert np.abs(z).max() < 5.0, f"max |z| = {np.abs(z).max():.2f}"
    # A wrong estimator (e.g. sigma^2 ignored, or unmasked tangents) would be far off:
    assert np.abs(mean - g).max() < 0.2 * np.abs(g).max() + 5 * np.sqrt(var.max() / N_SAMPLES)
    for k in model.trainable:
        if k not in unit:
            assert float(jnp.abs(samples[k]).max()) == 0.0, k


def test_mean_over_k_tangents_reduces_variance(problem):
    model, f, grad = problem
    unit = ("l1/lora_a", "l1/lora_b")
    mask = _mask(model, unit)
    g = _flat(grad, unit)
    errs = []
    for k in (1, 8):
        s = _samples(E.forward(k), f, model.trainable, mask, n=2000)
        est = np.concatenate([np.asarray(s[u]).reshape(2000, -1) for u in unit], 1)
        errs.append(np.mean(np.sum((est - g) ** 2, 1)))
    # E|g_K - grad|^2 = (d + 1) |grad|^2 / K: eight tangents cut it ~8x.
    assert 5.0 < errs[0] / errs[1] < 12.0, errs


def test_split_estimate_is_closer_to_the_gradient_than_unsplit(problem, capsys):
    model, f, grad = problem
    unit = ("l0/lora_a", "l0/lora_b")
    split = _samples(E.forward(1), f, model.trainable, _mask(model, unit), n=4000)
    full = _samples(E.forward(1), f, model.trainable, _mask(model, model.order), n=4000)

    def mean_cos(samples, keys):
        est = np.concatenate([np.asarray(samples[k]).reshape(4000, -1) for k in keys], 1)
        g = _flat(grad, keys)
        return float(np.mean(est @ g / (np.linalg.norm(est, axis=1) * np.linalg.norm(g) + 1e-30)))

    cos_split = mean_cos(split, unit)
    cos_full = mean_cos(full, model.order)
    with capsys.disabled():
        print(
            f"\n  mean cosine to true gradient, K=1: split (one unit) {cos_split:.3f} vs unsplit {cos_full:.3f}"
        )
    assert cos_split > cos_full + 0.05


def test_backprop_estimator_is_the_masked_gradient(problem):
    model, f, grad = problem
    unit = ("l1/lora_a", "l1/lora_b", "head/kernel")
    out = E.backprop()(f, model.trainable, _mask(model, unit), jax.random.PRNGKey(0))
    remat = E.backprop(remat=True)(f, model.trainable, _mask(model, unit), jax.random.PRNGKey(0))
    for k in model.trainable:
        expected = grad[k] if k in unit else jnp.zeros_like(grad[k])
        np.testing.assert_allclose(out.grad[k], expected, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(remat.grad[k], expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.loss, f(model.trainable), rtol=1e-6)


def test_jvp_scalars_are_directional_derivatives_and_map_equals_vmap(problem):
    model, f, grad = problem
    mask = _mask(model, model.order)
    key = jax.random.PRNGKey(7)
    a = E.forward(3, batching="vmap")(f, model.trainable, mask, key)
    b = E.forward(3, batching="map")(f, model.trainable, mask, key)
    tangents = E.draw_tangents(key, model.trainable, mask, 3)
    expected = [sum(float(jnp.vdot(grad[k], tangents[k][i])) for k in grad) for i in range(3)]
    np.testing.assert_allclose(a.jvps, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.jvps, b.jvps, rtol=1e-5, atol=1e-7)
    for k in grad:
        np.testing.assert_allclose(a.grad[k], b.grad[k], rtol=1e-5, atol=1e-7)


def test_server_reconstruction_equals_client_forward_gradient(problem):
    model, f, _ = problem
    mask = _mask(model, ("l0/lora_a", "l0/lora_b", "head/bias"))
    key = jax.random.PRNGKey(11)
    client = E.forward(4, sigma=0.7)(f, model.trainable, mask, key)
    rebuilt = E.reconstruct_gradient(key, model.trainable, mask, client.jvps, sigma=0.7)
    for k in model.trainable:
        np.testing.assert_allclose(rebuilt[k], client.grad[k], rtol=1e-6, atol=1e-8)


def test_bad_forward_settings_name_the_field():
    with pytest.raises(ValueError, match="num_tangents"):
        E.forward(0)
    with pytest.raises(ValueError, match="sigma"):
        E.forward(1, sigma=0.0)
    with pytest.raises(ValueError, match="tangent_batching"):
        E.forward(1, batching="pmap")


HEAD = ("head/kernel", "head/bias")


def test_exact_head_is_the_head_gradient_and_separate_head_is_unbiased(problem):
    """fwd.head='exact' gives jax.grad on the head; 'separate' is unbiased on head and body, and
    the body's variance no longer carries the head's gradient norm."""
    model, f, grad = problem
    unit = ("l0/lora_a", "l0/lora_b")
    mask = _mask(model, unit + HEAD)
    exact = E.forward(1, head_keys=HEAD, head_mode="exact")(
        f, model.trainable, mask, jax.random.PRNGKey(3)
    )
    for k in HEAD:
        np.testing.assert_allclose(exact.grad[k], grad[k], rtol=1e-5, atol=1e-7)
    for k in ("l1/lora_a", "l1/lora_b"):
        assert float(jnp.abs(exact.grad[k]).max()) == 0.0

    samples = _samples(
        E.forward(1, head_keys=HEAD, head_mode="separate", head_tangents=2),
        f,
        model.trainable,
        mask,
    )
    for keys, k_draws in ((unit, 1), (HEAD, 2)):
        g = _flat(grad, keys)
        est = np.concatenate([np.asarray(samples[k]).reshape(N_SAMPLES, -1) for k in keys], 1)
        # Each block's noise involves only its own gradient: Var = (|g_b|^2 + g_i^2) / K_b.
        var = (np.sum(g**2) + g**2) / k_draws
        z = (est.mean(0) - g) / np.sqrt(var / N_SAMPLES)
        assert np.abs(z).max() < 5.0, (keys, np.abs(z).max())
        sampled = est.var(0)
        np.testing.assert_allclose(sampled, var, rtol=0.1)


def test_head_modes_need_per_epoch_and_joint_is_unchanged(problem):
    model, f, _ = problem
    mask = _mask(model, ("l1/lora_a", "l1/lora_b") + HEAD)
    key = jax.random.PRNGKey(5)
    a = E.forward(4)(f, model.trainable, mask, key)
    b = E.forward(4, head_keys=HEAD, head_mode="joint")(f, model.trainable, mask, key)
    for k in model.trainable:
        np.testing.assert_array_equal(a.grad[k], b.grad[k])
    with pytest.raises(ValueError, match="fwd.head"):
        E.forward(1, head_keys=HEAD, head_mode="jointly")
    from spry_jax import methods
    from spry_jax.config import default_config

    c = default_config()
    c.fwd.head = "exact"
    c.comm_mode = "per_iteration"
    with pytest.raises(ValueError, match="fwd.head='exact' needs comm_mode='per_epoch'"):
        methods.build_round_parts(c)


def test_rademacher_tangents_are_unbiased_with_their_smaller_variance(problem):
    """fwd.tangents='rademacher': E = sigma^2 grad, Var_i = sigma^4 (|g|^2 - g_i^2), which a
    Gaussian draw (|g|^2 + g_i^2) would fail on the sampled-variance check."""
    model, f, grad = problem
    unit = ("l0/lora_a", "l0/lora_b")
    sigma = 0.5
    samples = _samples(
        E.forward(1, sigma, distribution="rademacher"), f, model.trainable, _mask(model, unit)
    )
    g = _flat(grad, unit)
    est = np.concatenate([np.asarray(samples[k]).reshape(N_SAMPLES, -1) for k in unit], 1)
    var = sigma**4 * (np.sum(g**2) - g**2)
    z = (est.mean(0) - sigma**2 * g) / np.sqrt(var / N_SAMPLES)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    np.testing.assert_allclose(est.var(0), var, rtol=0.1)
    # Every tangent entry is +-sigma on the mask and 0 off it.
    t = E.draw_tangents(
        jax.random.PRNGKey(0), model.trainable, _mask(model, unit), 3, sigma, "rademacher"
    )
    for k, v in t.items():
        want = {sigma} if k in unit else {0.0}
        assert set(np.unique(np.abs(np.asarray(v))).tolist()) == want, k
    with pytest.raises(ValueError, match="fwd.tangents"):
        E.forward(1, distribution="uniform")


def test_rademacher_per_iteration_reconstruction_is_exact(problem):
    model, f, _ = problem
    mask = _mask(model, ("l0/lora_a", "l0/lora_b", "head/bias"))
    key = jax.random.PRNGKey(12)
    client = E.forward(4, sigma=0.7, distribution="rademacher")(f, model.trainable, mask, key)
    rebuilt = E.reconstruct_gradient(key, model.trainable, mask, client.jvps, 0.7, "rademacher")
    gauss = E.reconstruct_gradient(key, model.trainable, mask, client.jvps, 0.7)
    for k in model.trainable:
        np.testing.assert_allclose(rebuilt[k], client.grad[k], rtol=1e-6, atol=1e-8)
    assert any(not np.allclose(gauss[k], client.grad[k]) for k in mask if mask[k])


def test_frozen_lora_a_perturbs_only_b_unbiased_and_marks_a_not_estimated(problem):
    """fwd.lora_a='frozen' (LoRA-FA): A gets no tangent, a zero gradient and is not estimated;
    B's estimate is unbiased with a variance carrying only B's (and nothing of A's) gradient."""
    model, f, grad = problem
    unit = ("l0/lora_a", "l0/lora_b")
    mask = _mask(model, unit + HEAD)
    est = E.forward(2, head_keys=HEAD, head_mode="exact", frozen_keys=("l0/lora_a", "l1/lora_a"))
    one = est(f, model.trainable, mask, jax.random.PRNGKey(4))
    assert float(jnp.abs(one.grad["l0/lora_a"]).max()) == 0.0
    assert float(one.estimated["l0/lora_a"]) == 0.0 and float(one.estimated["l0/lora_b"]) == 1.0
    assert float(one.estimated["head/kernel"]) == 1.0 and float(one.estimated["l1/lora_b"]) == 0.0
    for k in HEAD:
        np.testing.assert_allclose(one.grad[k], grad[k], rtol=1e-5, atol=1e-7)
    samples = _samples(est, f, model.trainable, mask)
    g = _flat(grad, ("l0/lora_b",))
    b = np.asarray(samples["l0/lora_b"]).reshape(N_SAMPLES, -1)
    var = (np.sum(g**2) + g**2) / 2
    z = (b.mean(0) - g) / np.sqrt(var / N_SAMPLES)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    np.testing.assert_allclose(b.var(0), var, rtol=0.1)
    assert float(jnp.abs(samples["l0/lora_a"]).max()) == 0.0
    with pytest.raises(ValueError, match="overlap the head"):
        E.forward(1, head_keys=HEAD, head_mode="exact", frozen_keys=("head/bias",))


def test_frozen_lora_a_config_checks_and_a_stays_put_in_a_client_update():
    from spry_jax import methods
    from spry_jax.config import default_config

    c = default_config()
    c.fwd.lora_a = "frozen"
    c.comm_mode = "per_iteration"
    with pytest.raises(ValueError, match="fwd.lora_a='frozen' needs comm_mode='per_epoch'"):
        methods.build_round_parts(c)
    c.comm_mode = "per_epoch"
    c.peft.method = "ia3"
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        methods.build_round_parts(c)
    c.fwd.lora_a = "frozn"
    c.peft.method = "lora"
    with pytest.raises(ValueError, match="fwd.lora_a must be one of"):
        methods.build_round_parts(c)
