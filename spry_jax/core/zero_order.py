"""Zero-order and finite-difference gradient estimators (the FedMeZO, Baffle+ and FwdLLM+
baselines of the Spry paper, Panchal et al., NeurIPS 2024, arXiv 2405.15551), with the one estimator signature of
:mod:`spry_jax.core.estimators`.

All three use central differences along Gaussian directions ``z ~ N(0, I)`` drawn on the
client's masked leaves::

    d(z) = (f(w + eps z) - f(w - eps z)) / (2 eps),        g = (1/K) sum_k d(z_k) z_k

For any ``f``, ``E_z[d(z) z] = grad f_eps(w)`` where ``f_eps(w) = E_u f(w + eps u)`` is the
Gaussian-smoothed loss (Nesterov & Spokoiny 2017), and on a quadratic ``d(z) = grad f . z``
exactly. Every one of the K perturbations gets the same weight ``1/K`` (the Baffle+ release
weights all but the first about ``sigma^2`` too small).

The reported loss is the mean of ``(f(w + eps z) + f(w - eps z)) / 2`` over the K
perturbations, ``f(w) + O(eps^2)``, so no extra forward pass is spent on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spry_jax.core.estimators import (
    NO_INPUTS,
    Estimate,
    Estimator,
    EstimatorInputs,
    LossClosure,
    contract,
    draw_tangents,
)
from spry_jax.types import Array, Trainable


def _direction(key: Array, params: Trainable, mask: Trainable) -> Trainable:
    """One ``z ~ N(0, I)`` on the masked leaves, regenerated from ``key`` wherever it is needed
    (MeZO's seed trick: the perturbation is never kept as state between the forwards)."""
    return {k: v[0] for k, v in draw_tangents(key, params, mask, 1).items()}


def _shift(params: Trainable, z: Trainable, scale: float) -> Trainable:
    return {k: params[k] + jnp.asarray(scale, params[k].dtype) * z[k] for k in params}


def central_difference(f: LossClosure, params: Trainable, z: Trainable, eps: float):
    """``((f(w + eps z) - f(w - eps z)) / (2 eps), (f(w + eps z) + f(w - eps z)) / 2)``."""
    plus = f(_shift(params, z, eps)).astype(jnp.float32)
    minus = f(_shift(params, z, -eps)).astype(jnp.float32)
    return (plus - minus) / (2.0 * eps), (plus + minus) / 2.0


def spsa(num_perturbations: int = 1, eps: float = 1e-3, name: str = "zo") -> Estimator:
    """SPSA / MeZO central-difference estimator with K perturbations (FedMeZO, Baffle+).

    The K perturbations run one after another (``lax.scan``), each regenerating its ``z``
    from ``fold_in(key, k)`` for the two forwards and again for the update, so the memory is
    inference-level: weights, one perturbation at a time, and the gradient accumulator.

    Args:
      num_perturbations: K (``zo.num_perturbations``; Baffle+: ``zo.baffle_num_perturbations``).
      eps: perturbation scale (``zo.eps``; Baffle+: ``zo.baffle_sigma``).
      name: the config prefix named in errors.
    """
    if num_perturbations < 1:
        raise ValueError(f"{name} num_perturbations must be >= 1, got {num_perturbations}")
    if eps <= 0:
        raise ValueError(f"{name} eps/sigma must be > 0, got {eps}")

    def estimate(
        f: LossClosure, params, mask, key, inputs: EstimatorInputs = NO_INPUTS
    ) -> Estimate:
        del inputs

        def one(acc, i):
            k = jax.random.fold_in(key, i)
            d, loss = central_difference(f, params, _direction(k, params, mask), eps)
            z = _direction(k, params, mask)
            acc = {n: acc[n] + d.astype(acc[n].dtype) * z[n] for n in acc}
            return acc, (d, loss)

        zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
        acc, (ds, losses) = jax.lax.scan(one, zeros, jnp.arange(num_perturbations))
        grad = {k: v / num_perturbations for k, v in acc.items()}
        return Estimate(jnp.mean(losses), grad, ds)

    return estimate


def _tree_dot(a: Trainable, b: Trainable) -> Array:
    return sum(jnp.sum(a[k].astype(jnp.float32) * b[k].astype(jnp.float32)) for k in a)


def select_by_guide(candidates: Trainable, guide: Trainable | None, num: int) -> Array:
    """Indices of the ``num`` candidates with the largest ``|cos(candidate, guide)|``.

    The sign is ignored because ``d(z) z`` is even in ``z``. With no guide (None, or all
    zeros: round 0) the first ``num`` candidates are taken, i.e. plain random directions.
    """
    count = jax.tree.leaves(candidates)[0].shape[0]
    fallback = -jnp.arange(count, dtype=jnp.float32)
    if guide is None:
        return jax.lax.top_k(fallback, num)[1]
    dots = sum(
        jnp.tensordot(
            candidates[k].astype(jnp.float32), guide[k].astype(jnp.float32), axes=guide[k].ndim
        )
        for k in candidates
    )
    cand_norm = jnp.sqrt(
        sum(
            jnp.sum(jnp.square(candidates[k].astype(jnp.float32)), axis=tuple(range(1, v.ndim)))
            for k, v in candidates.items()
        )
    )
    guide_norm = jnp.sqrt(_tree_dot(guide, guide))
    cos = jnp.abs(dots) / jnp.maximum(cand_norm * guide_norm, 1e-30)
    scores = jnp.where(guide_norm > 0, cos, fallback)
    return jax.lax.top_k(scores, num)[1]


def relative_variance(ds: Array, directions: Trainable) -> Array:
    """``tr Cov / (K ||g||^2)``: the estimated variance of the mean ``g = (1/K) sum d_k z_k``
    (unbiased sample covariance of the K terms, divided by K) relative to its squared norm;
    needs K >= 2."""
    num = ds.shape[0]
    g = contract(ds, directions)
    spread = sum(
        jnp.sum(
            jnp.square(ds.reshape((-1,) + (1,) * (v.ndim - 1)).astype(jnp.float32) * v - g[k][None])
        )
        for k, v in directions.items()
    )
    return spread / (num * (num - 1)) / jnp.maximum(_tree_dot(g, g), 1e-30)


def fwdllm(
    num_candidates: int = 200,
    num_perturbations: int = 20,
    eps: float = 1e-2,
    var_threshold: float = 0.0,
) -> Estimator:
    """FwdLLM+: finite-difference forward gradient along guided directions.

    Each step draws ``num_candidates`` Gaussian directions on the mask, keeps the
    ``num_perturbations`` most aligned (``|cos|``) with the previous round's aggregated update
    (``ServerState.last_delta``, arriving as ``guide``; random when there is none), and returns
    ``(1/K) sum_k d(z_k) z_k`` with central differences. Selection makes the directions
    correlated with the guide, so the estimate is biased toward it (FwdLLM's intent); it is
    not an unbiased estimate of the smoothed gradient.

    The release's run settings are the defaults: K = 20, h = 1e-2, and a pool ten times
    K -- the release draws ``10 * v_num`` candidates and keeps the ``v_num`` most similar. Two
    departures from the release, both deliberate: it selects by signed cosine per tensor and
    reuses one direction for all K perturbations of a step (so its K are identical); here the
    cosine is over all masked leaves at once, unsigned (``d(z) z`` is even in ``z``), and the K
    directions of a step are distinct.

    The published variance filter drops whole *clients* on the server
    (``zo.fwdllm_client_var_threshold``; :func:`spry_jax.core.client.split_half_variance`,
    applied in :mod:`spry_jax.core.round`). This estimator's own ``var_threshold`` is an
    optional *step* filter, off by default: when ``> 0`` a step whose
    :func:`relative_variance` exceeds it is marked not estimated (``Estimate.estimated``), so
    the step changes neither weights nor optimizer state. That ratio is the fraction of
    ``||g||^2`` explained by sampling noise (about ``(n/K) / (1 + n/K)`` for n unguided
    dimensions), so thresholds in (0, 1) fire.

    Args:
      num_candidates: directions drawn per step (``zo.fwdllm_num_candidates``).
      num_perturbations: K directions used (``zo.fwdllm_num_perturbations``).
      eps: finite-difference scale h (``zo.fwdllm_eps``).
      var_threshold: the step filter's threshold (``zo.fwdllm_var_threshold``; 0 = off).
    """
    if num_perturbations < 1:
        raise ValueError(f"zo.fwdllm_num_perturbations must be >= 1, got {num_perturbations}")
    if num_candidates < num_perturbations:
        raise ValueError(
            f"zo.fwdllm_num_candidates={num_candidates} must be >= zo.fwdllm_num_perturbations="
            f"{num_perturbations}."
        )
    if eps <= 0:
        raise ValueError(f"zo.fwdllm_eps must be > 0, got {eps}")
    if var_threshold < 0:
        raise ValueError(f"zo.fwdllm_var_threshold must be >= 0 (0 = off), got {var_threshold}")
    if var_threshold > 0 and num_perturbations < 2:
        raise ValueError(
            "zo.fwdllm_var_threshold > 0 needs zo.fwdllm_num_perturbations >= 2 (a variance "
            "needs two samples); raise it or set the threshold to 0."
        )

    def estimate(
        f: LossClosure, params, mask, key, inputs: EstimatorInputs = NO_INPUTS
    ) -> Estimate:
        guide = inputs.guide
        candidates = draw_tangents(key, params, mask, num_candidates)
        masked_guide = None
        if guide is not None:
            masked_guide = {k: guide[k] * mask[k].astype(guide[k].dtype) for k in params}
        idx = select_by_guide(candidates, masked_guide, num_perturbations)
        directions = {k: v[idx] for k, v in candidates.items()}
        ds, losses = jax.lax.map(lambda z: central_difference(f, params, z, eps), directions)
        grad = contract(ds, directions)
        estimated = None
        if var_threshold > 0:
            keep = relative_variance(ds, directions) <= var_threshold
            grad = {k: jnp.where(keep, v, jnp.zeros_like(v)) for k, v in grad.items()}
            estimated = dict.fromkeys(grad, keep)
        return Estimate(jnp.mean(losses), grad, ds, estimated)

    return estimate
