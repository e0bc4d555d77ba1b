"""Lazy dequantisation in the backward pass (the ``lazy_dequant`` build option,
``layers.set_build_options``, ``quantized_matmul``): the same values and gradients as plain
backprop and as ``jax.grad`` on the float-dequantised kernel, under vmap too; every backprop
row of the methods table builds its model with it and no forward row does. (Its memory effect
is checked in tests/core/test_client_memory.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spry_jax import methods, models, tasks
from spry_jax.config import default_config
from spry_jax.core import estimators as E
from spry_jax.models import layers, quant


def _linear(mode: str, seed: int = 0) -> layers.Linear:
    """A quantised Linear with a LoRA adapter whose B is non-zero (so both LoRA leaves get a
    gradient that flows through the base matmul's input cotangent upstream)."""
    lin = layers.Linear(256, 96, quant=mode, rngs=nnx.Rngs(seed))
    lin.add_lora(2, 4.0, 0.0, jax.random.PRNGKey(seed + 1))
    lin.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.PRNGKey(seed + 2), (2, 96)))
    return lin


def _float_twin(lin: layers.Linear) -> layers.Linear:
    """The same layer with a float32 kernel equal to the dequantised one."""
    twin = layers.Linear(256, 96, quant="none", rngs=nnx.Rngs(0))
    twin.kernel = nnx.Param(lin.weight(jnp.float32))
    twin.bias = nnx.Param(lin.bias[...])
    twin.add_lora(2, 4.0, 0.0, jax.random.PRNGKey(0))
    twin.lora_a = nnx.LoRAParam(lin.lora_a[...])
    twin.lora_b = nnx.LoRAParam(lin.lora_b[...])
    return twin


def _lazy(lin: layers.Linear) -> layers.Linear:
    """``lin`` built with the ``lazy_dequant`` option."""
    return layers.set_build_options(lin, lazy_dequant=True)


def _loss_and_grads(lin: layers.Linear, x: jax.Array) -> tuple:
    """Loss and gradients w.r.t. the input and the LoRA leaves, as ``lin`` was built."""
    graphdef, lora, rest = nnx.split(lin, nnx.LoRAParam, ...)

    def f(x, lora):
        # Two layers deep in x, so the input cotangent of the base matmul matters.
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lora, rest)(jnp.tanh(x))) ** 2)

    loss, (gx, glora) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, lora)
    return loss, [gx, *jax.tree.leaves(glora)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lazy_backward_gradient_is_backprop(mode):
    lin = _linear(mode)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 7, 256))
    want_loss, want = _loss_and_grads(lin, x)
    got_loss, got = _loss_and_grads(_lazy(_linear(mode)), x)
    float_loss, float_grads = _loss_and_grads(_float_twin(lin), x)
    np.testing.assert_array_equal(got_loss, want_loss)
    np.testing.assert_allclose(got_loss, float_loss, rtol=1e-6)
    for g, w, fl in zip(got, want, float_grads, strict=True):
        assert np.any(np.asarray(w) != 0)
        # The same contraction as reverse mode's transpose of ``x @ W``: bitwise equal.
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, fl, rtol=1e-5, atol=1e-6)


def test_lazy_backward_under_vmap_matches_and_keeps_the_kernel_unbatched():
    """Clients are vmapped in a round: the gradient per client is the plain one, and the
    backward dequantisation is not batched (one kernel, not one per client)."""
    lin, lazy = _linear("int4"), _lazy(_linear("int4"))
    xs = jax.random.normal(jax.random.PRNGKey(6), (4, 5, 256))

    def grad_x(layer):
        return lambda x: jax.grad(lambda x: jnp.sum(jnp.sin(layer(x)) ** 2))(x)

    want = jax.vmap(grad_x(lin))(xs)
    got = jax.vmap(grad_x(lazy))(xs)
    jaxpr = jax.make_jaxpr(jax.vmap(grad_x(lazy)))(xs)
    np.testing.assert_array_equal(got, want)
    kernels = [
        v.aval.shape
        for eqn in _all_eqns(jaxpr.jaxpr)
        for v in eqn.outvars
        if v.aval.dtype == jnp.float32 and v.aval.shape[-2:] == (256, 96)
    ]
    assert kernels and all(s == (256, 96) for s in kernels), kernels


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


def _prims(fn, *args) -> set[str]:
    return {e.primitive.name for e in _all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)}


def test_lazy_dequant_is_off_by_default_and_forward_mode_still_works():
    lin = _linear("int4")
    x = jnp.ones((2, 256))
    assert "custom_vjp_call" not in str(_prims(lambda x: lin(x), x))
    lazy = _lazy(_linear("int4"))
    assert any("custom_vjp" in p for p in _prims(lambda x: lazy(x), x))
    assert not any("custom_vjp" in p for p in _prims(lambda x: lin(x), x))
    # Without the option jvp goes through the quantised layer (Spry's path).
    y, ty = jax.jvp(lambda x: lin(x), (x,), (jnp.ones_like(x),))
    twin = _float_twin(lin)
    want_y, want_ty = jax.jvp(lambda x: twin(x), (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ty, want_ty, rtol=1e-5, atol=1e-6)


def _tiny_int4_llama(method: str | None = None):
    """A tiny int4 Llama built plainly, or with ``method``'s build options, its loss closure
    and perturbed trainable leaves (the same weights and loss for every build)."""
    mc = dict(
        name="llama2-7b",
        pretrained=False,
        dtype="float32",
        quant="int4",
        dropout=0.1,
        overrides=dict(
            num_hidden_layers=2,
            hidden_size=128,
            head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            vocab_size=128,
        ),
    )
    pc = dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=0.1, target_modules=[])
    opts = methods.model_options(method) if method else {}
    m = models.make_split_model(mc, pc, task="classification", num_labels=2, seed=0, **opts)
    params = {
        k: v + 0.05 * jax.random.normal(jax.random.PRNGKey(i), v.shape, v.dtype)
        for i, (k, v) in enumerate(sorted(m.trainable.items()))
    }
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(3, 128, (4, 16)), jnp.int32),
        "attention_mask": jnp.ones((4, 16), jnp.int32).at[:2, 12:].set(0),
        "labels": jnp.asarray([0, 1, 1, 0], jnp.int32),
        "example_mask": jnp.ones((4,), jnp.float32),
    }
    loss_fn = tasks.make_loss_fn(m)
    key = jax.random.PRNGKey(3)
    return (lambda p: loss_fn(p, m.frozen, batch, key)), params


BACKPROP_ESTIMATORS = ("backprop", "lcsb")
BACKPROP_ROWS = sorted(n for n, r in methods.METHODS.items() if r.estimator in BACKPROP_ESTIMATORS)


def _estimate_fn(method: str):
    """``method``'s estimator over the tiny int4 Llama built with the row's options."""
    f, params = _tiny_int4_llama(method)
    cfg = default_config()
    cfg.method = method
    est = methods.build_round_parts(cfg).estimator
    mask = {k: jnp.float32(1) for k in params}
    inputs = E.EstimatorInputs(step=jnp.int32(0))
    return (lambda p: est(f, p, mask, jax.random.PRNGKey(0), inputs)), params


def test_every_backprop_row_dequantises_lazily():
    """Each backprop row's estimator, over its row's build, traces the quantised matmuls as
    ``quantized_matmul``."""
    assert {"fedavg", "fedavg_remat", "fedavg_mesp", "fedavg_lcsb"} <= set(BACKPROP_ROWS)
    for method in BACKPROP_ROWS:
        assert methods.model_options(method)["lazy_dequant"], method
        fn, params = _estimate_fn(method)
        assert any("custom_vjp" in p for p in _prims(fn, params)), method


@pytest.mark.parametrize("method", ["fedavg", "fedavg_remat", "fedavg_mesp", "fedavg_lcsb"])
def test_backprop_estimators_keep_the_plain_gradient(method):
    """FedAvg, MeBP, MeSP and LCSB (each over its row's build) on a tiny int4 Llama return
    plain ``value_and_grad``'s loss and gradient through the plain build."""
    fn, params = _estimate_fn(method)
    f, _ = _tiny_int4_llama()
    out = jax.jit(fn)(params)
    loss, grad = jax.jit(jax.value_and_grad(f))(params)
    np.testing.assert_allclose(out.loss, loss, rtol=1e-6)
    estimated = [k for k in params if np.any(np.asarray(out.grad[k]) != 0)]
    assert estimated, method
    for k in estimated:
        np.testing.assert_allclose(out.grad[k], grad[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_forward_rows_never_take_the_lazy_path():
    # Forward and zero-order rows differentiate nothing in reverse mode: no lazy build.
    for method in sorted(set(methods.METHODS) - set(BACKPROP_ROWS)):
        assert not methods.model_options(method)["lazy_dequant"], method
    for method in ("spry", "fedfgd"):
        assert methods.model_options(method) == {
            "remat": "none",
            "lazy_dequant": False,
            "cut_cotangents": False,
        }
        fn, params = _estimate_fn(method)
        prims = _prims(fn, params)
        assert not any("custom_vjp" in p for p in prims), method


def test_dequantize_tied_is_exact_for_non_finite_ties():
    """The tie is an exact zero even when the value it is tied to is NaN or infinite."""
    w = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
    for mode in ("int8", "int4"):
        q, s = quant.quantize(w, mode)
        plain = quant.dequantize(q, s, mode, jnp.float32)
        for v in (jnp.nan, jnp.inf, -jnp.inf, 0.0, 3.0):
            tie = jnp.full((2, 3), v, jnp.float32)
            tied = layers._dequantize_tied(q, s, None, mode, None, tie)
            np.testing.assert_array_equal(tied, plain)
