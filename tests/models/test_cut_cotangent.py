"""The ``cut_cotangents`` build option (``layers.cut_cotangent`` on every layer's output, the
backprop rows' build): the gradient is the plain build's, alone and under ``vmap``; the
compiled backward pass keeps its fusions the size of one layer however deep the stack (without
the cut, XLA CPU's fusions recompute the residual stream's cotangent chain of every layer above,
docs/benchmarks.md); and the option belongs to the backprop rows only."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from spry_jax import methods
from spry_jax.models import layers
from tests.models.test_remat import _loss_and_params


def _largest_backward_fusion(compiled_text: str) -> int:
    """The most backward-pass instructions (JAX names them ``transpose(jvp(...))`` in the
    HLO metadata) in one fused computation of a compiled program."""
    bodies = re.findall(r"\n%?fused_computation[\w.\-]* [^\n]*\{\n(.*?)\n\}", compiled_text, re.S)
    assert bodies, "no fused computations in the compiled program"
    return max(b.count("transpose(") for b in bodies)


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_cut_build_has_the_plain_gradient(family):
    plain_f, params = _loss_and_params(family, num_layers=3, batch=4, seq=16)
    cut_f, _ = _loss_and_params(family, num_layers=3, batch=4, seq=16, cut_cotangents=True)
    loss, grad = jax.jit(jax.value_and_grad(plain_f))(params)
    cut_loss, cut_grad = jax.jit(jax.value_and_grad(cut_f))(params)
    np.testing.assert_array_equal(cut_loss, loss)
    for k in params:
        np.testing.assert_allclose(cut_grad[k], grad[k], rtol=1e-6, atol=1e-9, err_msg=k)
    # Under vmap (clients of a round): two clients' parameters, each its own plain gradient
    # (to float32 reassociation: vmap batches the dots).
    two = jax.tree.map(lambda x: np.stack([x, 1.5 * x]), params)
    batched = jax.jit(jax.vmap(jax.grad(cut_f)))(two)
    second = jax.jit(jax.grad(plain_f))(jax.tree.map(lambda x: 1.5 * x, params))
    for k in params:
        for got, want in ((batched[k][0], grad[k]), (batched[k][1], second[k])):
            scale = float(np.max(np.abs(want)))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=k)


def test_cut_keeps_backward_fusions_one_layer_large():
    """The cut build's largest backward fusion does not grow with depth (2 vs 8 post-LN BERT
    layers, rank-1 LoRA as the paper's; measured: 53 and 53 backward instructions, 86 and 398
    for the plain build), and the cut survives vmap as a conditional."""
    largest = {}
    for n in (2, 8):
        f, params = _loss_and_params(
            "bert", num_layers=n, batch=4, seq=16, rank=1, cut_cotangents=True
        )
        text = jax.jit(jax.grad(f)).lower(params).compile().as_text()
        largest[n] = _largest_backward_fusion(text)
    assert largest[8] <= largest[2] + 8, largest
    f, params = _loss_and_params("bert", num_layers=2, batch=4, seq=16, rank=1, cut_cotangents=True)
    two = jax.tree.map(lambda x: np.stack([x, x]), params)
    text = jax.jit(jax.vmap(jax.grad(f))).lower(two).compile().as_text()
    assert text.count("conditional(") >= 2, "the cut was turned into a select under vmap"


def test_cut_is_the_identity_with_the_identity_vjp():
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(layers.cut_cotangent(x), x)
    _, vjp = jax.vjp(layers.cut_cotangent, x)
    np.testing.assert_array_equal(vjp(np.ones_like(x))[0], np.ones_like(x))


def test_only_backprop_rows_cut_cotangents():
    for name in sorted(methods.METHODS):
        reverse = methods.get_method(name).estimator in methods.BACKPROP_ESTIMATORS
        assert methods.model_options(name)["cut_cotangents"] is reverse, name
    assert methods.model_options("fedavg")["cut_cotangents"]
    assert not methods.model_options("spry")["cut_cotangents"]
