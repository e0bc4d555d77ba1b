"""A small pure-function classifier with LoRA-style adapters, for testing the round program.

Mean-pooled embeddings -> two frozen dense layers with rank-r adapters (units: (A, B) pairs)
-> a trainable head. Small enough that exact gradients and many-sample statistics are cheap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spry_jax.types import SplitModel

VOCAB, DIM, RANK, LABELS = 32, 8, 2, 3


def make_toy_model(seed: int = 0, dropout: float = 0.0) -> SplitModel:
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    frozen = {
        "embed": jax.random.normal(ks[0], (VOCAB, DIM)) * 0.5,
        "w0": jax.random.normal(ks[1], (DIM, DIM)) / np.sqrt(DIM),
        "w1": jax.random.normal(ks[2], (DIM, DIM)) / np.sqrt(DIM),
    }
    trainable = {
        "l0/lora_a": jax.random.normal(ks[3], (DIM, RANK)) * 0.3,
        "l0/lora_b": jax.random.normal(ks[4], (RANK, DIM)) * 0.3,
        "l1/lora_a": jax.random.normal(ks[5], (DIM, RANK)) * 0.3,
        "l1/lora_b": jax.random.normal(ks[6], (RANK, DIM)) * 0.3,
        "head/kernel": jax.random.normal(ks[7], (DIM, LABELS)) * 0.3,
        "head/bias": jnp.zeros((LABELS,)),
    }
    order = ("l0/lora_a", "l0/lora_b", "l1/lora_a", "l1/lora_b", "head/kernel", "head/bias")

    def apply_fn(tr, fr, input_ids, attention_mask, dropout_rng=None):
        m = attention_mask.astype(jnp.float32)
        x = jnp.sum(fr["embed"][input_ids] * m[..., None], -2) / jnp.maximum(
            m.sum(-1, keepdims=True), 1
        )
        for i in range(2):
            h = x @ fr[f"w{i}"] + (x @ tr[f"l{i}/lora_a"]) @ tr[f"l{i}/lora_b"]
            x = jnp.tanh(h)
            if dropout_rng is not None and dropout > 0:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(dropout_rng, i), 1 - dropout, x.shape
                )
                x = jnp.where(keep, x / (1 - dropout), 0.0)
        return x @ tr["head/kernel"] + tr["head/bias"]

    return SplitModel(
        apply_fn=apply_fn,
        trainable=trainable,
        frozen=frozen,
        order=order,
        head_keys=("head/kernel", "head/bias"),
        task="classification",
        num_labels=LABELS,
    )


def make_toy_batches(num_clients: int, steps: int, batch: int, seq: int = 6, seed: int = 0):
    """Random token batches ``[M, S, B, L]`` with learnable labels and ragged client lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(num_clients, steps, batch, seq)).astype(np.int32)
    labels = (ids[..., 0] % LABELS).astype(np.int32)
    attn = np.ones_like(ids)
    attn[..., seq - 2 :] = rng.integers(0, 2, size=attn[..., seq - 2 :].shape)
    example_mask = np.ones((num_clients, steps, batch), np.float32)
    step_mask = np.ones((num_clients, steps), np.float32)
    for c in range(num_clients):
        n_steps = steps - (c % 2)
        step_mask[c, n_steps:] = 0
        example_mask[c, n_steps:] = 0
        example_mask[c, n_steps - 1, batch - (c % 3) :] = 0
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(attn),
        "labels": jnp.asarray(labels),
        "example_mask": jnp.asarray(example_mask),
        "step_mask": jnp.asarray(step_mask),
    }
