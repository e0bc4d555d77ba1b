"""Decoder-only language models in Flax NNX: OPT and Llama (SmolLM2 is a Llama).

Both follow transformers' PyTorch implementations (``modeling_opt.py``, ``modeling_llama.py``)
so that the same checkpoint gives the same logits; module attribute names mirror the HF ones,
so a checkpoint key maps to a state path by renaming only the leaf (``weight`` -> ``kernel``,
``embedding`` or ``scale``).

Heads, as transformers builds them for each family:

* ``classification``: ``score`` (no bias) on the hidden state of the *last non-padding token*.
  transformers finds that token as the rightmost ``input_ids != pad_token_id``; we use the
  rightmost ``attention_mask == 1``, which is the same whenever the padding positions are the
  pad tokens, and also works for checkpoints with no pad token (Llama 2). ``pooling="mean"``
  instead averages the hidden states of the non-padding tokens.
* ``qa``: ``qa_outputs`` (with bias) on every position -> ``[batch, seq, 2]`` (start, end).
* ``causal_lm``: ``lm_head`` (no bias), or the input embedding matrix when
  ``tie_word_embeddings`` (OPT always, SmolLM2) -> ``[batch, seq, vocab]``.

Differences between the families that matter for parity: OPT learns absolute positions with an
offset of 2, counted over the attention mask (so left padding does not shift them), scales the
queries before the dot product, and may project embeddings in/out (opt-350m) or normalise after
the residual (``do_layer_norm_before=False``). Llama rotates q/k by RoPE at positions
``0..seq-1`` regardless of padding (as transformers does without ``position_ids``), uses
grouped-query attention, RMSNorm and a SiLU-gated MLP.

Dropout (``dropout_rng`` not None) is applied where transformers applies it in training: OPT on
attention probabilities (``attention_dropout``), after the attention output projection and
after ``fc2`` (``dropout``); Llama on attention probabilities only (``attention_dropout``).
LoRA dropout is applied inside each adapted :class:`~spry_jax.models.layers.Linear`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spry_jax.models import heads, layers
from spry_jax.models.order import ModelOrder

Array = jax.Array

__all__ = [
    "DecoderForTask",
    "LlamaForTask",
    "LlamaModel",
    "OPTForTask",
    "OPTModel",
    "apply_rope",
    "last_token_index",
    "rope_inv_freq",
]

_TASKS = ("classification", "qa", "causal_lm")


def _check_args(task: str, num_labels: int, pooling: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {_TASKS}.")
    heads.check_pooling(pooling)
    if task == "classification" and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 for classification, got {num_labels}.")


def last_token_index(attention_mask: Array) -> Array:
    """Index of the rightmost position with ``attention_mask == 1`` per row (0 if none)."""
    positions = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    return jnp.argmax(positions * (attention_mask != 0).astype(jnp.int32), axis=-1)


# --------------------------------------------------------------------------------------------
# OPT
# --------------------------------------------------------------------------------------------


class OPTAttention(nnx.Module):
    """OPT multi-head self-attention (queries scaled before the product, as in transformers)."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"hidden_size={self.embed_dim} is not divisible by "
                f"num_attention_heads={self.num_heads}."
            )
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(config.attention_dropout)
        bias = bool(getattr(config, "enable_bias", True))

        def proj():
            return layers.Linear(
                self.embed_dim, self.embed_dim, use_bias=bias, dtype=dtype, quant=quant, rngs=rngs
            )

        self.q_proj = proj()
        self.k_proj = proj()
        self.v_proj = proj()
        self.out_proj = proj()

    def __call__(self, x: Array, mask: Array, dropout_rng: Array | None) -> Array:
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = (self.q_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 0)) * self.scaling).reshape(
            shape
        )
        k = self.k_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 1)).reshape(shape)
        v = self.v_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 2)).reshape(shape)
        o = layers.dot_product_attention(
            q,
            k,
            v,
            mask,
            scale=1.0,
            dropout_rate=self.attention_dropout,
            dropout_rng=layers.fold_rng(dropout_rng, 3),
        )
        return self.out_proj(o.reshape(b, s, -1), dropout_rng=layers.fold_rng(dropout_rng, 4))


class OPTDecoderLayer(nnx.Module):
    """One OPT block: (pre- or post-) LayerNorm, self-attention, ReLU feed-forward."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        d = config.hidden_size
        bias = bool(getattr(config, "enable_bias", True))
        self.do_layer_norm_before = bool(config.do_layer_norm_before)
        self.dropout = float(config.dropout)
        self.act = layers.activation(config.activation_function)
        self.self_attn_layer_norm = layers.LayerNorm(d, eps=1e-5, dtype=dtype)
        self.self_attn = OPTAttention(config, dtype=dtype, quant=quant, rngs=rngs)
        self.final_layer_norm = layers.LayerNorm(d, eps=1e-5, dtype=dtype)
        self.fc1 = layers.Linear(
            d, config.ffn_dim, use_bias=bias, dtype=dtype, quant=quant, rngs=rngs
        )
        self.fc2 = layers.Linear(
            config.ffn_dim, d, use_bias=bias, dtype=dtype, quant=quant, rngs=rngs
        )

    def __call__(self, x: Array, mask: Array, dropout_rng: Array | None) -> Array:
        residual = x
        if self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, mask, layers.fold_rng(dropout_rng, 0))
        x = residual + layers.dropout(x, self.dropout, layers.fold_rng(dropout_rng, 1))
        if not self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        x = self.act(self.fc1(x, dropout_rng=layers.fold_rng(dropout_rng, 2)))
        x = self.fc2(x, dropout_rng=layers.fold_rng(dropout_rng, 3))
        x = residual + layers.dropout(x, self.dropout, layers.fold_rng(dropout_rng, 4))
        if not self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nnx.Module):
    """OPT token + learned position embeddings, the block stack and the final LayerNorm."""

    # transformers' OPTLearnedPositionalEmbedding reserves the first two rows (fairseq legacy).
    POSITION_OFFSET = 2

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ValueError(
                "OPT config layer_norm_elementwise_affine=False is not supported (no public "
                "checkpoint uses it); set it to True."
            )
        d = config.hidden_size
        proj_dim = getattr(config, "word_embed_proj_dim", None) or d
        self.embed_tokens = layers.Embedding(config.vocab_size, proj_dim, dtype=dtype, rngs=rngs)
        self.embed_positions = layers.Embedding(
            config.max_position_embeddings + self.POSITION_OFFSET, d, dtype=dtype, rngs=rngs
        )
        self.project_in = nnx.data(
            layers.Linear(proj_dim, d, use_bias=False, dtype=dtype, quant=quant, rngs=rngs)
            if proj_dim != d
            else None
        )
        self.layers = nnx.List(
            [
                OPTDecoderLayer(config, dtype=dtype, quant=quant, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        final_norm = config.do_layer_norm_before and not getattr(
            config, "_remove_final_layer_norm", False
        )
        self.final_layer_norm = nnx.data(
            layers.LayerNorm(d, eps=1e-5, dtype=dtype) if final_norm else None
        )
        self.project_out = nnx.data(
            layers.Linear(d, proj_dim, use_bias=False, dtype=dtype, quant=quant, rngs=rngs)
            if proj_dim != d
            else None
        )
        # Build option (layers.set_build_options): a jax.checkpoint per decoder layer.
        self.layer_remat = False
        # Build option: each layer's output through layers.cut_cotangent (backprop rows).
        self.layer_cut = False

    def __call__(self, input_ids: Array, attention_mask: Array, dropout_rng: Array | None) -> Array:
        mask_i = attention_mask.astype(jnp.int32)
        # As transformers: positions count real tokens only, padding maps to row offset - 1.
        positions = jnp.cumsum(mask_i, axis=1) * mask_i - 1
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + self.POSITION_OFFSET).astype(x.dtype)
        mask = layers.make_attention_mask(attention_mask, causal=True)
        for i, layer in enumerate(self.layers):
            r = layers.fold_rng(dropout_rng, i)
            x = layers.maybe_remat(
                functools.partial(layer, mask=mask, dropout_rng=r), self.layer_remat, self.layer_cut
            )(x)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nnx.Module):
    """transformers' ``OPTModel``: a wrapper whose only child is ``decoder``."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        self.decoder = OPTDecoder(config, dtype=dtype, quant=quant, rngs=rngs)

    def __call__(
        self, input_ids: Array, attention_mask: Array, dropout_rng: Array | None = None
    ) -> Array:
        return self.decoder(input_ids, attention_mask, dropout_rng)

    @property
    def embed_tokens(self) -> layers.Embedding:
        return self.decoder.embed_tokens


# --------------------------------------------------------------------------------------------
# Llama
# --------------------------------------------------------------------------------------------


def _rope_parameters(config) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    # transformers 4.x layout: rope_theta + optional rope_scaling.
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def rope_inv_freq(config, head_dim: int) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim / 2]`` for rope types default, linear and llama3.

    Follows transformers' ``ROPE_INIT_FUNCTIONS`` (these three types have attention scaling 1).
    """
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    base = float(params.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"rope_type={rope_type!r} is not supported; use 'default', 'linear' or 'llama3'."
    )


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[b, s, h, d]`` and cos/sin ``[s, d]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class LlamaAttention(nnx.Module):
    """Llama grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}."
            )
        self.head_dim = getattr(config, "head_dim", None) or d // self.num_heads
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0))
        bias = bool(getattr(config, "attention_bias", False))
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        kw = dict(use_bias=bias, dtype=dtype, quant=quant, rngs=rngs)
        self.q_proj = layers.Linear(d, q_out, **kw)
        self.k_proj = layers.Linear(d, kv_out, **kw)
        self.v_proj = layers.Linear(d, kv_out, **kw)
        self.o_proj = layers.Linear(q_out, d, **kw)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, dropout_rng: Array | None
    ) -> Array:
        b, s, _ = x.shape
        q = self.q_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 0))
        k = self.k_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 1))
        v = self.v_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 2))
        q = apply_rope(q.reshape(b, s, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
        o = layers.dot_product_attention(
            q,
            k,
            v,
            mask,
            dropout_rate=self.attention_dropout,
            dropout_rng=layers.fold_rng(dropout_rng, 3),
        )
        return self.o_proj(o.reshape(b, s, -1), dropout_rng=layers.fold_rng(dropout_rng, 4))


class LlamaMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=bool(getattr(config, "mlp_bias", False)), dtype=dtype, quant=quant)
        self.act = layers.activation(config.hidden_act)
        self.gate_proj = layers.Linear(d, f, **kw, rngs=rngs)
        self.up_proj = layers.Linear(d, f, **kw, rngs=rngs)
        self.down_proj = layers.Linear(f, d, **kw, rngs=rngs)

    def __call__(self, x: Array, dropout_rng: Array | None) -> Array:
        g = self.gate_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 0))
        u = self.up_proj(x, dropout_rng=layers.fold_rng(dropout_rng, 1))
        return self.down_proj(self.act(g) * u, dropout_rng=layers.fold_rng(dropout_rng, 2))


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm Llama block."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        d, eps = config.hidden_size, float(config.rms_norm_eps)
        self.input_layernorm = layers.RMSNorm(d, eps=eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, quant=quant, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(d, eps=eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, quant=quant, rngs=rngs)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, dropout_rng: Array | None
    ) -> Array:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, layers.fold_rng(dropout_rng, 0))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), layers.fold_rng(dropout_rng, 1))


class LlamaModel(nnx.Module):
    """transformers' ``LlamaModel``: embeddings, the block stack and the final RMSNorm."""

    def __init__(self, config, *, dtype, quant: str, rngs: nnx.Rngs):
        d = config.hidden_size
        self.embed_tokens = layers.Embedding(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                LlamaDecoderLayer(config, dtype=dtype, quant=quant, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = layers.RMSNorm(d, eps=float(config.rms_norm_eps), dtype=dtype)
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        # A static constant (not a state leaf): derived from the config, never trained.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(config, head_dim))
        # Build option (layers.set_build_options): a jax.checkpoint per decoder layer.
        self.layer_remat = False
        # Build option: each layer's output through layers.cut_cotangent (backprop rows).
        self.layer_cut = False

    def __call__(
        self, input_ids: Array, attention_mask: Array, dropout_rng: Array | None = None
    ) -> Array:
        x = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        freqs = (
            np.arange(seq, dtype=np.float32)[:, None]
            * np.asarray(self.inv_freq, np.float32)[None, :]
        )
        emb = jnp.asarray(np.concatenate([freqs, freqs], axis=-1))
        cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
        mask = layers.make_attention_mask(attention_mask, causal=True)
        for i, layer in enumerate(self.layers):
            r = layers.fold_rng(dropout_rng, i)
            body = functools.partial(layer, cos=cos, sin=sin, mask=mask, dropout_rng=r)
            x = layers.maybe_remat(body, self.layer_remat, self.layer_cut)(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# Task wrapper (shared by both families)
# --------------------------------------------------------------------------------------------


class DecoderForTask(nnx.Module):
    """A decoder backbone (``self.model``) with a task head, per the registry contract.

    ``Cls(config, *, task, num_labels, dtype, quant, pooling, rngs)``; calling
    ``model(input_ids, attention_mask, dropout_rng=None)`` returns classification logits
    ``[batch, num_labels]``, QA logits ``[batch, seq, 2]`` or LM logits ``[batch, seq, vocab]``.
    The head is kept in float32 (it is trainable under every PEFT method) and never quantised;
    an untied ``lm_head`` (Llama 2: vocab x hidden) is therefore a large trainable head, while a
    tied one is the frozen input embedding and leaves ``head_prefixes`` empty.
    """

    BACKBONE: type = nnx.Module
    # Checkpoint prefixes of the backbone, longest first (``model.`` for *For* classes, none
    # for a bare backbone save, ``transformer.`` for LlamaForQuestionAnswering).
    HF_PREFIXES: tuple[str, ...] = ("model.",)
    LORA_TARGETS: tuple[str, ...] = (r"self_attn/q_proj$", r"self_attn/v_proj$")
    IA3_TARGETS: tuple[str, ...] = ()
    IA3_FEEDFORWARD: tuple[str, ...] = ()

    def __init__(
        self,
        config,
        *,
        task: str = "classification",
        num_labels: int = 2,
        dtype=jnp.float32,
        quant: str = "none",
        pooling: str = "default",
        rngs: nnx.Rngs,
    ):
        _check_args(task, num_labels, pooling)
        self.task = task
        self.num_labels = int(num_labels)
        self.pooling = pooling
        self.model = self.BACKBONE(config, dtype=dtype, quant=quant, rngs=rngs)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        out_dim = self._output_dim(config)
        score = qa_outputs = lm_head = None
        if task == "classification":
            score = layers.Linear(out_dim, self.num_labels, use_bias=False, rngs=rngs)
        elif task == "qa":
            qa_outputs = layers.Linear(out_dim, 2, use_bias=True, rngs=rngs)
        elif not self.tied:
            lm_head = layers.Linear(out_dim, config.vocab_size, use_bias=False, rngs=rngs)
        self.score = nnx.data(score)
        self.qa_outputs = nnx.data(qa_outputs)
        self.lm_head = nnx.data(lm_head)
        self.head_prefixes = tuple(
            name
            for name, m in (("score", score), ("qa_outputs", qa_outputs), ("lm_head", lm_head))
            if m is not None
        )

    @staticmethod
    def _output_dim(config) -> int:
        return config.hidden_size

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, *, dropout_rng=None
    ) -> Array:
        """Float32 logits for ``input_ids`` ``[batch, seq]`` (``attention_mask`` 1 = real token;
        None = all real); ``dropout_rng`` None = deterministic."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        h = self.model(input_ids, attention_mask, layers.fold_rng(dropout_rng, 0))
        if self.task == "causal_lm":
            if self.lm_head is not None:
                return self.lm_head(h).astype(jnp.float32)
            return self.model.embed_tokens.attend(h).astype(jnp.float32)
        h = h.astype(jnp.float32)
        if self.task == "qa":
            return heads.qa_logits(self.qa_outputs, h)
        if self.pooling == "mean":
            pooled = heads.mean_pool(h, attention_mask)
        else:
            idx = last_token_index(attention_mask)
            pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
        return self.score(pooled)

    def hf_key_to_path(self, key: str) -> str | None:
        """The ``"a/b/c"`` state path of checkpoint tensor ``key`` (None = not ours)."""
        head, _, leaf = key.partition(".")
        if head in ("score", "qa_outputs", "lm_head"):
            if getattr(self, head) is None:
                return None
            return f"{head}/{'kernel' if leaf == 'weight' else leaf}"
        body = key
        for prefix in self.HF_PREFIXES:
            if body.startswith(prefix):
                body = body[len(prefix) :]
                break
        parts = body.split(".")
        if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
            return None
        module, leaf = parts[:-1], parts[-1]
        if leaf == "weight":
            name = module[-1]
            if name.startswith("embed_"):
                leaf = "embedding"
            elif "norm" in name:
                leaf = "scale"
            else:
                leaf = "kernel"
        return "/".join(["model", *self._backbone_path(module), leaf])

    @staticmethod
    def _backbone_path(module: list[str]) -> list[str]:
        return module


class OPTForTask(DecoderForTask):
    """OPT (transformers ``OPTForCausalLM`` / ``OPTForSequenceClassification`` /
    ``OPTForQuestionAnswering``). The head reads ``word_embed_proj_dim`` features."""

    BACKBONE = OPTModel
    # "model.decoder." from the *For* classes; "decoder." from a bare OPTModel (the hub's
    # facebook/opt-* checkpoints are saved that way).
    HF_PREFIXES = ("model.decoder.", "decoder.", "model.")
    # PEFT's defaults for OPT (TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING["opt"]).
    IA3_TARGETS = (r"self_attn/q_proj$", r"self_attn/k_proj$", r"fc2$")
    IA3_FEEDFORWARD = (r"fc2$",)
    # transformers' OPT registers k, v, q, out in OPTAttention, the attention before its
    # LayerNorm in a layer, and the decoder's projections and final LayerNorm before the layers.
    MODEL_ORDER = ModelOrder(
        before=(
            "model/decoder/embed_tokens",
            "model/decoder/embed_positions",
            "model/decoder/project_out",
            "model/decoder/project_in",
            "model/decoder/final_layer_norm",
        ),
        layers="model/decoder/layers/{}",
        sublayers=(
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/q_proj",
            "self_attn/out_proj",
            "self_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
        ),
        after=("score", "qa_outputs", "lm_head"),
    )

    @staticmethod
    def _output_dim(config) -> int:
        return getattr(config, "word_embed_proj_dim", None) or config.hidden_size

    @staticmethod
    def _backbone_path(module: list[str]) -> list[str]:
        return ["decoder", *module]


class LlamaForTask(DecoderForTask):
    """Llama / SmolLM2 (transformers ``LlamaForCausalLM`` / ``...ForSequenceClassification`` /
    ``...ForQuestionAnswering``)."""

    BACKBONE = LlamaModel
    HF_PREFIXES = ("model.", "transformer.")
    # PEFT's defaults for Llama (TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING["llama"]).
    IA3_TARGETS = (r"self_attn/k_proj$", r"self_attn/v_proj$", r"mlp/down_proj$")
    IA3_FEEDFORWARD = (r"mlp/down_proj$",)
    # transformers' LlamaDecoderLayer registers attention and MLP before its two norms.
    MODEL_ORDER = ModelOrder(
        before=("model/embed_tokens",),
        layers="model/layers/{}",
        sublayers=(
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/o_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "mlp/down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ),
        after=("model/norm", "score", "qa_outputs", "lm_head"),
    )
