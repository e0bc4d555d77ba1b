"""Task heads and poolings shared by the architectures.

Each family pools for sequence classification the way transformers does (BERT/ALBERT: pooler
on the first token; RoBERTa: dense + tanh on the first token; DistilBERT: pre_classifier + ReLU
on the first token; decoders: the last non-padding token), and ``pooling="mean"`` replaces that
with a mean over the non-padding tokens followed by one linear classifier (the pooling
sentence-transformer checkpoints such as all-MiniLM-L6-v2 were trained with).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spry_jax.models.layers import Linear, dropout, fold_rng

Array = jax.Array

POOLINGS = ("default", "mean")


def check_pooling(pooling: str) -> str:
    """Returns ``pooling`` if known, else raises a ValueError naming the options."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not supported; use one of {POOLINGS}.")
    return pooling


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
    """Mean of ``hidden [batch, seq, dim]`` over positions where ``attention_mask`` is 1."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def last_token_index(input_ids: Array, pad_token_id: int | None) -> Array:
    """Index of the last non-padding token per row, as transformers' decoders find it.

    transformers takes the right-most token that is not ``pad_token_id`` (works for left and
    right padding); with no pad token it takes the last position.
    """
    seq = input_ids.shape[-1]
    if pad_token_id is None:
        return jnp.full(input_ids.shape[:-1], seq - 1, jnp.int32)
    positions = jnp.arange(seq, dtype=jnp.int32)
    return jnp.argmax(positions * (input_ids != pad_token_id), axis=-1).astype(jnp.int32)


class Pooler(nnx.Module):
    """``tanh(dense(h[:, 0]))`` -- the BERT/ALBERT pooler (pretrained, part of the base)."""

    def __init__(self, hidden: int, *, dtype, quant: str, rngs: nnx.Rngs):
        self.dense = Linear(hidden, hidden, dtype=dtype, quant=quant, rngs=rngs)

    def __call__(self, hidden: Array, *, dropout_rng: Array | None = None) -> Array:
        return jnp.tanh(self.dense(hidden[:, 0], dropout_rng=dropout_rng))


class RobertaClassificationHead(nnx.Module):
    """RoBERTa's head: dropout, dense, tanh, dropout, out_proj on the first token."""

    def __init__(self, hidden: int, num_labels: int, *, dropout_rate: float, rngs: nnx.Rngs):
        self.dense = Linear(hidden, hidden, rngs=rngs)
        self.out_proj = Linear(hidden, num_labels, rngs=rngs)
        self.dropout_rate = float(dropout_rate)

    def __call__(self, hidden: Array, *, dropout_rng: Array | None = None) -> Array:
        x = dropout(hidden[:, 0], self.dropout_rate, fold_rng(dropout_rng, 0))
        x = jnp.tanh(self.dense(x))
        x = dropout(x, self.dropout_rate, fold_rng(dropout_rng, 1))
        return self.out_proj(x)


def qa_logits(qa_outputs: Linear, hidden: Array) -> Array:
    """Start/end logits ``[batch, seq, 2]`` (transformers splits the last axis into the two)."""
    return qa_outputs(hidden.astype(jnp.float32))
