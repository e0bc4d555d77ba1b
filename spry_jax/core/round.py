"""One federated round as one XLA program.

``round_fn(server_state, frozen, client_batches, key=None) -> (server_state, metrics)``:

1. deal units to the round's clients (a seeded slot shuffle, :mod:`spry_jax.core.units`) and
   turn the assignment into per-client masks;
2. run every client's local update, ``jax.vmap`` over the client axis, the client axis sharded
   over the mesh axis ``'clients'`` with ``jax.shard_map`` (padded slots carry zero weight);
3. aggregate per unit (example-weighted mean over the clients that trained it, a ``psum``);
   with ``client_var_threshold > 0`` (FwdLLM+ as published) a client whose reported
   gradient-estimate variance is at or above the threshold gets weight zero;
4. apply the server optimizer to the pseudo-gradient ``-delta``.

Backends (``round.backend``): ``shard_map`` (one program over all devices; the default),
``vmap`` (one program, one device), ``loop`` (a Python loop calling the *jitted* client update,
as fedjax's jit backend -- the fair speed baseline) and ``debug`` (a Python loop with
``jax.disable_jit()``, for pdb and prints). All give the same numbers.

How it is written: each comm mode's body exists once, over two abstractions the backend picks
(:func:`_backend_tools`, in the spirit of fedjax's ``for_each_client``):

* a **client map** ``map_clients(fn, shared, clients) -> (sums, per_client)`` over the
  per-client inputs (:class:`ClientInputs`, one pytree, so its ``shard_map`` spec is the one
  prefix ``P('clients')``): ``vmap`` (optionally in chunks of ``round.client_chunk`` clients,
  a ``lax.scan`` over chunks), then under ``shard_map`` a fixed-order sum over devices; or a
  Python loop over the slots calling ``fn`` jitted (``loop``) or traced op by op (``debug``);
* a **step scan**: ``lax.scan`` for the program backends, a Python loop for the loop backends.

Per-epoch is ``map_clients(local epoch)`` (:func:`_per_epoch_body`); per-iteration is
``scan(map_clients(client jvps + server regeneration) -> server step)`` followed by one
``map_clients`` for the round's evaluation and trainer counts (:func:`_per_iteration_body`).
Estimators receive their extra inputs as one :class:`~spry_jax.core.estimators.EstimatorInputs`
(the global step count and the previous round's aggregate). Bytes sent are counted outside the
core, in :mod:`spry_jax.comm`.

Which optimizer steps when:

* ``comm_mode='per_epoch'`` (the default; the release's per-epoch communication): per local step, each client's own
  ``client_optimizer`` (``client.optimizer``/``client.lr``, AdamW; state fresh every round) steps
  on that client's gradient estimate, its units only. Per round, ``server_optimizer``
  (``server.optimizer``, e.g. FedYogi) steps once on ``-delta``, the per-unit mean of the
  clients' updates.
* ``comm_mode='per_iteration'`` (Spry §3.2): every local step each client sends only its K jvp
  scalars; the server regenerates the tangents from (round key, client, step), rebuilds each
  unit's gradient averaged over the unit's clients and steps ``client_optimizer`` (the same
  ``client.optimizer``/``client.lr``, held by the server, state fresh every round so that a
  client replays it from the round's start weights and the broadcast scalars; one state per
  leaf: a leaf no active client trained this step keeps its weights and optimizer state). Clients therefore
  stay synchronised every step. Per round, by default (``per_iteration_round_optimizer=False``,
  the paper's plain form), nothing more: the weights after the round's last step are the new
  global model and ``server_optimizer`` is not applied (its state is carried unchanged). With
  ``per_iteration_round_optimizer=True`` (config ``per_iteration.server_round_optimizer``) the
  round's net change ``delta = w_after_last_step - w_start`` also goes through
  ``server_optimizer`` like a per-epoch delta: two optimizers, one per step and one per round.

Evaluation (``eval_batches``; the paper's generalized and personalized accuracy, Panchal et al., NeurIPS 2024, arXiv 2405.15551): "generalized" is the global model the round
starts from (``state.params``, i.e. after ``state.round`` completed rounds, *before* this
round's update) on the sampled clients' local test splits; "personalized" is each sampled
client's model after its local training in this round, on its own test split. So the figures of
round r describe the model after r rounds; the model after the last round is evaluated by a
further, evaluation-only call (``spry_jax.train.evaluate_final``). The sums are the task
evaluator's (``spry_jax.evaluation``), which also scores the host-side evaluations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from spry_jax.core import aggregation
from spry_jax.core import units as units_lib
from spry_jax.core.client import (
    LossFn,
    estimate_step,
    init_leaf_states,
    leafwise_step,
    make_client_update,
    step_keys,
)
from spry_jax.core.estimators import Estimator, EstimatorInputs, reconstruct_gradient
from spry_jax.types import BACKENDS, COMM_MODES, Array, Batch, PyTree, Trainable

CLIENT_AXIS = "clients"


class ServerState(NamedTuple):
    """State that crosses rounds (a pytree).

    Attributes:
      params: the global trainable weights.
      opt_state: the server optimizer's state.
      round: the index of the next round (int32 scalar).
      rng: the base PRNG key; round r uses ``fold_in(rng, r)``.
      last_delta: the previous round's aggregated client update (zeros before round 0; None is
        read as "no previous update"). Every method carries it and checkpoints save it; guided
        estimators (FwdLLM+) read it through the client context.
    """

    params: Trainable
    opt_state: optax.OptState
    round: Array
    rng: Array
    last_delta: Trainable | None = None


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """Everything static about a round program.

    Attributes:
      loss_fn: ``loss_fn(trainable, frozen, batch, dropout_rng) -> scalar``.
      estimator: the gradient estimator (:mod:`spry_jax.core.estimators`).
      client_optimizer: fresh each round (per-iteration mode: the server's per-step optimizer).
      server_optimizer: applied to ``-delta`` once per round.
      units: unit grouping of the trainable leaves.
      split: True for Spry's weight split; False = every client trains every leaf.
      clients_per_round: M, the real clients of a round.
      num_slots: client slots in the program (M padded to a multiple of the device count).
      comm_mode: ``per_epoch`` or ``per_iteration``.
      backend: one of :data:`BACKENDS`.
      mesh: the device mesh with axis ``'clients'`` (``shard_map`` backend).
      fwd_sigma: tangent standard deviation, needed to regenerate tangents (per-iteration).
      fwd_tangents: the tangents' distribution (``fwd.tangents``), to regenerate them.
      eval_fn: ``eval_fn(trainable, frozen, batch) -> {name: sum}`` (summed metrics, e.g.
        ``correct`` and ``count``); when the round gets ``eval_batches`` it reports the sums for
        the global model the round starts from, before its update (generalized), and for each
        client's model after its local training (personalized), as the paper reports them.
      client_chunk: C > 0 maps the program backends' client slots in chunks of C vmapped
        clients (a ``lax.scan`` over chunks; ``round.client_chunk``), so the round's peak memory
        grows with C instead of with the slots; 0 = all slots at once. C must divide the slots
        of a device (:func:`padded_slots` pads M for it). Same numbers up to summation order.
      per_iteration_round_optimizer: per-iteration only. False (the paper's plain form): the
        server's weights after the round's last step become the global model as they are and
        ``server_optimizer`` is not applied; True: the round's net change also goes through
        ``server_optimizer`` (see the module docstring).
      client_var_threshold: FwdLLM+'s server-side client filter (per-epoch mode): each client
        reports its :func:`spry_jax.core.client.split_half_variance` and a client at or above
        the threshold is left out of the aggregate (weight zero; ``train/dropped_clients``
        counts them). 0 = off.
    """

    loss_fn: LossFn
    estimator: Estimator
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    units: units_lib.Units
    split: bool
    clients_per_round: int
    num_slots: int
    comm_mode: str = "per_epoch"
    backend: str = "shard_map"
    mesh: Mesh | None = None
    fwd_sigma: float | None = None
    fwd_tangents: str = "gaussian"
    eval_fn: Callable[..., dict[str, Array]] | None = None
    client_var_threshold: float = 0.0
    per_iteration_round_optimizer: bool = False
    client_chunk: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"round.backend={self.backend!r}; choose one of {BACKENDS}.")
        if self.comm_mode not in COMM_MODES:
            raise ValueError(f"comm_mode={self.comm_mode!r}; choose one of {COMM_MODES}.")
        if self.num_slots < self.clients_per_round:
            raise ValueError("num_slots must be >= clients_per_round.")
        if self.client_var_threshold < 0:
            raise ValueError(
                f"client_var_threshold must be >= 0 (0 = off), got {self.client_var_threshold}"
            )
        if self.client_var_threshold > 0 and self.comm_mode != "per_epoch":
            raise ValueError("the client variance filter needs comm_mode='per_epoch'.")
        if self.comm_mode == "per_iteration" and self.fwd_sigma is None:
            raise ValueError(
                "comm_mode='per_iteration' needs a forward-gradient method (the clients send jvp "
                "scalars); use comm_mode='per_epoch' for this method."
            )
        if self.client_chunk < 0:
            raise ValueError(
                f"round.client_chunk must be >= 0 (0 = all slots at once), got {self.client_chunk}"
            )
        if self.client_chunk and self.backend not in ("shard_map", "vmap"):
            raise ValueError(
                f"round.client_chunk={self.client_chunk} chunks the one-program backends; "
                f"round.backend={self.backend!r} already runs one client at a time: set "
                "round.client_chunk=0 or round.backend to shard_map or vmap."
            )
        if self.client_chunk:
            sharded = self.backend == "shard_map" and self.mesh is not None
            devices = self.mesh.shape[CLIENT_AXIS] if sharded else 1
            if self.num_slots % (devices * self.client_chunk):
                raise ValueError(
                    f"round.client_chunk={self.client_chunk} must divide each device's client "
                    f"slots (num_slots={self.num_slots} over {devices} device(s)); pad M with "
                    f"padded_slots(M, {devices}, {self.client_chunk})."
                )
        if self.backend == "shard_map":
            if self.mesh is None:
                raise ValueError("backend 'shard_map' needs a mesh (see make_client_mesh).")
            if self.num_slots % self.mesh.shape[CLIENT_AXIS]:
                raise ValueError(
                    f"num_slots={self.num_slots} must be a multiple of the {CLIENT_AXIS!r} mesh "
                    f"axis size {self.mesh.shape[CLIENT_AXIS]}."
                )


def make_client_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over (the first ``num_devices``) devices with axis ``'clients'``."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"round.num_devices={n} but {len(devices)} devices are visible.")
    return Mesh(np.array(devices[:n]), (CLIENT_AXIS,))


def padded_slots(clients_per_round: int, num_devices: int, chunk: int = 0) -> int:
    """M rounded up to a multiple of the device count (times the client chunk, when set)."""
    unit = num_devices * max(chunk, 1)
    return -(-clients_per_round // unit) * unit


def init_server_state(
    params: Trainable, server_optimizer: optax.GradientTransformation, seed: int
) -> ServerState:
    """The state before round 0."""
    return ServerState(
        params=params,
        opt_state=server_optimizer.init(params),
        round=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        last_delta=jax.tree.map(jnp.zeros_like, params),
    )


def _masks_and_keys(spec: RoundSpec, round_key: Array) -> tuple[Trainable, Array]:
    assign_key, clients_key = jax.random.fold_in(round_key, 0), jax.random.fold_in(round_key, 1)
    if spec.split:
        assignment = units_lib.assign_units(
            assign_key, spec.clients_per_round, spec.units.num_units, spec.num_slots
        )
        masks = units_lib.unit_masks(spec.units, assignment)
    else:
        masks = units_lib.full_masks(spec.units, spec.clients_per_round, spec.num_slots)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(clients_key, jnp.arange(spec.num_slots))
    return masks, keys


def _eval_sums(eval_fn, params, frozen, eval_batches) -> dict[str, Array]:
    """Sums ``eval_fn`` over a client's eval steps (``[steps, batch, ...]``)."""

    def step(acc, batch):
        out = eval_fn(params, frozen, batch)
        return jax.tree.map(jnp.add, acc, out), None

    shapes = jax.eval_shape(eval_fn, params, frozen, jax.tree.map(lambda x: x[0], eval_batches))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return jax.lax.scan(step, zeros, eval_batches)[0]


def _tree_sum0(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def _psum(tree: PyTree, axis: str | None) -> PyTree:
    """The sum over the devices of ``axis``, in device order, the same on any topology.

    ``lax.psum`` lowers to an all-reduce whose summation order is the collective library's
    (XLA's in-process one for devices of one process, gloo/NCCL across processes), so the same
    round on 8 devices of one process and on 2 processes x 4 devices would differ in the last
    bits. Gathering the per-device partial sums and adding them in one fixed-order reduction
    makes every topology give the same bits. The gathered tree is ``devices`` copies of the
    aggregate (PEFT-sized here), a small price for runs that resume and compare exactly.
    """
    if not axis:
        return tree
    return jax.tree.map(lambda x: jnp.sum(jax.lax.all_gather(x, axis), axis=0), tree)


def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


# --------------------------------------------------------------------------------------------
# The two abstractions every round body is written with
# --------------------------------------------------------------------------------------------


class ClientInputs(NamedTuple):
    """One round's per-client inputs; every leaf has a leading client-slot axis.

    One pytree, so the ``shard_map`` spec of all of it is the single prefix ``P('clients')``.

    Attributes:
      mask: per trainable leaf, ``[slots]`` 0/1 (the client's units).
      batches: per-example leaves ``[slots, steps, batch, ...]`` (per-iteration steps see one
        step's ``[slots, batch, ...]``).
      step_mask: ``[slots, steps]``, 1 on real local steps (``[slots]`` for one step).
      key: ``[slots, 2]``, each slot's PRNG key for the round.
      eval_batches: the sampled clients' local test splits ``[slots, steps, batch, ...]``, or
        None (no evaluation this round).
    """

    mask: Trainable
    batches: Batch
    step_mask: Array
    key: Array
    eval_batches: Batch | None = None


# fn(shared, client) -> (summed, per_client): ``summed`` is added up over the clients (and the
# devices); ``per_client`` is kept per slot (``{}`` when not wanted).
ClientFn = Callable[[Any, ClientInputs], tuple[PyTree, PyTree]]
# map_clients(fn, shared, clients) -> (sum over clients of summed, per_client stacked by slot)
ClientMap = Callable[[ClientFn, Any, ClientInputs], tuple[PyTree, PyTree]]
# scan(f, init, xs) -> (carry, ys), as ``jax.lax.scan``.
StepScan = Callable[..., tuple[Any, Any]]


def _vmap_clients(axis: str | None, chunk: int = 0) -> ClientMap:
    """The program backends: ``vmap`` over the client slots, summed; under ``shard_map`` the
    per-device partial sums are then added over the ``'clients'`` axis (:func:`_psum`).

    ``chunk = C > 0`` (``round.client_chunk``): a ``lax.scan`` over chunks of C slots, each
    chunk ``vmap``-ed, its sums added to a running total -- one chunk's activations are alive
    at a time, so the round's peak memory grows with C, not with the number of slots.
    ``C = 1`` scans over the slots without ``vmap``: each client is traced alone, so a
    ``lax.switch`` in its step (``round.static_tangents``) runs only the branch it takes.
    """

    def map_clients(fn: ClientFn, shared: Any, clients: ClientInputs):
        mapped = jax.vmap(fn, in_axes=(None, 0))
        slots = clients.step_mask.shape[0]  # this device's slots under shard_map
        if not chunk or (chunk > 1 and chunk >= slots):
            summed, per_client = mapped(shared, clients)
            return _psum(_tree_sum0(summed), axis), per_client
        if chunk == 1:  # one client per scan step, not vmapped
            part, xs = fn, clients
        else:

            def part(shared, chunk_clients):
                summed, per_client = mapped(shared, chunk_clients)
                return _tree_sum0(summed), per_client

            xs = jax.tree.map(lambda x: x.reshape((slots // chunk, chunk, *x.shape[1:])), clients)

        def one_step(total, step_clients):
            summed, per_client = part(shared, step_clients)
            return jax.tree.map(jnp.add, total, summed), per_client

        shapes = jax.eval_shape(lambda c: part(shared, c)[0], _take(xs, 0))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        total, per_client = jax.lax.scan(one_step, zeros, xs)
        if chunk > 1:
            per_client = jax.tree.map(lambda x: x.reshape((slots, *x.shape[2:])), per_client)
        return _psum(total, axis), per_client

    return map_clients


def _loop_clients(jit: bool) -> ClientMap:
    """The loop backends: one client after another (``jit``: each a call of the jitted client
    function, fedjax's jit backend -- the fair speed baseline; else traced op by op under
    ``jax.disable_jit``), summed in slot order."""
    jitted: dict[Any, Callable] = {}

    def map_clients(fn: ClientFn, shared: Any, clients: ClientInputs):
        if jit and fn not in jitted:
            jitted[fn] = jax.jit(fn)
        run = jitted[fn] if jit else fn
        total, per_client = None, []
        for c in range(clients.step_mask.shape[0]):
            summed, mine = run(shared, _take(clients, c))
            total = summed if total is None else jax.tree.map(jnp.add, total, summed)
            per_client.append(mine)
        return total, _stack(per_client)

    return map_clients


def _loop_scan(f: Callable, init: Any, xs: Any):
    """``lax.scan``'s contract as a Python loop (per-iteration steps of the loop backends)."""
    carry, ys = init, []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, y = f(carry, _take(xs, i))
        ys.append(y)
    return carry, (None if all(y is None for y in ys) else _stack(ys))


def _backend_tools(spec: RoundSpec) -> tuple[ClientMap, StepScan]:
    """The client map and the step scan of ``spec.backend``."""
    if spec.backend in ("shard_map", "vmap"):
        axis = CLIENT_AXIS if spec.backend == "shard_map" else None
        return _vmap_clients(axis, spec.client_chunk), jax.lax.scan
    return _loop_clients(jit=spec.backend == "loop"), _loop_scan


# --------------------------------------------------------------------------------------------
# per-epoch: reduce(map(client))
# --------------------------------------------------------------------------------------------


def _per_epoch_client(spec: RoundSpec, client_deltas: bool) -> ClientFn:
    """One client's local epoch and what it adds to the round's sums."""
    filtered = spec.client_var_threshold > 0
    client_update = make_client_update(
        spec.loss_fn, spec.estimator, spec.client_optimizer, report_variance=filtered
    )

    def client(shared, c: ClientInputs):
        params, frozen, inputs = shared
        res = client_update(params, frozen, c.mask, c.batches, c.step_mask, c.key, inputs)
        real = (jnp.sum(c.step_mask) > 0).astype(jnp.float32)
        weight, delta, dropped = res.num_examples, res.delta, jnp.zeros((), jnp.float32)
        if filtered:
            # The filter is a per-client scalar on the aggregation weight, so every backend
            # applies it the same way. `<` also drops a NaN variance; the delta is zeroed
            # rather than weighted by 0 so that a non-finite one cannot leak in as 0 * inf.
            keep = res.variance < spec.client_var_threshold
            weight = jnp.where(keep, weight, 0.0)
            delta = {k: jnp.where(keep, d, jnp.zeros_like(d)) for k, d in delta.items()}
            dropped = real * (1.0 - keep.astype(jnp.float32))
        num, den = aggregation.weighted_sums(delta, c.mask, weight)
        # train/loss stays over every real client: a dropped client still trained on its data.
        stats = {
            "loss_num": res.num_examples * res.loss,
            "examples": res.num_examples,
            "steps": res.num_steps,
            "clients": real,
            "dropped": dropped,
            "variance_sum": real * res.variance,
        }
        trainers = {k: real * m for k, m in c.mask.items()}
        if c.eval_batches is not None:
            local = {k: params[k] + res.delta[k] for k in params}
            stats["eval"] = {
                "generalized": _eval_sums(spec.eval_fn, params, frozen, c.eval_batches),
                "personalized": _eval_sums(spec.eval_fn, local, frozen, c.eval_batches),
            }
        return (num, den, stats, trainers), (res.delta if client_deltas else {})

    return client


def _per_epoch_body(spec: RoundSpec, client_deltas: bool) -> Callable[..., tuple]:
    map_clients, _ = _backend_tools(spec)
    client = _per_epoch_client(spec, client_deltas)

    def body(params, frozen, clients: ClientInputs, inputs: EstimatorInputs):
        return map_clients(client, (params, frozen, inputs), clients)

    return body


# --------------------------------------------------------------------------------------------
# per-iteration: scan(reduce(map(client jvps)) -> server step)
# --------------------------------------------------------------------------------------------


def _per_iteration_client(spec: RoundSpec) -> ClientFn:
    """One client's part of one per-iteration step, and the server's use of it.

    The client computes its loss and K jvp scalars (all it sends); the server regenerates the
    client's tangents from the same key derivation and adds the client's weighted gradient to
    the step's per-unit sums.
    """

    def client(shared, c: ClientInputs):
        params, frozen, step, inputs = shared
        est = estimate_step(
            spec.estimator, spec.loss_fn, params, frozen, c.mask, c.batches, c.key, step, inputs
        )
        weight = c.step_mask * jnp.sum(c.batches["example_mask"])
        _, est_key = step_keys(c.key, step)
        grad = reconstruct_gradient(
            est_key, params, c.mask, est.jvps, spec.fwd_sigma, spec.fwd_tangents
        )
        num, den = aggregation.weighted_sums(grad, c.mask, weight)
        stats = {"loss_num": weight * est.loss, "examples": weight, "active": c.step_mask}
        return (num, den, stats), {}

    return client


def _server_step(spec: RoundSpec, p, opt_state, num, den):
    """One per-iteration step; a leaf no active client trained (``den == 0``) was not estimated
    this step, so its weights and its optimizer state stay as they are."""
    grad = aggregation.finalize(num, den)
    return leafwise_step(spec.client_optimizer, grad, opt_state, p, {k: den[k] > 0 for k in p})


def _per_iteration_summary(spec: RoundSpec, client_deltas: bool) -> ClientFn:
    """After the steps: who trained, the evaluation of the round's two models, and (on request)
    each slot's change -- per-iteration clients all hold the server's weights, so each real
    slot's change is the same."""

    def client(shared, c: ClientInputs):
        params, p_final, frozen = shared
        real = (jnp.sum(c.step_mask) > 0).astype(jnp.float32)
        out = {"clients": real, "trainers": {k: real * m for k, m in c.mask.items()}}
        if c.eval_batches is not None:
            out["eval"] = {
                "generalized": _eval_sums(spec.eval_fn, params, frozen, c.eval_batches),
                "personalized": _eval_sums(spec.eval_fn, p_final, frozen, c.eval_batches),
            }
        delta = {}
        if client_deltas:
            delta = {k: real.astype(params[k].dtype) * (p_final[k] - params[k]) for k in params}
        return out, delta

    return client


def _per_iteration_body(spec: RoundSpec, client_deltas: bool) -> Callable[..., tuple]:
    map_clients, scan = _backend_tools(spec)
    client = _per_iteration_client(spec)
    summary = _per_iteration_summary(spec, client_deltas)

    def body(params, frozen, clients: ClientInputs, inputs: EstimatorInputs):
        def step(carry, xs):
            p, opt_state, stats = carry
            batch, valid, s = xs
            step_clients = clients._replace(batches=batch, step_mask=valid, eval_batches=None)
            (num, den, step_stats), _ = map_clients(client, (p, frozen, s, inputs), step_clients)
            p, opt_state = _server_step(spec, p, opt_state, num, den)
            stats = {
                "loss_num": stats["loss_num"] + step_stats["loss_num"],
                "examples": stats["examples"] + step_stats["examples"],
                "steps": stats["steps"] + step_stats["active"],
                "active_sq": stats["active_sq"] + step_stats["active"] ** 2,
            }
            return (p, opt_state, stats), None

        zero = jnp.zeros((), jnp.float32)
        stats0 = {"loss_num": zero, "examples": zero, "steps": zero, "active_sq": zero}
        steps_first = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), clients.batches)
        num_steps = clients.step_mask.shape[1]
        xs = (steps_first, jnp.swapaxes(clients.step_mask, 0, 1), jnp.arange(num_steps))
        init = (params, init_leaf_states(spec.client_optimizer, params), stats0)
        (p_final, _, stats), _ = scan(step, init, xs)
        out, per_client = map_clients(summary, (params, p_final, frozen), clients)
        stats["clients"] = out["clients"]
        if "eval" in out:
            stats["eval"] = out["eval"]
        return (p_final, stats, out["trainers"]), per_client

    return body


# --------------------------------------------------------------------------------------------
# the round
# --------------------------------------------------------------------------------------------


def _inner(spec: RoundSpec, client_deltas: bool) -> Callable[..., tuple]:
    make_body = _per_epoch_body if spec.comm_mode == "per_epoch" else _per_iteration_body
    body = make_body(spec, client_deltas)
    if spec.backend != "shard_map":
        return body
    clients = P(CLIENT_AXIS)
    return jax.shard_map(
        body,
        mesh=spec.mesh,
        in_specs=(P(), P(), clients, P()),
        # (the round's sums, replicated; the per-client outputs, split like the clients)
        out_specs=(P(), clients),
        check_vma=False,
    )


def make_round_fn(
    spec: RoundSpec, donate_state: bool = False
) -> Callable[..., tuple[ServerState, dict[str, Array]]]:
    """Builds ``round_fn(state, frozen, client_batches, key=None, eval_batches=None,
    client_deltas=False) -> (state, metrics)``.

    ``donate_state=True`` (program backends) donates the input state's buffers to the new
    state, so a round holds one copy of the weights and optimizer state: the ``state`` passed in
    is deleted by the call (the round loop's non-eval rounds, which never read it again).

    ``client_batches`` holds the per-example leaves ``[num_slots, steps, batch, ...]`` and
    ``step_mask`` ``[num_slots, steps]``. ``key`` defaults to ``fold_in(state.rng, state.round)``.
    ``metrics`` has ``train/loss`` (example-weighted), ``train/examples``, ``train/steps``,
    ``train/clients`` and ``trainers`` (per leaf: how many clients trained it, for byte counts);
    per-epoch rounds also have ``train/dropped_clients`` (real clients the variance filter left
    out, 0 when it is off) and, with the filter on, ``train/client_variance`` (the mean
    reported variance over the real clients).
    With ``eval_batches`` (``[num_slots, steps, batch, ...]``, the sampled clients' local test
    splits) it also has ``eval`` = ``{"generalized": sums, "personalized": sums}``: generalized
    of ``state.params`` (the model the round starts from), personalized of each client's model
    after its local training. ``client_deltas=True`` (static; a second program, meant for eval
    rounds only, as it returns ``num_slots`` copies of the trainable weights) adds
    ``client_deltas`` = ``{leaf: [num_slots, ...]}``: each slot's local model minus
    ``state.params`` (zero for padded slots; per-iteration: the server's shared change), for
    host-side personalized evaluation (QA).
    """
    inners = {flag: _inner(spec, flag) for flag in (False, True)}
    # In per-iteration mode the body returns the server's weights after the round's last step.
    plain = spec.comm_mode == "per_iteration" and not spec.per_iteration_round_optimizer

    def round_fn(
        state: ServerState,
        frozen: PyTree,
        client_batches: Batch,
        key: Array | None = None,
        eval_batches: Batch | None = None,
        client_deltas: bool = False,
    ):
        if eval_batches is not None:
            if spec.eval_fn is None:
                raise ValueError("eval_batches given but the RoundSpec has no eval_fn.")
            eval_batches = {k: v for k, v in eval_batches.items() if k != "step_mask"}
        round_key = jax.random.fold_in(state.rng, state.round) if key is None else key
        masks, keys = _masks_and_keys(spec, round_key)
        step_mask = client_batches["step_mask"]
        clients = ClientInputs(
            mask=masks,
            batches={k: v for k, v in client_batches.items() if k != "step_mask"},
            step_mask=step_mask,
            key=keys,
            eval_batches=eval_batches,
        )
        # What estimators may read besides (f, params, mask, key): the global count of the
        # round's first local step and the previous round's aggregate.
        inputs = EstimatorInputs(step=state.round * step_mask.shape[1], guide=state.last_delta)
        out, per_client = inners[bool(client_deltas)](state.params, frozen, clients, inputs)
        if spec.comm_mode == "per_epoch":
            num, den, stats, trainers = out
            delta = aggregation.finalize(num, den)
        else:
            p_final, stats, trainers = out
            delta = {k: p_final[k] - state.params[k] for k in state.params}
        if plain:
            params, opt_state = p_final, state.opt_state
        else:
            pseudo_grad = jax.tree.map(jnp.negative, delta)
            updates, opt_state = spec.server_optimizer.update(
                pseudo_grad, state.opt_state, state.params
            )
            params = optax.apply_updates(state.params, updates)
        last_delta = {k: delta[k].astype(state.params[k].dtype) for k in state.params}
        new_state = ServerState(params, opt_state, state.round + 1, state.rng, last_delta)
        metrics = {
            "train/loss": stats["loss_num"] / jnp.maximum(stats["examples"], 1.0),
            "train/examples": stats["examples"],
            "train/steps": stats["steps"],
            "train/clients": stats["clients"],
            "trainers": trainers,
        }
        if "dropped" in stats:
            metrics["train/dropped_clients"] = stats["dropped"]
        if spec.client_var_threshold > 0:
            metrics["train/client_variance"] = stats["variance_sum"] / jnp.maximum(
                stats["clients"], 1.0
            )
        if "active_sq" in stats:
            metrics["active_sq"] = stats["active_sq"]
        if "eval" in stats:
            metrics["eval"] = stats["eval"]
        if client_deltas:
            metrics["client_deltas"] = per_client
        return new_state, metrics

    if spec.backend in ("shard_map", "vmap"):
        donate = ("state",) if donate_state else ()
        return jax.jit(round_fn, static_argnames=("client_deltas",), donate_argnames=donate)
    if spec.backend == "debug":

        def debug_round_fn(*args, **kwargs):
            with jax.disable_jit():
                return round_fn(*args, **kwargs)

        return debug_round_fn
    return round_fn
