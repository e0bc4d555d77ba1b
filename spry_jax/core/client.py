"""Client optimizers and the local update of one client (``lax.scan`` over local steps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spry_jax.core.estimators import Estimator
from spry_jax.types import Array, Batch, PyTree, Trainable

# loss_fn(trainable, frozen, batch, dropout_rng) -> scalar mean loss over the batch's real examples.
LossFn = Callable[[Trainable, PyTree, Batch, Array], Array]

CLIENT_OPTIMIZERS = ("adamw", "adam", "sgd")


def make_client_optimizer(
    name: str,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    momentum: float = 0.0,
) -> optax.GradientTransformation:
    """The client optimizer, created fresh every round (REFERENCE.md §2: AdamW 1e-4, wd 0.01).

    Args:
      name: ``adamw`` (default), ``adam`` or ``sgd`` (``client.optimizer``).
      lr: learning rate (``client.lr``), must be > 0.
    """
    if lr <= 0:
        raise ValueError(f"client.lr must be > 0, got {lr}")
    if name == "adamw":
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name == "sgd":
        return optax.sgd(lr, momentum=momentum or None)
    raise ValueError(
        f"client.optimizer={name!r} is unknown; choose one of {', '.join(CLIENT_OPTIMIZERS)}."
    )


class ClientResult(NamedTuple):
    """What one client's local training produces.

    Attributes:
      delta: ``new - old`` trainable weights, zero outside the client's mask.
      num_examples: examples seen (summed over epochs; the aggregation weight).
      loss: mean training loss over the client's real steps.
      num_steps: number of real local steps taken.
    """

    delta: Trainable
    num_examples: Array
    loss: Array
    num_steps: Array


def step_keys(client_key: Array, step: Array) -> tuple[Array, Array]:
    """(dropout key, estimator key) of one local step: ``fold_in(client_key, step)`` split in two.

    The server regenerates tangents in per-iteration mode from exactly this derivation.
    """
    k = jax.random.fold_in(client_key, step)
    return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


def estimator_kwargs(
    estimator: Estimator, context: dict[str, PyTree] | None, step: Array, num_steps: int
) -> dict[str, PyTree]:
    """The extra inputs an estimator declares in its ``extra_inputs`` attribute.

    ``step`` is the client's global local-step count ``round * num_steps + step`` (so cyclic
    schedules continue across rounds); ``guide`` is the previous round's aggregated update
    (``ServerState.last_delta``, None if unknown). The context is the round's
    ``{"round": ..., "guide": ...}``; estimators without ``extra_inputs`` get nothing.
    """
    wanted = getattr(estimator, "extra_inputs", ())
    context = context or {}
    out = {}
    if "step" in wanted:
        out["step"] = context.get("round", 0) * num_steps + step
    if "guide" in wanted:
        out["guide"] = context.get("guide")
    return out


def _select(pred: Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_client_update(
    loss_fn: LossFn, estimator: Estimator, optimizer: optax.GradientTransformation
) -> Callable[..., ClientResult]:
    """Builds ``client_update(params, frozen, mask, batches, step_mask, key) -> ClientResult``.

    ``batches`` leaves are ``[steps, batch, ...]``; ``step_mask`` ``[steps]`` marks real steps
    (padding steps change nothing). A fresh optimizer state is created per call (per round), and
    only the masked leaves ever change -- updates, including weight decay, are masked.
    ``context`` (the round's ``{"round", "guide"}``) feeds estimators that declare
    ``extra_inputs`` (:func:`estimator_kwargs`); others never see it.
    """

    def client_update(
        params: Trainable,
        frozen: PyTree,
        mask: Trainable,
        batches: Batch,
        step_mask: Array,
        key: Array,
        context: dict[str, PyTree] | None = None,
    ) -> ClientResult:
        opt_state = optimizer.init(params)
        num_steps = step_mask.shape[0]

        def step(carry, xs):
            p, s, loss_sum = carry
            batch, valid, idx = xs
            drop_key, est_key = step_keys(key, idx)
            extra = estimator_kwargs(estimator, context, idx, num_steps)
            est = estimator(
                lambda w: loss_fn(w, frozen, batch, drop_key), p, mask, est_key, **extra
            )
            updates, s_new = optimizer.update(est.grad, s, p)
            p_new = {k: p[k] + updates[k] * mask[k].astype(p[k].dtype) for k in p}
            valid_b = valid > 0
            carry = (
                _select(valid_b, p_new, p),
                _select(valid_b, s_new, s),
                loss_sum + valid * est.loss,
            )
            return carry, None

        init = (params, opt_state, jnp.zeros((), jnp.float32))
        xs = (batches, step_mask, jnp.arange(num_steps))
        (final, _, loss_sum), _ = jax.lax.scan(step, init, xs)
        real_steps = jnp.sum(step_mask)
        delta = {k: (final[k] - params[k]) * mask[k].astype(params[k].dtype) for k in params}
        return ClientResult(
            delta=delta,
            num_examples=jnp.sum(batches["example_mask"] * step_mask[:, None]),
            loss=loss_sum / jnp.maximum(real_steps, 1.0),
            num_steps=real_steps,
        )

    return client_update
