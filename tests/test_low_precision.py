"""16-bit compute (``model.dtype = bfloat16 | float16``): the frozen base and the activations in
16 bits, the trainable weights, the tangents, the aggregation and the optimizer states in
float32; one Spry round's loss close to the float32 round's, and the refusal of other dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import smoke
from spry_jax import config as config_lib
from spry_jax import train

# Relative tolerance of one round's train loss against float32 on the smoke model (2 layers):
# bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding), float16 keeps 11 (~5e-4).
LOSS_RTOL = {"bfloat16": 2e-2, "float16": 3e-3}


def _config(dtype: str, method: str = "spry"):
    cfg = smoke.get_config()
    cfg.round.backend = "vmap"
    cfg.method = method
    cfg.model.dtype = dtype
    return cfg


def _one_round(cfg):
    exp = train.build_experiment(cfg)
    state = exp.init_state()
    frozen = exp.replicate(exp.model.frozen)
    clients = exp.sample_clients(0)
    new, metrics = exp.round_fn(state, frozen, exp.round_batches(0, clients))
    return exp, state, new, metrics


@pytest.fixture(scope="module")
def float32_round():
    return _one_round(_config("float32"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_spry_round_in_16_bit_compute(float32_round, dtype):
    _, state32, new32, m32 = float32_round
    exp, state, new, metrics = _one_round(_config(dtype))
    floats = [x for x in jax.tree.leaves(exp.model.frozen) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.dtype(dtype) for x in floats if x.ndim == 2), dtype
    # Trainable weights and server state stay float32, and start equal to float32's.
    for tree in (state.params, new.params, jax.tree.leaves(new.opt_state)):
        for x in jax.tree.leaves(tree):
            if jnp.issubdtype(x.dtype, jnp.floating):
                assert x.dtype == jnp.float32
    for k in state32.params:
        np.testing.assert_array_equal(np.asarray(state.params[k]), np.asarray(state32.params[k]))
    loss, loss32 = float(metrics["train/loss"]), float(m32["train/loss"])
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, loss32, rtol=LOSS_RTOL[dtype])
    assert loss != loss32  # the round really ran in 16 bits
    # The update the round made is the float32 round's to 16-bit accuracy.
    moved = {k: np.asarray(new.params[k]) - np.asarray(state.params[k]) for k in new.params}
    moved32 = {k: np.asarray(new32.params[k]) - np.asarray(state32.params[k]) for k in new.params}
    num = sum(float(np.sum((moved[k] - moved32[k]) ** 2)) for k in moved)
    den = sum(float(np.sum(moved32[k] ** 2)) for k in moved)
    assert den > 0 and np.sqrt(num / den) < 0.25, np.sqrt(num / den)


def test_an_unknown_model_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.dtype"):
        config_lib.validate(_config("float64"))
