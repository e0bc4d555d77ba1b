"""Losses and predictions per task, on top of a model's pure ``apply_fn``.

Every loss is the mean over the batch's real examples (``example_mask``), so padded examples and
padded steps contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from spry_jax.models import random_bits
from spry_jax.types import Array, Batch, PyTree, SplitModel, Trainable

TASKS = ("classification", "qa", "causal_lm")


def _masked_mean(values: Array, mask: Array) -> Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_loss(logits: Array, batch: Batch) -> Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"]
    )
    return _masked_mean(ce, batch["example_mask"])


def qa_loss(logits: Array, batch: Batch) -> Array:
    """Mean of start and end cross-entropies; ``logits`` is ``[..., seq, 2]``.

    Both heads go through one cross-entropy over ``[..., 2, seq]`` (start row, end row) rather
    than two over the sliced columns: same value, but with two separate slice-and-reduce tails
    XLA's CPU memory scheduler (a DFS from the outputs) entered the whole primal pass before
    any tangent op under ``jax.jvp``, keeping every activation alive (backprop-sized memory for
    the forward gradient; docs/qa_memory.md, tests/core/test_client_memory.py).
    """
    both = jnp.swapaxes(logits.astype(jnp.float32), -1, -2)
    positions = jnp.stack([batch["start_positions"], batch["end_positions"]], axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(both, positions)
    return _masked_mean(jnp.mean(ce, axis=-1), batch["example_mask"])


def causal_lm_loss(logits: Array, batch: Batch) -> Array:
    """Next-token cross-entropy over tokens whose label is not -100."""
    logits = logits[..., :-1, :].astype(jnp.float32)
    labels = batch["labels"][..., 1:]
    valid = (labels != -100).astype(jnp.float32) * batch["example_mask"][..., None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


_LOSSES = {"classification": classification_loss, "qa": qa_loss, "causal_lm": causal_lm_loss}


def apply_batch(
    model: SplitModel,
    trainable: Trainable,
    frozen: PyTree,
    batch: Batch,
    dropout_rng: Array | None,
) -> Array:
    """``model.apply_fn`` on a batch dict; segment ids are passed only when the batch has them
    (text pairs), so single-text batches call ``apply_fn`` exactly as before."""
    extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model.apply_fn(
        trainable, frozen, batch["input_ids"], batch["attention_mask"], dropout_rng, **extra
    )


def make_loss_fn(
    model: SplitModel, dropout_bits: str = "hash"
) -> Callable[[Trainable, PyTree, Batch, Array], Array]:
    """``loss_fn(trainable, frozen, batch, dropout_rng) -> scalar`` for the model's task.

    ``dropout_bits`` (``model.dropout_bits``): how the dropout masks' bits are drawn from
    ``dropout_rng`` -- ``"hash"`` (threefry's key derivation, hashed bulk bits: several times
    cheaper) or ``"threefry"`` (:mod:`spry_jax.models.random_bits`).
    """
    if model.task not in _LOSSES:
        raise ValueError(f"task={model.task!r} is unknown; choose one of {TASKS}.")
    task_loss = _LOSSES[model.task]
    random_bits.check_dropout_bits(dropout_bits)

    def loss_fn(trainable: Trainable, frozen: PyTree, batch: Batch, dropout_rng: Array) -> Array:
        rng = random_bits.dropout_key(dropout_rng, dropout_bits)
        return task_loss(apply_batch(model, trainable, frozen, batch, rng), batch)

    return loss_fn
