"""Gradient estimators, all with one signature.

An estimator is ``estimate(f, params, mask, key) -> Estimate`` where ``f(params) -> scalar`` is
the client's loss on one batch (frozen weights, batch and dropout key closed over), ``mask`` holds
one 0/1 scalar per trainable leaf (the client's units), and ``key`` draws any randomness the
estimator needs. The returned gradient is zero outside the mask.

* :func:`backprop` -- ``jax.value_and_grad``, optionally rematerialised.
* :func:`forward` -- forward gradient (Baydin et al. 2022; Spry, Panchal et al. 2024, §3):
  K tangents ``v_k ~ N(0, sigma^2 I)`` drawn on the masked leaves only,
  ``g = (1/K) sum_k (grad f . v_k) v_k`` with each directional derivative from one ``jax.jvp``.
  ``E[g] = sigma^2 grad f`` on the mask, so ``sigma = 1`` gives an unbiased estimate; the
  variance is honoured as written (the release ignores it) and acts as a step-size scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spry_jax.types import Array, Trainable

LossClosure = Callable[[Trainable], Array]


class Estimate(NamedTuple):
    """Output of a gradient estimator.

    Attributes:
      loss: the loss at ``params`` (scalar).
      grad: the gradient estimate, same structure as ``params``, zero outside the mask.
      jvps: ``[K]`` directional derivatives for forward estimators (what a client sends in
        per-iteration mode), else an empty ``[0]`` array.
    """

    loss: Array
    grad: Trainable
    jvps: Array


Estimator = Callable[[LossClosure, Trainable, Trainable, Array], Estimate]


def _mask_tree(tree: Trainable, mask: Trainable) -> Trainable:
    return {k: v * mask[k].astype(v.dtype) for k, v in tree.items()}


def draw_tangents(
    key: Array, params: Trainable, mask: Trainable, num_tangents: int, sigma: float = 1.0
) -> Trainable:
    """Draws K Gaussian tangents on the masked leaves: ``{key: [K, *shape]}``.

    Each leaf's noise comes from ``fold_in(key, leaf_index)`` (leaves in sorted key order), so
    the server can regenerate exactly these tangents from the key alone.
    """
    out = {}
    for i, k in enumerate(sorted(params)):
        p = params[k]
        noise = jax.random.normal(jax.random.fold_in(key, i), (num_tangents, *p.shape), p.dtype)
        out[k] = noise * (sigma * mask[k]).astype(p.dtype)
    return out


def contract(jvps: Array, tangents: Trainable) -> Trainable:
    """``(1/K) sum_k jvps[k] * tangents[k]`` leaf by leaf."""
    num = jvps.shape[0]
    return {k: jnp.tensordot(jvps.astype(v.dtype), v, axes=1) / num for k, v in tangents.items()}


def reconstruct_gradient(
    key: Array, params: Trainable, mask: Trainable, jvps: Array, sigma: float = 1.0
) -> Trainable:
    """Server side of per-iteration mode: rebuilds a client's forward gradient from its K jvp
    scalars and the shared tangent key (Spry §3.2, per-iteration communication)."""
    tangents = draw_tangents(key, params, mask, jvps.shape[0], sigma)
    return contract(jvps, tangents)


def backprop(remat: bool = False) -> Estimator:
    """Exact gradient by reverse mode, masked to the client's units.

    Args:
      remat: wrap the loss in ``jax.checkpoint`` (activation rematerialisation).
    """

    def estimate(f: LossClosure, params: Trainable, mask: Trainable, key: Array) -> Estimate:
        del key
        fn = jax.checkpoint(f) if remat else f
        loss, grad = jax.value_and_grad(fn)(params)
        return Estimate(loss, _mask_tree(grad, mask), jnp.zeros((0,), jnp.float32))

    return estimate


def forward(num_tangents: int = 1, sigma: float = 1.0, batching: str = "vmap") -> Estimator:
    """Forward-gradient estimator with K tangents on the client's units.

    Args:
      num_tangents: K, tangents per step (``fwd.num_tangents``).
      sigma: standard deviation of the tangents (``fwd.sigma``); the perturbation variance is
        ``sigma**2``.
      batching: ``"vmap"`` evaluates the K jvps in one batched pass (fast, K x activations);
        ``"map"`` runs them one after another with ``lax.map`` (inference-level memory).
    """
    if num_tangents < 1:
        raise ValueError(f"fwd.num_tangents must be >= 1, got {num_tangents}")
    if sigma <= 0:
        raise ValueError(f"fwd.sigma must be > 0, got {sigma}")
    if batching not in ("vmap", "map"):
        raise ValueError(f"fwd.tangent_batching must be 'vmap' or 'map', got {batching!r}")

    def estimate(f: LossClosure, params: Trainable, mask: Trainable, key: Array) -> Estimate:
        tangents = draw_tangents(key, params, mask, num_tangents, sigma)

        def one(v):
            return jax.jvp(f, (params,), (v,))

        if batching == "vmap":
            losses, jvps = jax.vmap(one)(tangents)
        else:
            losses, jvps = jax.lax.map(one, tangents)
        return Estimate(losses[0], contract(jvps, tangents), jvps.astype(jnp.float32))

    return estimate
