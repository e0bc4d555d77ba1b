"""Client optimizers and the local update of one client (``lax.scan`` over local steps).

Skipped leaves really skip. The optimizer keeps one state per trainable leaf
(:func:`init_leaf_states`) and steps leaf by leaf (:func:`leafwise_step`): a leaf the step's
estimate does not cover -- outside the client's mask, outside LCSB's current block, or every
leaf of a step FwdLLM+'s step filter dropped (``Estimate.estimated``) -- keeps its weights *and*
its optimizer state bit for bit. That is PyTorch's behaviour for a parameter whose ``grad`` is
None: no momentum decay, no weight decay, and, because Adam's ``step`` count is per parameter,
no advance of its bias correction. One state per leaf is what makes the last point possible
(optax's Adam has one ``count`` for the whole tree); the extra cost is one int32 per leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spry_jax.core.estimators import NO_INPUTS, Estimate, Estimator, EstimatorInputs
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
    """The client optimizer, created fresh every round (the Spry release: AdamW 1e-4, wd 0.01).

    Args:
      name: ``adamw`` (default), ``adam`` or ``sgd`` (``client.optimizer``).
      lr: learning rate (``client.lr``), must be > 0.
      momentum: heavy-ball momentum of ``sgd`` (``client.momentum``); 0 = plain SGD.
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
      variance: the client's gradient-estimate variance (:func:`split_half_variance`) when the
        update is built with ``report_variance=True``, else 0.
    """

    delta: Trainable
    num_examples: Array
    loss: Array
    num_steps: Array
    variance: Array


class LocalTrainResult(NamedTuple):
    """The end state of one client's local training (:func:`make_local_train`).

    Attributes:
      params: the trainable weights after the last step.
      opt_state: the per-leaf optimizer states (:func:`init_leaf_states`) after the last step.
      loss_sum: sum of the real steps' losses.
      variance: :func:`split_half_variance` of the step estimates (0 unless reported).
    """

    params: Trainable
    opt_state: dict[str, optax.OptState]
    loss_sum: Array
    variance: Array


def step_keys(client_key: Array, step: Array) -> tuple[Array, Array]:
    """(dropout key, estimator key) of one local step: ``fold_in(client_key, step)`` split in two.

    The server regenerates tangents in per-iteration mode from exactly this derivation.
    """
    k = jax.random.fold_in(client_key, step)
    return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


def estimate_step(
    estimator: Estimator,
    loss_fn: LossFn,
    params: Trainable,
    frozen: PyTree,
    mask: Trainable,
    batch: Batch,
    key: Array,
    step: Array | int,
    inputs: EstimatorInputs = NO_INPUTS,
) -> Estimate:
    """One local step's gradient estimate: the one place an estimator is called.

    The step's dropout and estimator keys come from :func:`step_keys` (the derivation the
    server replays in per-iteration mode); ``inputs`` holds the round's :class:`EstimatorInputs`
    with ``step`` the global count of the round's first local step (``round * steps``), to
    which the local step index is added here.
    """
    drop_key, est_key = step_keys(key, step)
    return estimator(
        lambda w: loss_fn(w, frozen, batch, drop_key),
        params,
        mask,
        est_key,
        inputs._replace(step=inputs.step + step),
    )


def _select(pred: Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def init_leaf_states(
    optimizer: optax.GradientTransformation, params: Trainable
) -> dict[str, optax.OptState]:
    """One optimizer state per trainable leaf, so each leaf has its own step count.

    Stepping leaf by leaf is the same transform as stepping the tree for the elementwise client
    optimizers (:data:`CLIENT_OPTIMIZERS`); a tree-global one (global-norm clipping) is not.
    """
    return {k: optimizer.init(v) for k, v in params.items()}


def leafwise_step(
    optimizer: optax.GradientTransformation,
    grads: Trainable,
    states: dict[str, optax.OptState],
    params: Trainable,
    active: dict[str, Array],
) -> tuple[Trainable, dict[str, optax.OptState]]:
    """One optimizer step, leaf by leaf; leaf ``k`` changes only where ``active[k]`` is true.

    An inactive leaf keeps its weights and its optimizer state (moments and step count) bit for
    bit -- what PyTorch does for a parameter whose ``grad`` is None. ``active`` holds one scalar
    bool per leaf, so the selection works unchanged under ``vmap`` and ``scan``.

    Returns:
      ``(params, states)`` after the step.
    """
    new_params, new_states = {}, {}
    for k, p in params.items():
        update, state = optimizer.update(grads[k], states[k], p)
        new_params[k] = jnp.where(active[k], p + update.astype(p.dtype), p)
        new_states[k] = _select(active[k], state, states[k])
    return new_params, new_states


def estimated_leaves(est: Estimate, mask: Trainable) -> dict[str, Array]:
    """Per leaf, whether this step's estimate covers it: inside the client's mask and marked in
    ``est.estimated`` (None = every masked leaf)."""
    if est.estimated is None:
        return {k: m > 0 for k, m in mask.items()}
    return {k: (m > 0) & (jnp.asarray(est.estimated[k]) > 0) for k, m in mask.items()}


def split_half_variance(
    sums: tuple[Trainable, Trainable], counts: tuple[Array, Array], mask: Trainable
) -> Array:
    """The FwdLLM+ client variance (what ``zo.fwdllm_client_var_threshold`` is compared with).

    Split the client's real local steps into the first ``floor(n / 2)`` (A) and the rest (B);
    let ``gA``, ``gB`` be the means of the step estimates ``g_s`` (each the step's averaged
    K-direction estimate) over the steps of each half the estimator marked estimated. The
    variance is the mean over the client's masked elements ``i`` of the unbiased two-sample
    variance ``(gA_i - gB_i)^2 / 2``. It is 0 when either half has no estimated step (fewer
    than two real steps): nothing to measure, so nothing to drop.

    Why this one: it is the statistic FwdLLM's release uses for its variance control and the
    one Spry's FwdLLM+ client computes (``calculate_var``: ``torch.var`` of the two half means
    of the step estimates, averaged over elements) -- where it computes one at all: its
    classification clients report 0, and its QA client reads a single hard-coded tensor index.
    Here every masked element counts, which needs no per-model index. It measures how much the
    client's estimates disagree over its local epoch (perturbation noise and batch noise
    together), on the scale of ``g``, so the release's 1e2 only fires on clients whose
    estimates blow up.

    Args:
      sums: ``(sum of g_s over A, sum over B)``, float32 leaves.
      counts: ``(|A|, |B|)``.
      mask: the client's 0/1 leaf mask (selects the elements averaged over).
    """
    (sum_a, sum_b), (n_a, n_b) = sums, counts
    ok = (n_a > 0) & (n_b > 0)
    sq = sum(
        (mask[k] > 0)
        * jnp.sum(jnp.square(sum_a[k] / jnp.maximum(n_a, 1) - sum_b[k] / jnp.maximum(n_b, 1)))
        for k in sum_a
    )
    elements = sum((mask[k] > 0) * sum_a[k].size for k in sum_a)
    return jnp.where(ok, sq / 2.0 / jnp.maximum(elements, 1), 0.0).astype(jnp.float32)


def make_local_train(
    loss_fn: LossFn,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    report_variance: bool = False,
) -> Callable[..., LocalTrainResult]:
    """Builds ``local_train(params, frozen, mask, batches, step_mask, key, inputs=NO_INPUTS)``.

    ``batches`` leaves are ``[steps, batch, ...]``; ``step_mask`` ``[steps]`` marks real steps.
    A fresh per-leaf optimizer state is created per call (per round). Each real step estimates
    the gradient and applies :func:`leafwise_step` to the leaves the estimate covers
    (:func:`estimated_leaves`); padding steps and uncovered leaves change nothing, weights and
    optimizer state alike. ``inputs`` (the round's :class:`EstimatorInputs`: the global count of
    its first local step and the guide) reaches every step's estimate (:func:`estimate_step`).

    Args:
      report_variance: also accumulate the half sums of the step estimates (two float32 copies
        of the trainable weights) and report :func:`split_half_variance`.
    """

    def local_train(
        params: Trainable,
        frozen: PyTree,
        mask: Trainable,
        batches: Batch,
        step_mask: Array,
        key: Array,
        inputs: EstimatorInputs = NO_INPUTS,
    ) -> LocalTrainResult:
        num_steps = step_mask.shape[0]
        # Rank of each real step among the real ones; the first floor(n/2) form half A.
        first_half = jnp.cumsum(step_mask) - step_mask < jnp.floor(jnp.sum(step_mask) / 2)

        def step(carry, xs):
            p, s, loss_sum, acc = carry
            batch, valid, idx, first = xs
            est = estimate_step(estimator, loss_fn, p, frozen, mask, batch, key, idx, inputs)
            real = valid > 0
            active = {k: real & on for k, on in estimated_leaves(est, mask).items()}
            p, s = leafwise_step(optimizer, est.grad, s, p, active)
            if report_variance:
                acc = _accumulate_halves(acc, est.grad, active, first)
            return (p, s, loss_sum + valid * est.loss, acc), None

        acc0 = None
        if report_variance:
            zeros = {k: jnp.zeros(v.shape, jnp.float32) for k, v in params.items()}
            zero = jnp.zeros((), jnp.float32)
            acc0 = ((zeros, zeros), (zero, zero))
        init = (params, init_leaf_states(optimizer, params), jnp.zeros((), jnp.float32), acc0)
        xs = (batches, step_mask, jnp.arange(num_steps), first_half)
        (final, states, loss_sum, acc), _ = jax.lax.scan(step, init, xs)
        variance = jnp.zeros((), jnp.float32)
        if report_variance:
            variance = split_half_variance(acc[0], acc[1], mask)
        return LocalTrainResult(final, states, loss_sum, variance)

    return local_train


def _accumulate_halves(acc, grad: Trainable, active: dict[str, Array], first: Array):
    """Adds one step's estimate to the sum of its half; a step that estimated nothing is left out."""
    (sum_a, sum_b), (n_a, n_b) = acc
    on = jnp.any(jnp.stack(list(active.values())))
    in_a, in_b = on & first, on & ~first
    g = {k: jnp.where(active[k], v, 0).astype(jnp.float32) for k, v in grad.items()}
    sum_a = {k: jnp.where(in_a, sum_a[k] + g[k], sum_a[k]) for k in sum_a}
    sum_b = {k: jnp.where(in_b, sum_b[k] + g[k], sum_b[k]) for k in sum_b}
    return (sum_a, sum_b), (n_a + in_a, n_b + in_b)


def make_client_update(
    loss_fn: LossFn,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    report_variance: bool = False,
) -> Callable[..., ClientResult]:
    """Builds ``client_update(params, frozen, mask, batches, step_mask, key) -> ClientResult``.

    Local training as :func:`make_local_train` (same arguments), reduced to
    what the client sends: the masked delta, its example count, mean loss, step count and, with
    ``report_variance``, its :func:`split_half_variance` (FwdLLM+'s server-side client filter).
    """
    local_train = make_local_train(loss_fn, estimator, optimizer, report_variance)

    def client_update(
        params: Trainable,
        frozen: PyTree,
        mask: Trainable,
        batches: Batch,
        step_mask: Array,
        key: Array,
        inputs: EstimatorInputs = NO_INPUTS,
    ) -> ClientResult:
        out = local_train(params, frozen, mask, batches, step_mask, key, inputs)
        real_steps = jnp.sum(step_mask)
        delta = {k: (out.params[k] - params[k]) * mask[k].astype(params[k].dtype) for k in params}
        return ClientResult(
            delta=delta,
            num_examples=jnp.sum(batches["example_mask"] * step_mask[:, None]),
            loss=out.loss_sum / jnp.maximum(real_steps, 1.0),
            num_steps=real_steps,
            variance=out.variance,
        )

    return client_update
