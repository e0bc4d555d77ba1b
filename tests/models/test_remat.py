"""Per-layer activation checkpointing (MeBP), a build option (``remat="layer"``,
``layers.set_build_options``): the remat build's loss and gradient are the plain build's, the
option is off by default, and XLA's memory estimate of ``value_and_grad`` drops.

The memory figures need XLA's memory-optimising CPU scheduler (the default scheduler does not
minimise liveness), so they are measured in a subprocess started with that flag; the same
subprocess returns the gradients of the plain and the remat build for the equality check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from spry_jax import methods, models
from spry_jax.config import default_config
from spry_jax.memory import peak_bytes
from spry_jax.models import layers
from tests.xla_flags import with_fast_compile

_FLAG = with_fast_compile("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(family: str, num_layers: int, hidden: int):
    common = dict(vocab_size=128, num_attention_heads=4, max_position_embeddings=128)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=hidden, num_hidden_layers=num_layers, intermediate_size=4 * hidden, **common
        )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=num_layers,
            num_key_value_heads=2,
            pad_token_id=1,
            **common,
        )
    return transformers.OPTConfig(
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=4 * hidden,
        num_hidden_layers=num_layers,
        pad_token_id=1,
        **common,
    )


def _loss_and_params(family: str, num_layers=3, hidden=32, batch=16, seq=64, rank=2, **build):
    """A LoRA-adapted random model with dropout on (keyed), built with the given options
    (``build``: :func:`layers.set_build_options`' keywords), a loss and non-trivial LoRA B
    (the same weights and loss for every option)."""
    model = models.build_model(_config(family, num_layers, hidden), num_labels=2)
    cfg = dict(method="lora", lora_rank=rank, lora_alpha=4.0, lora_dropout=0.1)
    models.apply_peft(model, cfg)
    models.set_build_options(model, **build)
    sm = models.split_model(model, cfg)
    params = {
        k: v + 0.1 * jax.random.normal(jax.random.PRNGKey(i), v.shape, v.dtype)
        for i, (k, v) in enumerate(sorted(sm.trainable.items()))
    }
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(4, 128, (batch, seq)), jnp.int32)
    attn = jnp.ones((batch, seq), jnp.int32).at[: batch // 2, seq - 5 :].set(0)
    key = jax.random.PRNGKey(3)

    def f(t):
        return jnp.sum(jnp.square(sm.apply_fn(t, sm.frozen, ids, attn, key)))

    return f, params


def _measure(family: str) -> dict:
    """Compiles value_and_grad of the plain and the remat build; returns XLA's memory
    estimates (argument + temp + output - alias bytes), losses and gradients."""
    out = {}
    for name, remat in (("plain", "none"), ("remat", "layer")):
        f, params = _loss_and_params(family, remat=remat)
        compiled = jax.jit(jax.value_and_grad(f)).lower(params).compile()
        loss, grad = compiled(params)
        out[name] = {
            "bytes": peak_bytes(compiled)["peak_bytes"],
            "loss": float(loss),
            "grad": {k: np.asarray(v).tolist() for k, v in grad.items()},
        }
    return out


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, XLA_FLAGS=_FLAG, JAX_PLATFORMS="cpu")
    code = (
        "import json, sys; from tests.models import test_remat as t; "
        "json.dump({f: t._measure(f) for f in ('bert', 'llama', 'opt')}, sys.stdout)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_layer_remat_gradient_is_backprop(measured, family):
    plain, remat = measured[family]["plain"], measured[family]["remat"]
    np.testing.assert_allclose(remat["loss"], plain["loss"], rtol=1e-6)
    assert plain["grad"].keys() == remat["grad"].keys()
    for k in plain["grad"]:
        g = np.asarray(plain["grad"][k])
        assert np.any(g != 0), k
        np.testing.assert_allclose(remat["grad"][k], g, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_layer_remat_lowers_the_memory_estimate(measured, family):
    """3 layers, hidden 32, batch 16 x seq 64: activations dominate. Per-layer checkpoints keep
    only layer inputs, so the estimate must fall clearly."""
    plain, remat = measured[family]["plain"]["bytes"], measured[family]["remat"]["bytes"]
    assert remat < 0.7 * plain, (family, plain, remat)


def _count_checkpoints(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for v in eqn.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                n += _count_checkpoints(sub)
    return n


def _count_dots(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                n += _count_dots(sub)
    return n


def test_remat_is_off_by_default_and_belongs_to_the_build():
    """The plain build's program has no checkpoint; the ``remat="layer"`` build one per layer,
    ``remat="lora"`` one per LoRA branch; building one model changes no other."""
    plain_f, params = _loss_and_params("llama", num_layers=3, batch=2, seq=8)
    layer_f, _ = _loss_and_params("llama", num_layers=3, batch=2, seq=8, remat="layer")
    lora_f, _ = _loss_and_params("llama", num_layers=3, batch=2, seq=8, remat="lora")

    def count(f):
        return _count_checkpoints(jax.make_jaxpr(f)(params).jaxpr)

    assert count(plain_f) == 0
    assert count(layer_f) == 3
    # Llama's default LoRA targets: q_proj and v_proj of each of the 3 layers.
    assert count(lora_f) == 2 * 3
    assert count(plain_f) == 0


def test_remat_build_has_plain_grad():
    """``jax.grad`` through the remat builds (per-layer checkpoints, LoRA recompute) equals it
    through the plain build, on BERT (the encoder stack; the decoders are checked above)."""
    plain_f, params = _loss_and_params("bert", num_layers=2, batch=2, seq=8)
    want_loss, want = jax.jit(jax.value_and_grad(plain_f))(params)
    for remat in ("layer", "lora"):
        f, _ = _loss_and_params("bert", num_layers=2, batch=2, seq=8, remat=remat)
        loss, grad = jax.jit(jax.value_and_grad(f))(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for k in params:
            assert np.any(np.asarray(want[k]) != 0), k
            np.testing.assert_allclose(grad[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bad_remat_is_refused_with_the_field_named():
    model = models.build_model(_config("opt", 1, 16), num_labels=2)
    with pytest.raises(ValueError, match=r"remat='layers'.*'none', 'layer', 'lora'"):
        models.set_build_options(model, remat="layers")
    with pytest.raises(ValueError, match=r"remat='layer' needs a transformer layer stack"):
        models.set_build_options(layers.Linear(4, 4, rngs=nnx.Rngs(0)), remat="layer")
    with pytest.raises(ValueError, match=r"remat=True"):
        models.make_split_model(
            dict(name="tiny-bert", pretrained=False), dict(method="lora"), remat=True
        )


def test_method_table_points_mebp_at_layer_remat():
    """``fedavg_remat``'s row builds the model with ``remat="layer"`` and its estimator is
    plain backprop (same loss and gradient as plain backprop of the plain build on a small
    model, masked to the client's units)."""
    row = methods.METHODS["fedavg_remat"]
    assert row.estimator == "backprop" and row.remat == "layer"
    opts = methods.model_options("fedavg_remat")
    assert opts == {"remat": "layer", "lazy_dequant": True, "cut_cotangents": True}
    f, params = _loss_and_params("opt", num_layers=2, batch=2, seq=8, **opts)
    plain_f, _ = _loss_and_params("opt", num_layers=2, batch=2, seq=8)
    est = methods.ESTIMATORS[row.estimator](default_config())
    mask = {k: jnp.float32(i % 2) for i, k in enumerate(sorted(params))}
    # Jitted: eagerly, every op is its own XLA compile (most of this test's time on a cold cache).
    out = jax.jit(lambda p: est(f, p, mask, jax.random.PRNGKey(0)))(params)
    # Differentiation consumes the checkpoints; what shows they were there is the backward
    # pass recomputing each layer's forward matmuls.
    traced = jax.make_jaxpr(lambda p: est(f, p, mask, jax.random.PRNGKey(0)))(params)
    plain = jax.make_jaxpr(jax.value_and_grad(plain_f))(params)
    forward = jax.make_jaxpr(plain_f)(params)
    extra = _count_dots(traced.jaxpr) - _count_dots(plain.jaxpr)
    # 12 matmuls per OPT layer (q, k, v, out, fc1, fc2, two in attention, four LoRA); those
    # whose output the backward pass does not need (fc2's) are not recomputed.
    assert _count_dots(forward.jaxpr) == 2 * 12 + 1
    assert extra == 2 * 11
    loss, grad = jax.jit(jax.value_and_grad(plain_f))(params)
    np.testing.assert_allclose(out.loss, loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(out.grad[k], grad[k] * mask[k], rtol=1e-5, atol=1e-6)


def test_every_row_names_a_valid_build():
    """Each row's ``remat`` is a mode the model build accepts; only MeBP and MeSP remat."""
    for name, row in methods.METHODS.items():
        assert row.remat in models.REMAT_MODES, name
    remat = {n: r.remat for n, r in methods.METHODS.items() if r.remat != "none"}
    assert remat == {"fedavg_remat": "layer", "fedavg_mesp": "lora"}
