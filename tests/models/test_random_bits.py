"""Hashed dropout bits (``model.dropout_bits="hash"``): same keys as threefry, sound masks, the
same bits under vmap as in a loop, and a loss whose dropout is really applied."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spry_jax import config as config_lib
from spry_jax import tasks
from spry_jax.errors import ConfigError
from spry_jax.models import random_bits


@pytest.fixture(scope="module")
def tiny_model_and_batch():
    from spry_jax import models

    model = models.make_split_model(
        dict(name="tiny-bert", pretrained=False, dtype="float32", dropout=0.1),
        dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=0.1, target_modules=[]),
        task="classification",
        num_labels=2,
    )
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(5, 100, (4, 16)), jnp.int32),
        "attention_mask": jnp.ones((4, 16), jnp.int32),
        "labels": jnp.asarray([0, 1, 1, 0], jnp.int32),
        "example_mask": jnp.ones((4,), jnp.float32),
    }
    return model, batch


def _hash_key(seed=0):
    return random_bits.dropout_key(jax.random.PRNGKey(seed), "hash")


def test_key_derivation_is_threefrys():
    raw = jax.random.PRNGKey(7)
    key = random_bits.dropout_key(raw, "hash")
    np.testing.assert_array_equal(jax.random.key_data(key), raw)
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.fold_in(key, 3)), jax.random.fold_in(raw, 3)
    )
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.split(key, 4)), jax.random.split(raw, 4)
    )


def test_bits_are_a_pure_function_of_key_and_index():
    key = _hash_key(1)
    a = jax.random.bits(key, (1000,))
    np.testing.assert_array_equal(a, jax.random.bits(key, (1000,)))
    # element i does not depend on the draw's shape: a longer draw extends a shorter one
    np.testing.assert_array_equal(jax.random.bits(key, (4000,))[:1000], a)
    np.testing.assert_array_equal(jax.random.bits(key, (10, 100)).ravel(), a)
    other = jax.random.bits(jax.random.fold_in(key, 1), (1000,))
    assert np.mean(np.asarray(a) == np.asarray(other)) < 0.01
    # not the threefry stream (the point of the scheme)
    assert not np.array_equal(a, jax.random.bits(jax.random.PRNGKey(1), (1000,)))


def test_vmapped_draws_equal_the_loop_of_draws():
    """What rbg cannot do (its vmap rule draws every key's bits from the first key)."""
    keys = jax.vmap(
        lambda i: random_bits.dropout_key(jax.random.fold_in(jax.random.PRNGKey(0), i), "hash")
    )(jnp.arange(5))
    batched = jax.jit(jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, (3, 17))))(keys)
    for i in range(5):
        np.testing.assert_array_equal(batched[i], jax.random.bernoulli(keys[i], 0.9, (3, 17)))
    assert not np.array_equal(batched[0], batched[1])


def test_rbg_is_not_usable_because_its_vmap_draws_from_the_first_key():
    """Why the scheme is not ``rbg``: its vmapped draws differ from its own per-key draws (all
    come from the first key), so a vmapped round would not equal the loop. If JAX changes
    this, rbg becomes a candidate again (measured by ``python -m spry_jax.bench.random_bits``)."""

    def rbg(i):
        data = jax.random.bits(jax.random.fold_in(jax.random.PRNGKey(0), i), (4,), jnp.uint32)
        return jax.random.wrap_key_data(data, impl="rbg")

    keys = jax.vmap(rbg)(jnp.arange(3))
    batched = jax.vmap(lambda k: jax.random.bits(k, (8,)))(keys)
    np.testing.assert_array_equal(batched[0], jax.random.bits(keys[0], (8,)))
    assert not np.array_equal(batched[1], jax.random.bits(keys[1], (8,)))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_mask_rate_within_the_binomial_error(keep):
    n = 1 << 20
    m = np.asarray(jax.random.bernoulli(_hash_key(2), keep, (n,)))
    sd = np.sqrt(keep * (1 - keep) / n)
    assert abs(m.mean() - keep) < 5 * sd


def test_bits_are_uniform_and_uncorrelated():
    n = 1 << 18
    key = _hash_key(3)
    u = np.asarray(jax.random.uniform(key, (n,)), np.float64)
    # 256-bin histogram: chi-square with 255 degrees of freedom (mean 255, sd ~22.6)
    counts = np.bincount((u * 256).astype(int), minlength=256)
    chi2 = float(np.sum((counts - n / 256) ** 2 / (n / 256)))
    assert chi2 < 255 + 6 * 22.6
    z = (u - 0.5) * np.sqrt(12)  # unit variance; correlations have sd ~1/sqrt(n)
    tol = 5 / np.sqrt(n)
    for lag in (1, 2, 64, 384):
        assert abs(np.mean(z[:-lag] * z[lag:])) < tol, lag
    for k2 in (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1), _hash_key(4)):
        v = (np.asarray(jax.random.uniform(k2, (n,)), np.float64) - 0.5) * np.sqrt(12)
        assert abs(np.mean(z * v)) < tol
    # every bit of the words is balanced
    words = np.asarray(jax.random.bits(key, (n,)), np.uint64)
    for b in range(32):
        assert abs(((words >> b) & 1).mean() - 0.5) < 5 * 0.5 / np.sqrt(n), b


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_every_bit_width(dtype):
    with jax.enable_x64(dtype == "uint64"):  # jax.random.bits makes 64-bit words only under x64
        x = np.asarray(jax.random.bits(_hash_key(5), (4096,), jnp.dtype(dtype)))
    assert x.dtype == np.dtype(dtype) and x.shape == (4096,)
    width = np.dtype(dtype).itemsize * 8
    assert abs(x.astype(np.float64).mean() / (2.0**width - 1) - 0.5) < 0.03
    assert len(np.unique(x)) > 0.9 * min(4096, 2**width)


def test_dropout_key_passes_none_and_threefry_through_and_refuses_a_bad_scheme():
    raw = jax.random.PRNGKey(0)
    assert random_bits.dropout_key(None, "hash") is None
    assert random_bits.dropout_key(raw, "threefry") is raw
    with pytest.raises(ValueError, match="model.dropout_bits"):
        random_bits.dropout_key(raw, "philox")


def test_config_refuses_a_bad_scheme_naming_the_field():
    cfg = config_lib.default_config()
    cfg.model.dropout_bits = "rbg"
    with pytest.raises(ConfigError, match="model.dropout_bits='rbg'"):
        config_lib.validate(cfg)


def test_a_run_recorded_before_the_field_existed_used_threefry():
    """Old checkpoints and study cells (no ``model.dropout_bits``) drew threefry masks: they
    resume under ``threefry`` and are refused under the new default."""
    assert config_lib.default_config().model.dropout_bits == "hash"
    assert config_lib.added_with_default("model.dropout_bits", "threefry")
    assert not config_lib.added_with_default("model.dropout_bits", "hash")


def test_hashed_dropout_is_applied_in_the_loss(tiny_model_and_batch):
    """Both schemes drop (the loss differs from the deterministic one and between keys), with
    different masks; without a key both are the deterministic loss."""
    model, tiny_batch = tiny_model_and_batch
    losses = {}
    for scheme in random_bits.DROPOUT_BITS:
        f = jax.jit(tasks.make_loss_fn(model, scheme))
        det = f(model.trainable, model.frozen, tiny_batch, None)
        k0 = f(model.trainable, model.frozen, tiny_batch, jax.random.PRNGKey(0))
        k1 = f(model.trainable, model.frozen, tiny_batch, jax.random.PRNGKey(1))
        assert k0 != det and k1 != k0
        losses[scheme] = (det, k0)
    assert losses["hash"][0] == losses["threefry"][0]
    assert losses["hash"][1] != losses["threefry"][1]
