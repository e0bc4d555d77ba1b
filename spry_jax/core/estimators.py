"""Gradient estimators, all with one signature.

An estimator is ``estimate(f, params, mask, key, inputs) -> Estimate`` where
``f(params) -> scalar`` is the client's loss on one batch (frozen weights, batch and dropout key
closed over), ``mask`` holds one 0/1 scalar per trainable leaf (the client's units), ``key``
draws any randomness the estimator needs and ``inputs`` (:class:`EstimatorInputs`) carries what
some estimators read besides: the global local-step count (LCSB's cycle) and the previous
round's aggregated update (FwdLLM+'s guide). Every estimator receives ``inputs`` and ``del``s
what it does not use; the one call site is :func:`spry_jax.core.client.estimate_step`. The
returned gradient is zero outside the mask.

* :func:`backprop` -- ``jax.value_and_grad``, optionally rematerialised as a whole. It is also
  MeBP and MeSP: per-layer checkpoints (``remat="layer"``), LoRA's ``xA`` recomputed
  (``remat="lora"``) and the lazy dequantisation of a quantised base are options of the model
  build (``make_split_model(..., remat=..., lazy_dequant=...)``, named by the method row,
  :func:`spry_jax.methods.model_options`), so the loss ``f`` already carries them and the
  estimator is plain ``value_and_grad``.
* :func:`forward` -- forward gradient (Baydin et al. 2022; Spry, Panchal et al. 2024, §3):
  K tangents ``v_k ~ N(0, sigma^2 I)`` drawn on the masked leaves only,
  ``g = (1/K) sum_k (grad f . v_k) v_k`` with each directional derivative from one ``jax.jvp``.
  ``E[g] = sigma^2 grad f`` on the mask, so ``sigma = 1`` gives an unbiased estimate; the
  variance is honoured as written (the release ignores it) and acts as a step-size scale.
* :func:`lcsb` -- layer-cyclic selective backprop (exact gradient on one block of layers).

Zero-order estimators live in :mod:`spry_jax.core.zero_order`.
"""

from __future__ import annotations

import functools
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
      estimated: per leaf, a scalar that is nonzero where this step estimated the leaf; None
        means every leaf of the mask. The client update gives a leaf that was not estimated
        no weight change and no optimizer-state change (``grad is None`` in PyTorch), so an
        estimator that skips leaves (LCSB's block) or a whole step (FwdLLM+'s step filter)
        says so here instead of returning a zero gradient, which AdamW would still step on.
    """

    loss: Array
    grad: Trainable
    jvps: Array
    estimated: Trainable | None = None


class EstimatorInputs(NamedTuple):
    """What an estimator may read besides ``(f, params, mask, key)`` (a pytree).

    Attributes:
      step: the client's global local-step count, ``round * steps_per_round + step``, so a
        cyclic schedule (LCSB's blocks) continues across rounds.
      guide: the previous round's aggregated client update (``ServerState.last_delta``; None =
        no previous update), the direction FwdLLM+ selects its perturbations by.
    """

    step: Array | int = 0
    guide: Trainable | None = None


NO_INPUTS = EstimatorInputs()

Estimator = Callable[[LossClosure, Trainable, Trainable, Array, EstimatorInputs], Estimate]


def _mask_tree(tree: Trainable, mask: Trainable) -> Trainable:
    return {k: v * mask[k].astype(v.dtype) for k, v in tree.items()}


TANGENT_DISTRIBUTIONS = ("gaussian", "rademacher")


def draw_tangents(
    key: Array,
    params: Trainable,
    mask: Trainable,
    num_tangents: int,
    sigma: float = 1.0,
    distribution: str = "gaussian",
) -> Trainable:
    """Draws K tangents on the masked leaves: ``{key: [K, *shape]}``.

    ``distribution`` (``fwd.tangents``): ``"gaussian"`` draws ``N(0, sigma^2)`` entries (the
    paper); ``"rademacher"`` draws ``+-sigma`` with equal probability, an extension beyond the
    paper: the same mean ``E[(g.v) v] = sigma^2 g``, a per-coordinate variance of
    ``sigma^4 (|g|^2 - g_i^2)`` instead of ``sigma^4 (|g|^2 + g_i^2)``.
    Each leaf's noise comes from ``fold_in(key, leaf_index)`` (leaves in sorted key order), so
    the server can regenerate exactly these tangents from the key alone.
    """
    if distribution not in TANGENT_DISTRIBUTIONS:
        raise ValueError(
            f"fwd.tangents must be one of {TANGENT_DISTRIBUTIONS}, got {distribution!r}"
        )
    out = {}
    for i, k in enumerate(sorted(params)):
        p = params[k]
        leaf_key = jax.random.fold_in(key, i)
        shape = (num_tangents, *p.shape)
        if distribution == "gaussian":
            noise = jax.random.normal(leaf_key, shape, p.dtype)
        else:
            noise = jax.random.rademacher(leaf_key, shape, p.dtype)
        out[k] = noise * (sigma * mask[k]).astype(p.dtype)
    return out


def contract(jvps: Array, tangents: Trainable) -> Trainable:
    """``(1/K) sum_k jvps[k] * tangents[k]`` leaf by leaf."""
    num = jvps.shape[0]
    return {k: jnp.tensordot(jvps.astype(v.dtype), v, axes=1) / num for k, v in tangents.items()}


def reconstruct_gradient(
    key: Array,
    params: Trainable,
    mask: Trainable,
    jvps: Array,
    sigma: float = 1.0,
    distribution: str = "gaussian",
) -> Trainable:
    """Server side of per-iteration mode: rebuilds a client's forward gradient from its K jvp
    scalars and the shared tangent key (Spry §3.2, per-iteration communication)."""
    tangents = draw_tangents(key, params, mask, jvps.shape[0], sigma, distribution)
    return contract(jvps, tangents)


def switch_sets(tangent_sets: tuple[tuple[str, ...], ...], keys) -> list[tuple[str, ...]]:
    """The branches of :func:`forward`'s switch over ``tangent_sets``: the empty set first,
    then the given sets (smallest first), every leaf of ``keys`` last."""
    everything = tuple(sorted(keys))
    inner = [tuple(s) for s in tangent_sets if set(s) != set(everything)]
    return [(), *inner, everything]


def covering_branch(sets: list[tuple[str, ...]], mask: Trainable) -> Array:
    """The first of ``sets`` outside which ``mask`` is zero (the last set, every leaf, always
    covers): the branch :func:`forward` takes for ``mask``."""
    covers = []
    for s in sets:
        inside = set(s)
        outside = [mask[k] == 0 for k in sorted(mask) if k not in inside]
        covers.append(jnp.all(jnp.stack(outside)) if outside else jnp.asarray(True))
    return jnp.argmax(jnp.stack(covers))


def backprop(remat: bool = False) -> Estimator:
    """Exact gradient by reverse mode, masked to the client's units.

    MeBP (per-layer activation checkpoints plus lazy weight decompression, arXiv 2510.03425)
    and MeSP (LoRA's ``xA`` recomputed, arXiv 2506.21833) are this estimator over a loss whose
    model was built with ``remat="layer"`` or ``remat="lora"``
    (:func:`spry_jax.models.layers.set_build_options`): the forward pass then keeps only the
    hidden state entering each layer (or drops ``xA``), the backward pass recomputes the rest,
    and the gradient is the plain backprop gradient.

    Args:
      remat: wrap the whole loss in ``jax.checkpoint``. This does not lower peak memory (the
        backward pass recomputes the full forward and holds all its residuals); per-layer
        checkpoints are the model build's ``remat="layer"``.
    """

    def estimate(
        f: LossClosure, params, mask, key, inputs: EstimatorInputs = NO_INPUTS
    ) -> Estimate:
        del key, inputs
        fn = jax.checkpoint(f) if remat else f
        loss, grad = jax.value_and_grad(fn)(params)
        return Estimate(loss, _mask_tree(grad, mask), jnp.zeros((0,), jnp.float32))

    return estimate


HEAD_MODES = ("joint", "separate", "exact")


def forward(
    num_tangents: int = 1,
    sigma: float = 1.0,
    batching: str = "vmap",
    head_keys: tuple[str, ...] = (),
    head_mode: str = "joint",
    head_tangents: int = 16,
    distribution: str = "gaussian",
    frozen_keys: tuple[str, ...] = (),
    tangent_sets: tuple[tuple[str, ...], ...] = (),
) -> Estimator:
    """Forward-gradient estimator with K tangents on the client's units.

    Args:
      num_tangents: K, tangents per step (``fwd.num_tangents``).
      sigma: standard deviation of the tangents (``fwd.sigma``); the perturbation variance is
        ``sigma**2``.
      batching: ``"vmap"`` evaluates the K jvps in one batched pass (fast, K x activations);
        ``"map"`` runs them one after another with ``lax.map`` (inference-level memory).
      head_keys: the task head's leaves (``SplitModel.head_keys``); only read when
        ``head_mode != "joint"``.
      head_mode: how the head's gradient is estimated (``fwd.head``). ``"joint"`` (the paper):
        the head is perturbed by the same K tangents as the client's body units. At MiniLM's
        initialisation the head holds ~100-1000x the gradient norm of a LoRA B matrix
        (scripts/diagnose_forward.py), and a jointly perturbed unit's noise scales with the
        *whole* perturbed gradient, ``Var[(g.v) v_i] = |g|^2 + g_i^2``, so the head's gradient
        drowns the LoRA estimates (SNR ~1e-7 instead of ~1/d). ``"separate"``: the body units
        get the K tangents, the head its own ``head_tangents`` tangents and jvps; a head
        tangent only runs through the head (the body's primal is shared), so it costs almost
        nothing. ``"exact"``: the head's exact gradient by forward mode (``jax.jacfwd`` over
        the head's weights, one jvp per head weight, each through the head only). Both are
        extensions beyond the paper; per-epoch communication only.
      head_tangents: tangents for the head in ``"separate"`` mode (``fwd.head_tangents``).
      distribution: the tangents' distribution (``fwd.tangents``, :func:`draw_tangents`).
      frozen_keys: leaves of the mask that get no tangent and are marked not estimated, so they
        keep their initial value and optimizer state (``fwd.lora_a="frozen"`` passes the LoRA
        ``A`` matrices: LoRA-FA, Zhang et al. 2023, in forward-gradient form, an extension
        beyond the paper). While ``B = 0`` the loss does not depend on ``A`` to first order, so
        an ``A`` tangent adds only noise to every jvp; freezing ``A`` at its random
        initialisation halves a LoRA unit's perturbed dimension.
      tangent_sets: static leaf sets the jvp may be restricted to (``round.static_tangents``,
        :func:`spry_jax.core.units.tangent_sets`). The estimate is then a ``lax.switch`` over
        them, the empty set first and every leaf last: the branch taken is the first set that
        holds every leaf the runtime ``mask`` is non-zero on, and its jvp carries tangents
        only on that set's leaves, the others closed over as constants (symbolic zeros, so the
        layers below the set's lowest leaf run no tangent pass). The tangents drawn, the
        jvps, the gradient and the loss are those of the unrestricted estimate (a leaf outside
        the set has a zero mask, so a zero tangent there), up to floating-point summation
        order. A saving only where a client is traced alone: under ``vmap`` the switch's index
        is batched and every branch runs.
    """
    if num_tangents < 1:
        raise ValueError(f"fwd.num_tangents must be >= 1, got {num_tangents}")
    if sigma <= 0:
        raise ValueError(f"fwd.sigma must be > 0, got {sigma}")
    if batching not in ("vmap", "map"):
        raise ValueError(f"fwd.tangent_batching must be 'vmap' or 'map', got {batching!r}")
    if head_mode not in HEAD_MODES:
        raise ValueError(f"fwd.head must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_mode == "separate" and head_tangents < 1:
        raise ValueError(f"fwd.head_tangents must be >= 1, got {head_tangents}")
    head = frozenset(head_keys) if head_mode != "joint" else frozenset()
    frozen = frozenset(frozen_keys)
    if frozen & head:
        raise ValueError(f"frozen_keys overlap the head: {sorted(frozen & head)}")
    if distribution not in TANGENT_DISTRIBUTIONS:
        raise ValueError(
            f"fwd.tangents must be one of {TANGENT_DISTRIBUTIONS}, got {distribution!r}"
        )

    def jvps_along(f_sub, primal, tangents):
        def one(v):
            return jax.jvp(f_sub, (primal,), (v,))

        if batching == "vmap":
            return jax.vmap(one)(tangents)
        return jax.lax.map(one, tangents)

    def estimate(
        f: LossClosure, params, mask, key, inputs: EstimatorInputs = NO_INPUTS
    ) -> Estimate:
        del inputs
        # Frozen leaves get no tangent (their mask is zeroed here, so they are not estimated).
        if frozen:
            mask = {k: m * 0 if k in frozen else m for k, m in mask.items()}
        if not tangent_sets:
            return estimate_on(f, params, mask, key)
        sets = switch_sets(tangent_sets, params)
        branches = [functools.partial(estimate_on, f, within=frozenset(s)) for s in sets]
        return jax.lax.switch(covering_branch(sets, mask), branches, params, mask, key)

    def estimate_on(f, params, mask, key, within=None) -> Estimate:
        # Tangents are drawn for every leaf (leaf index in sorted key order, as the server
        # regenerates them); the head's are dropped when it is estimated on its own, and a
        # static set (``within``) drops those outside it, whose mask is zero.
        tangents = draw_tangents(key, params, mask, num_tangents, sigma, distribution)
        held = head | frozen  # leaves held at their primal value in the K jvps
        if within is not None:
            held = held | (frozenset(params) - within)
        free = {k: v for k, v in params.items() if k not in held}
        fixed = {k: v for k, v in params.items() if k in held}
        if free:
            free_tangents = {k: tangents[k] for k in free}
            losses, jvps = jvps_along(lambda q: f({**q, **fixed}), free, free_tangents)
            grad = contract(jvps, free_tangents)
        else:  # head-only PEFT: no body tangents
            losses, jvps = f(params)[None], jnp.zeros((num_tangents,), jnp.float32)
            grad = {}
        grad.update({k: jnp.zeros_like(params[k]) for k in held - head})
        if head and (within is None or head & within):
            top = {k: v for k, v in params.items() if k in head}
            rest = {k: v for k, v in params.items() if k not in head}
            f_head = lambda h: f({**rest, **h})  # noqa: E731
            if head_mode == "exact":
                head_grad = jax.jacfwd(f_head)(top)
            else:
                head_key = jax.random.fold_in(key, len(params))
                head_v = draw_tangents(head_key, top, mask, head_tangents, sigma, distribution)
                _, head_jvps = jvps_along(f_head, top, head_v)
                head_grad = contract(head_jvps, head_v)
            grad.update({k: v * mask[k].astype(v.dtype) for k, v in head_grad.items()})
        elif head:  # outside the static set: a zero mask, so a zero estimate
            grad.update({k: jnp.zeros_like(params[k]) for k in head})
        # The reported loss is made to depend on the tangent result. Otherwise XLA, scheduling
        # from the outputs, may finish the whole primal pass (for the loss) before the tangent
        # pass and keep every activation and dequantised kernel alive for it -- backprop-sized
        # memory. Tied, the two passes run layer by layer (tests/core/test_client_memory.py
        # checks the client step's XLA memory estimate).
        loss = losses[0] + 0.0 * jnp.sum(jvps)
        # With frozen leaves the mask was narrowed above: they are not estimated.
        estimated = dict(mask) if frozen else None
        return Estimate(loss, grad, jvps.astype(jnp.float32), estimated)

    return estimate


# --------------------------------------------------------------------------------------------
# Memory-efficient backprop baselines (arXiv 2506.21833): LCSB (MeSP is a model build option).
# --------------------------------------------------------------------------------------------


def layer_index(leaf_key: str) -> int | None:
    """The layer of a trainable leaf: the first all-digit component of its path
    (``encoder/layer/3/attention/self/query/lora_a`` -> 3), or None (task head, embeddings)."""
    for part in leaf_key.split("/"):
        if part.isdigit():
            return int(part)
    return None


def lcsb_blocks(keys: list[str] | tuple[str, ...], layers_per_step: int) -> list[list[str]]:
    """LCSB's cyclic blocks: consecutive groups of ``layers_per_step`` layers, each with the
    leaves that have no layer index (the task head) added, since those sit above the body and
    cost no backprop through it. Without any layered leaf there is one block of everything."""
    layers = sorted({i for i in map(layer_index, keys) if i is not None})
    always = [k for k in keys if layer_index(k) is None]
    if not layers:
        return [list(keys)]
    groups = [layers[i : i + layers_per_step] for i in range(0, len(layers), layers_per_step)]
    return [[k for k in keys if layer_index(k) in set(g)] + always for g in groups]


def lcsb(layers_per_step: int = 1) -> Estimator:
    """LCSB: layer-cyclic selective backprop (block coordinate descent on the PEFT weights).

    At global local step ``s`` (``round * steps_per_round + step``, so the cycle continues
    across rounds) only the leaves of block ``s mod num_blocks`` (:func:`lcsb_blocks`: a run
    of ``layers_per_step`` layers plus the task head) get their exact gradient; all others are
    marked not estimated (``Estimate.estimated``), so they do not move at all that step --
    block coordinate descent, with their AdamW moments and step count frozen. Each block is its own ``lax.switch`` branch that differentiates with respect to that
    block's leaves only, so activations below the block's lowest layer carry no cotangent:
    the backward pass stops there and nothing below it is stored for backprop.

    Args:
      layers_per_step: layers per block (``lcsb.layers_per_step``).
    """
    if layers_per_step < 1:
        raise ValueError(f"lcsb.layers_per_step must be >= 1, got {layers_per_step}")

    def estimate(
        f: LossClosure, params, mask, key, inputs: EstimatorInputs = NO_INPUTS
    ) -> Estimate:
        del key
        keys = sorted(params)
        blocks = lcsb_blocks(keys, layers_per_step)

        def branch(block):
            def run(p):
                rest = {k: v for k, v in p.items() if k not in block}
                loss, g = jax.value_and_grad(lambda sel: f({**rest, **sel}))(
                    {k: p[k] for k in block}
                )
                return loss, {k: g[k] if k in g else jnp.zeros_like(p[k]) for k in keys}

            return run

        index = jnp.asarray(inputs.step, jnp.int32) % len(blocks)
        loss, grad = jax.lax.switch(index, [branch(b) for b in blocks], params)
        # Row b: which leaves block b covers (the head is in every block).
        table = jnp.asarray([[k in b for k in keys] for b in blocks])
        estimated = {k: table[index, i] for i, k in enumerate(keys)}
        return Estimate(loss, _mask_tree(grad, mask), jnp.zeros((0,), jnp.float32), estimated)

    return estimate
