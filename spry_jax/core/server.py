"""Server optimizers as optax transformations on the pseudo-gradient ``g = -delta``.

``delta`` is the aggregated client update (new - current). FedAvg is ``sgd(1)``: ``w + delta``.
FedAdam/FedYogi default to the Flower 1.5 formulas used by the Spry release (github.com/Astuary/Spry, Flower 1.5 strategies):
zero-initialised moments and *no* bias correction, written here for ``delta = -g``::

    m <- b1 m + (1 - b1) delta
    v <- b2 v + (1 - b2) delta^2                          (FedAdam)
    v <- v - (1 - b2) delta^2 sign(v - delta^2)           (FedYogi)
    w <- w + lr m / (sqrt(v) + tau)

``optax_adam`` / ``optax_yogi`` select optax's bias-corrected versions instead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class FlowerMomentsState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


def _flower(
    lr: float, b1: float, b2: float, tau: float, yogi: bool
) -> optax.GradientTransformation:
    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return FlowerMomentsState(m=zeros, v=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        delta = jax.tree.map(jnp.negative, updates)
        m = jax.tree.map(lambda m, d: b1 * m + (1.0 - b1) * d, state.m, delta)
        if yogi:
            v = jax.tree.map(
                lambda v, d: v - (1.0 - b2) * d * d * jnp.sign(v - d * d), state.v, delta
            )
        else:
            v = jax.tree.map(lambda v, d: b2 * v + (1.0 - b2) * d * d, state.v, delta)
        step = jax.tree.map(lambda m, v: lr * m / (jnp.sqrt(v) + tau), m, v)
        return step, FlowerMomentsState(m=m, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


def flower_yogi(
    lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """FedYogi exactly as Flower 1.5 (``flwr.server.strategy.FedYogi``)."""
    return _flower(lr, b1, b2, tau, yogi=True)


def flower_adam(
    lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """FedAdam exactly as Flower 1.5 (``flwr.server.strategy.FedAdam``)."""
    return _flower(lr, b1, b2, tau, yogi=False)


SERVER_SCHEDULES = ("constant", "cosine", "linear")


def with_schedule(
    opt: optax.GradientTransformation, schedule: str, rounds: int, final_fraction: float = 0.0
) -> optax.GradientTransformation:
    """Scales the server step by a factor decaying from 1 at round 0 to ``final_fraction`` at
    round ``rounds - 1`` (the optimizer is applied once per round, so its count is the round).

    Forward-gradient and zero-order updates carry direction noise that a constant step keeps
    re-injecting every round; decaying the server step averages it out over the late rounds,
    as a learning-rate decay does for SGD. ``"constant"`` returns ``opt`` unchanged (same state).
    """
    if schedule == "constant":
        return opt
    if schedule not in SERVER_SCHEDULES:
        raise ValueError(
            f"server.schedule={schedule!r} is unknown; choose one of {', '.join(SERVER_SCHEDULES)}."
        )
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"server.final_fraction must be in [0, 1], got {final_fraction}")
    span = max(rounds - 1, 1)

    def factor(count: jax.Array) -> jax.Array:
        t = jnp.minimum(count.astype(jnp.float32) / span, 1.0)
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * t)) if schedule == "cosine" else 1.0 - t
        return final_fraction + (1.0 - final_fraction) * shape

    return optax.chain(opt, optax.scale_by_schedule(factor))


SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "optax_adam", "optax_yogi", "adam", "sgd")


def make_server_optimizer(
    name: str, lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """Builds a server optimizer by name.

    Args:
      name: ``fedavg`` (``w + lr * delta``), ``fedadam``/``fedyogi`` (Flower 1.5), ``optax_adam``/``optax_yogi`` (bias-corrected, ``eps=tau``), ``adam`` /
        ``sgd`` (plain optax on the pseudo-gradient, used by FedSGD where the clients send
        gradients).
      lr: server learning rate (``server.lr``); FedAvg uses ``lr`` as the server step (1.0 is
        plain averaging).
    """
    if name == "fedavg" or name == "sgd":
        return optax.sgd(lr)
    if name == "fedadam":
        return flower_adam(lr, b1, b2, tau)
    if name == "fedyogi":
        return flower_yogi(lr, b1, b2, tau)
    if name == "optax_adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=tau)
    if name == "optax_yogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=tau)
    if name == "adam":
        return optax.adam(lr, b1=b1, b2=b2)
    raise ValueError(
        f"server.optimizer={name!r} is unknown; choose one of {', '.join(SERVER_OPTIMIZERS)}."
    )
