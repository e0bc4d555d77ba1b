"""Building blocks shared by every architecture: Linear (with PEFT slots and a quantised base),
Embedding, LayerNorm, RMSNorm, dropout with explicit keys, activations and plain XLA attention.

Conventions (both the encoders and the decoders follow them):

* Kernels are ``[in, out]`` (transposed from torch's ``[out, in]``); loading transposes.
* Frozen weights are ``nnx.Param`` (float) or :class:`QuantizedWeight` (int8/int4 storage);
  trainable PEFT leaves are :class:`nnx.LoRAParam` (LoRA A/B) and :class:`IA3Param`. Which
  leaves train is decided by a filter in :mod:`spry_jax.models.peft`, never by the layer.
* Dropout is pure: every ``__call__`` that drops takes ``dropout_rng: jax.Array | None``;
  ``None`` means deterministic. Callers derive per-layer keys with ``jax.random.fold_in``.
* Computation runs in the activation dtype (the dtype of ``x``); norms and softmax in float32.
* Everything is jvp-safe: no custom kernels, only XLA ops. The two exceptions are
  :func:`quantized_matmul` and :func:`cut_cotangent` (both ``custom_vjp``), used only by a model
  built with the ``lazy_dequant`` / ``cut_cotangents`` options, which the backprop rows of
  :mod:`spry_jax.methods` ask for and the forward-mode rows never do.
* How reverse mode is traced is a build option, never a global: :func:`set_build_options`
  (``make_split_model(..., remat=..., lazy_dequant=...)``) sets static attributes on the
  layers -- ``remat="layer"`` (a ``jax.checkpoint`` per transformer layer, MeBP),
  ``remat="lora"`` (LoRA's ``xA`` recomputed, MeSP), ``lazy_dequant``, ``cut_cotangents`` -- so one model's
  traced program is decided by how it was built, not by what is set while tracing.
* Every layer class declares the order of its variables in ``VARIABLE_ORDER`` (torch's
  ``weight`` before ``bias``, PEFT's adapters after the base weights). With each
  architecture's ``MODEL_ORDER`` (:mod:`spry_jax.models.order`) this gives the model order
  that Spry's units chunk; the order of creation or of attribute assignment plays no part.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import custom_batching

from spry_jax.models import quant as quant_lib

Array = jax.Array


_DEFAULT_INIT = jax.nn.initializers.normal(0.02)

REMAT_MODES = ("none", "layer", "lora")


def check_remat(remat: str) -> str:
    """``remat`` if it is one of :data:`REMAT_MODES`, else a ValueError naming the field."""
    if remat not in REMAT_MODES:
        raise ValueError(
            f"remat={remat!r} is not a rematerialisation mode; use one of {REMAT_MODES} "
            "('layer': a checkpoint per transformer layer, MeBP; 'lora': recompute LoRA's xA, "
            "MeSP)."
        )
    return remat


def maybe_remat(
    fn: Callable[[Array], Array], remat: bool, cut: bool = False
) -> Callable[[Array], Array]:
    """One transformer layer's body as a layer stack runs it, from its build options:
    ``jax.checkpoint(fn)`` (nothing inside saved) when ``remat`` (``layer_remat``), and its
    output through :func:`cut_cotangent` when ``cut`` (``layer_cut``)."""
    body = jax.checkpoint(fn) if remat else fn
    if not cut:
        return body
    return lambda x: cut_cotangent(body(x))


@jax.custom_vjp
def cut_cotangent(x: Array) -> Array:
    """The identity; in reverse mode its cotangent is computed once, in a buffer of its own.

    Why: in a post-LayerNorm stack (BERT, RoBERTa) the backward pass of every LayerNorm is
    elementwise given two row reductions, so the cotangent of the residual stream is one long
    elementwise chain through all layers, and XLA's CPU fusion pass fuses a cheap producer into
    each of its consumers, duplicating it. Each layer's fusions then recompute the chain of
    every layer above: on BERT-base (12 layers) the backward pass held fusions of ~1,000
    instructions and 280 operands, and spent ~0.55 s of a 1.9 s backprop step in them
    (``scripts/bench_torch_step.py``, docs/benchmarks.md). A ``lax.cond`` is never fused, so
    a cotangent that passes one is materialised once per layer and the chain is cut; its
    predicate is always true but XLA cannot prove it (:func:`_opaque_zero`), and it stays
    unbatched under ``vmap`` so the cond is not turned into a select. Values are unchanged
    (the taken branch is the identity). A ``custom_vjp``, so not jvp-safe: only models built
    for reverse mode get it (``set_build_options(..., cut_cotangents=True)``, which the
    backprop rows of :mod:`spry_jax.methods` ask for).
    """
    return x


def _cut_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _cut_bwd(_, g: Array) -> tuple[Array]:
    keep = _opaque_zero(g) == 0.0  # always true; not provable by XLA
    return (jax.lax.cond(keep, lambda c: c, jnp.zeros_like, g),)


cut_cotangent.defvjp(_cut_fwd, _cut_bwd)


def set_build_options(
    model: nnx.Module,
    *,
    remat: str = "none",
    lazy_dequant: bool = False,
    cut_cotangents: bool = False,
) -> nnx.Module:
    """Sets the build options that change how backprop through ``model`` is traced (static
    attributes, part of the graph definition, so a later ``nnx.split`` carries them). Values
    and gradients are the same under every option; only what reverse mode stores changes.

    Args:
      model: a built model. Every :class:`Linear` gets ``lora_recompute`` and
        ``lazy_dequant``; every module that runs a stack of transformer layers (those with a
        ``layer_remat`` attribute: the encoders, ``OPTDecoder``, ``LlamaModel``) gets
        ``layer_remat``.
      remat: ``"none"``; ``"layer"`` (MeBP's per-layer activation checkpoints): every layer
        body runs under ``jax.checkpoint``, so backprop keeps only each layer's input hidden
        state and recomputes one layer's internals at a time in the backward pass; ``"lora"``
        (MeSP, arXiv 2506.21833): each LoRA branch ``(xA)B`` runs under ``jax.checkpoint``, so
        backprop keeps ``x``, ``A`` and ``B`` and recomputes ``h = xA`` instead of storing it.
      lazy_dequant: a quantised Linear's base matmul is :func:`quantized_matmul`, whose
        backward pass keeps the int codes and scales and dequantises the kernel again instead
        of keeping the float kernel as a residual (MeBP's lazy weight decompression, arXiv
        2510.03425). It is a ``custom_vjp`` and so not jvp-safe: only for models that are
        differentiated in reverse mode (the backprop rows of :mod:`spry_jax.methods`).

    Returns:
      ``model``, changed in place.
    """
    check_remat(remat)
    stacks = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            node.lora_recompute = remat == "lora"
            node.lazy_dequant = bool(lazy_dequant)
        elif isinstance(node, nnx.Module) and hasattr(node, "layer_remat"):
            node.layer_remat = remat == "layer"
            node.layer_cut = bool(cut_cotangents)
            stacks += 1
    if remat == "layer" and not stacks:
        raise ValueError(
            f"remat='layer' needs a transformer layer stack; {type(model).__name__} has none "
            "(a module with a layer_remat attribute). Use remat='none'."
        )
    return model


@custom_batching.custom_vmap
def _opaque_zero(v: Array) -> Array:
    """An exact float32 zero that XLA cannot prove is zero, computed from ``v``'s first element.

    ``(v0 != v0)`` is 0 or 1, so the product with 0 is exactly 0.0 even for a NaN or infinite
    ``v0``; XLA does not fold a float multiplication by zero (NaN semantics). Under ``vmap``
    the result stays unbatched (the rule below), so a kernel tied to it is not copied per client.
    """
    v0 = v.reshape(-1)[0]
    return (v0 != v0).astype(jnp.float32) * 0.0


@_opaque_zero.def_vmap
def _opaque_zero_vmap(axis_size: int, in_batched: list[bool], v: Array):
    del axis_size, in_batched
    return _opaque_zero(v), False


def _dequantize_tied(
    qweight: Array, scale: Array, zero: Array | None, quant: str, group: int | None, tie_to: Array
) -> Array:
    """The kernel in ``tie_to``'s dtype, dequantised from int codes tied to ``tie_to``: the same
    values, but an XLA computation of its own that cannot start before ``tie_to`` exists."""
    tied = qweight + _opaque_zero(tie_to).astype(qweight.dtype)
    return quant_lib.dequantize(tied, scale, quant, tie_to.dtype, zero, group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def quantized_matmul(
    x: Array,
    qweight: Array,
    scale: Array,
    zero: Array | None,
    quant: str,
    group: int | None = None,
) -> Array:
    """``x @ dequantize(qweight, scale)`` whose backward pass stores only ``qweight`` and
    ``scale`` and dequantises the kernel again once the output's cotangent has arrived.

    Plain reverse mode keeps every layer's float kernel (4 bytes per weight against 0.5 for
    int4) alive from the forward to the backward pass. ``jax.checkpoint`` around the
    dequantisation does not prevent it on XLA CPU: the recomputed dequantisation reads the
    same parameters as the forward one, and once the optimisation barriers are gone XLA's
    common-subexpression elimination merges the two (measured: the compiled program is
    unchanged). So each dequantisation reads int codes tied by an exact zero
    (:func:`_opaque_zero`) to the value it is used with: ``x`` in the forward pass (and in a
    per-layer recompute, whose ``x`` is itself recomputed) and the cotangent in the backward
    pass. Each is then a distinct computation, scheduled just before its matmul, and no float
    kernel outlives its matmul.

    Args:
      x: ``[..., in]`` activations (their dtype is the compute dtype).
      qweight, scale, zero: the frozen quantised kernel (:func:`spry_jax.models.quant.quantize`;
        ``zero`` None unless the int4 kernel has zero points); they get no gradient.
      quant: "int8" or "int4".
      group: int4 rows per scale group (None: ``in / n_groups``).

    Returns:
      ``[..., out]``, the value of the plain ``x @ W``.
    """
    return jnp.matmul(x, _dequantize_tied(qweight, scale, zero, quant, group, x))


def _quantized_matmul_fwd(x, qweight, scale, zero, quant, group):
    return quantized_matmul(x, qweight, scale, zero, quant, group), (qweight, scale, zero)


def _quantized_matmul_bwd(quant, group, residuals, g):
    qweight, scale, zero = residuals
    w = _dequantize_tied(qweight, scale, zero, quant, group, g)
    # The contraction reverse mode uses for ``x @ W`` (no transposed copy of W).
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    return dx, None, None, None


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def _lora_branch(h: Array, a: Array, b: Array) -> Array:
    return (h @ a) @ b


class QuantizedWeight(nnx.Variable):
    """Frozen quantised storage (int8 / packed int4 values and their float32 scales)."""


class IA3Param(nnx.Param):
    """An IA3 scaling vector (trainable under the "ia3" PEFT method)."""


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout with an explicit key; identity when ``rng`` is None or ``rate`` is 0."""
    if rng is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold_rng(rng: Array | None, *ids: int) -> Array | None:
    """``fold_in`` each id into ``rng`` (None passes through), giving every layer its own key."""
    if rng is None:
        return None
    for i in ids:
        rng = jax.random.fold_in(rng, i)
    return rng


ACT2FN: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function transformers calls ``name`` (``hidden_act`` in HF configs)."""
    if name not in ACT2FN:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(ACT2FN)}.")
    return ACT2FN[name]


class Linear(nnx.Module):
    """``y = x @ W + b`` with a frozen (optionally quantised) base and optional PEFT slots.

    Attributes:
      kernel: ``[in, out]``; ``nnx.Param`` in ``dtype`` for quant="none", else
        :class:`QuantizedWeight` (int8 ``[in, out]`` or packed uint8 ``[in/2, out]``).
      kernel_scale: :class:`QuantizedWeight` scales (None when not quantised): float32 from
        our own quantisation, the checkpoint's float16 for a GPTQ base.
      kernel_zero: int4 only, :class:`QuantizedWeight` ``uint8 [n_groups, out]`` zero points
        of an asymmetric GPTQ kernel; None means 8 for every group (symmetric).
      input_perm: int4 only, :class:`QuantizedWeight` ``int32 [in]`` for a GPTQ act-order
        kernel: its rows are stored in the order ``x[..., input_perm]`` (so that every scale
        group is a run of consecutive rows) and the layer permutes its input to match; None
        means the natural order.
      quant_group: int4 input rows per scale group (static; the last group may be shorter).
      bias: ``nnx.Param [out]`` or None.
      lora_a, lora_b: ``nnx.LoRAParam`` ``[in, r]`` and ``[r, out]`` once :meth:`add_lora` ran.
      ia3: :class:`IA3Param` ``[out]`` (scales the output) or ``[in]`` (scales the input, for the
        FFN down-projection) once :meth:`add_ia3` ran.
    """

    VARIABLE_ORDER = (
        "kernel",
        "kernel_scale",
        "kernel_zero",
        "input_perm",
        "bias",
        "lora_a",
        "lora_b",
        "ia3",
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        quant: str = "none",
        group_size: int = quant_lib.DEFAULT_INT4_GROUP,
        kernel_init: Callable = _DEFAULT_INIT,
        rngs: nnx.Rngs,
    ):
        quant_lib.check_quant(quant)
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = jnp.dtype(dtype)
        self.quant = quant
        self.group_size = group_size
        w = kernel_init(rngs.params(), (in_features, out_features), jnp.float32)
        if quant == "none":
            self.kernel = nnx.Param(w.astype(self.dtype))
            self.kernel_scale = nnx.data(None)
        else:
            q, s = quant_lib.quantize(w, quant, group_size)
            self.kernel = QuantizedWeight(q)
            self.kernel_scale = QuantizedWeight(s)
        self.kernel_zero = nnx.data(None)
        self.input_perm = nnx.data(None)
        self.quant_group = (
            quant_lib.int4_group_size(in_features, group_size) if quant == "int4" else None
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), self.dtype)) if use_bias else None
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 1.0
        self.lora_dropout = 0.0
        self.ia3 = nnx.data(None)
        self.ia3_on_input = False
        # Build options (set_build_options): how reverse mode through this layer is traced.
        self.lora_recompute = False
        self.lazy_dequant = False

    def add_lora(self, rank: int, alpha: float, dropout_rate: float, key: Array) -> None:
        """Adds LoRA A ``[in, r]`` ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt 5))
        and B ``[r, out]`` = 0, so the adapted layer starts equal to the base; scale alpha / r."""
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}.")
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(key, (self.in_features, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), jnp.float32))
        self.lora_scale = float(alpha) / float(rank)
        self.lora_dropout = float(dropout_rate)

    def add_ia3(self, on_input: bool) -> None:
        """Adds an IA3 vector of ones: on the input (FFN down-projection) or on the output."""
        n = self.in_features if on_input else self.out_features
        self.ia3 = IA3Param(jnp.ones((n,), jnp.float32))
        self.ia3_on_input = bool(on_input)

    def set_int4(
        self,
        codes: Array,
        scale: Array,
        *,
        group: int,
        zero: Array | None = None,
        perm: Array | None = None,
    ) -> None:
        """Replaces the base by an int4 kernel in the layout of :mod:`spry_jax.models.quant`
        (e.g. one loaded from a GPTQ checkpoint, :mod:`spry_jax.models.gptq`).

        Args:
          codes: packed ``uint8 [in / 2, out]`` codes in [0, 15] (rows in ``perm`` order).
          scale: ``[ceil(in / group), out]`` float scales.
          group: input rows per scale group.
          zero: ``uint8 [n_groups, out]`` zero points, or None for 8 (symmetric).
          perm: ``int32 [in]``: row ``k`` of the kernel multiplies input feature ``perm[k]``.
        """
        n_groups = -(-self.in_features // group)
        want = {
            "codes": ((self.in_features // 2, self.out_features), codes.shape),
            "scale": ((n_groups, self.out_features), scale.shape),
        }
        if zero is not None:
            want["zero"] = ((n_groups, self.out_features), zero.shape)
        if perm is not None:
            want["perm"] = ((self.in_features,), perm.shape)
        for name, (expected, got) in want.items():
            if tuple(got) != expected:
                raise ValueError(f"int4 {name} has shape {tuple(got)}, expected {expected}.")
        self.quant = "int4"
        self.quant_group = int(group)
        self.kernel = QuantizedWeight(codes)
        self.kernel_scale = QuantizedWeight(scale)
        self.kernel_zero = nnx.data(None) if zero is None else QuantizedWeight(zero)
        self.input_perm = nnx.data(None) if perm is None else QuantizedWeight(perm)

    def _stored_weight(self, dtype) -> Array:
        scale = None if self.kernel_scale is None else self.kernel_scale[...]
        zero = None if self.kernel_zero is None else self.kernel_zero[...]
        return quant_lib.dequantize(
            self.kernel[...], scale, self.quant, dtype, zero, self.quant_group
        )

    def weight(self, dtype) -> Array:
        """The base kernel ``[in, out]`` (natural input order) dequantised to ``dtype`` (a
        per-call temporary; with XLA's memory-optimising scheduler only about one layer's
        float kernel is live at once)."""
        w = self._stored_weight(dtype)
        if self.input_perm is not None:
            w = jnp.zeros_like(w).at[self.input_perm[...]].set(w)
        return w

    def __call__(self, x: Array, *, dropout_rng: Array | None = None) -> Array:
        """Applies the layer; ``dropout_rng`` drives LoRA dropout (None = deterministic)."""
        dt = x.dtype
        x_in = x * self.ia3[...].astype(dt) if self.ia3 is not None and self.ia3_on_input else x
        if self.input_perm is not None:
            # Act-order GPTQ: the kernel's rows are in this order (a gather of the activations,
            # O(tokens * in), instead of gathering scales and zeros per row of the kernel).
            x_in = jnp.take(x_in, self.input_perm[...], axis=-1)
        if self.quant != "none" and self.lazy_dequant:
            zero = None if self.kernel_zero is None else self.kernel_zero[...]
            y = quantized_matmul(
                x_in,
                self.kernel[...],
                self.kernel_scale[...],
                zero,
                self.quant,
                self.quant_group,
            )
        else:
            y = jnp.matmul(x_in, self._stored_weight(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        if self.lora_a is not None:
            h = dropout(x, self.lora_dropout, dropout_rng).astype(jnp.float32)
            branch = jax.checkpoint(_lora_branch) if self.lora_recompute else _lora_branch
            delta = branch(h, self.lora_a[...], self.lora_b[...])
            y = y + (delta * self.lora_scale).astype(dt)
        if self.ia3 is not None and not self.ia3_on_input:
            y = y * self.ia3[...].astype(dt)
        return y


class Embedding(nnx.Module):
    """A frozen lookup table ``[num_embeddings, features]``."""

    VARIABLE_ORDER = ("embedding",)

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.num_embeddings = num_embeddings
        self.features = features
        self.embedding = nnx.Param(
            init(rngs.params(), (num_embeddings, features), jnp.float32).astype(dtype)
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: Array) -> Array:
        """``x @ E^T``: logits over the vocabulary with tied embeddings."""
        return jnp.matmul(x, self.embedding[...].astype(x.dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 and returned in the input dtype."""

    VARIABLE_ORDER = ("scale", "bias")

    def __init__(
        self, features: int, *, eps: float = 1e-12, use_bias: bool = True, dtype=jnp.float32
    ):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then multiply by the weight."""

    VARIABLE_ORDER = ("scale",)

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((features,), dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return (self.scale[...].astype(x.dtype) * y).astype(x.dtype)


def make_attention_mask(
    attention_mask: Array, *, causal: bool = False, query_len: int | None = None
) -> Array:
    """A boolean "may attend" mask ``[batch, 1, query, key]`` from a ``[batch, key]`` 0/1 mask.

    With ``causal``, query i sees keys <= i (queries are the last ``query_len`` positions).
    """
    mask = attention_mask.astype(bool)[:, None, None, :]
    k = attention_mask.shape[-1]
    q = k if query_len is None else query_len
    mask = jnp.broadcast_to(mask, (attention_mask.shape[0], 1, q, k))
    if causal:
        qi = jnp.arange(q)[:, None] + (k - q)
        ki = jnp.arange(k)[None, :]
        mask = mask & (ki <= qi)[None, None]
    return mask


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Plain XLA attention (jvp-safe), with grouped-query attention.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``.
      mask: boolean ``[batch, 1 or heads, q_len, k_len]`` (True = may attend), e.g. from
        :func:`make_attention_mask`. Masked scores are set to the float32 minimum (as
        transformers does), so fully masked rows give a uniform distribution, never NaN.
      scale: score scale; default ``1 / sqrt(head_dim)``.
      dropout_rate, dropout_rng: dropout on the attention probabilities.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in the dtype of ``q``.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={hkv}.")
    if h != hkv:
        k = jnp.repeat(k, h // hkv, axis=2)
        v = jnp.repeat(v, h // hkv, axis=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    probs = dropout(probs, dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
