"""``train_and_evaluate(config, workdir)``: build -> restore -> the round loop -> write.

:func:`build_experiment` (data, model, method row, the task's evaluator, the jitted round),
:func:`restore` (the newest checkpoint of this experiment), then per round: sample clients ->
pack -> round (one XLA program, which also sums the round's evaluation where the task allows)
-> log -> checkpoint, then the final evaluation of the final global model
(:func:`evaluate_final`, the evaluator's all-clients and held-out scopes) and ``summary.json``.
Evaluation itself lives in :mod:`spry_jax.evaluation`, the memory check in
:mod:`spry_jax.memory`.
It never branches on dataset, model or method names: those are resolved by the data registry,
the model registry and the algorithm table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spry_jax import checkpoint as ckpt_lib
from spry_jax import comm, evaluation, methods, models, multihost, reporting, tasks
from spry_jax import config as config_lib
from spry_jax import data as data_lib
from spry_jax import memory as memory_lib
from spry_jax import metrics as metrics_lib
from spry_jax.core import round as round_lib
from spry_jax.core import units as units_lib
from spry_jax.errors import ConfigError, UserError
from spry_jax.types import SplitModel


@dataclasses.dataclass
class Experiment:
    """Everything built from a config, before the first round (useful in notebooks)."""

    config: ml_collections.ConfigDict
    fed: Any
    model: SplitModel
    spec: round_lib.RoundSpec
    round_fn: Any
    num_steps: int
    eval_steps: int
    evaluator: evaluation.Evaluator
    # The same round with the input state's buffers donated (program backends; the loop's
    # non-eval rounds, which never read the old state again). None: use ``round_fn``.
    donating_round_fn: Any = None

    def init_state(self) -> round_lib.ServerState:
        state = round_lib.init_server_state(
            self.model.trainable, self.spec.server_optimizer, self.config.seed
        )
        return self.replicate(state)

    def replicate(self, tree: Any) -> Any:
        """Places a pytree replicated on the mesh (the round's outputs come back that way, so
        inputs placed alike compile once)."""
        if self.spec.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.spec.mesh, P()))

    def shard_clients(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Places per-client arrays with the client axis split over the mesh."""
        if self.spec.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        sharding = NamedSharding(self.spec.mesh, P(round_lib.CLIENT_AXIS))
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}

    def sample_clients(self, round_index: int) -> np.ndarray:
        """The clients of a round: deterministic in (seed, round), so runs resume exactly."""
        rng = np.random.default_rng([self.config.seed, round_index, 0xC11E])
        return np.sort(
            rng.choice(self.config.num_clients, self.config.clients_per_round, replace=False)
        )

    def round_batches(self, round_index: int, clients: np.ndarray) -> dict[str, jax.Array]:
        rng = np.random.default_rng([self.config.seed, round_index, 0xBA7C])
        packed = data_lib.pack_clients(
            [self.fed.train[c] for c in clients],
            batch_size=self.config.client.batch_size,
            epochs=self.config.client.epochs,
            rng=rng,
            num_slots=self.spec.num_slots,
            max_steps=self.num_steps,
        )
        return self.shard_clients(packed)

    def eval_batches(self, clients: np.ndarray) -> dict[str, jax.Array]:
        packed = data_lib.pack_eval(
            [self.fed.test[c] for c in clients],
            batch_size=self.config.eval_batch_size,
            num_slots=self.spec.num_slots,
        )
        return self.shard_clients({k: _pad_steps(v, self.eval_steps) for k, v in packed.items()})


def _pad_steps(x: np.ndarray, steps: int) -> np.ndarray:
    """Pads axis 1 (steps) with zeros (masked) so every round has the same shapes."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, steps - x.shape[1])
    return np.pad(x, pad)


def _load_tokenizer(config: ml_collections.ConfigDict):
    if config.data.name == "synthetic":
        return None
    return models.load_tokenizer(config.model.tokenizer or config.model.name)


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Data, model, method row and the jitted round program for a config."""
    config_lib.validate(config)
    try:
        tokenizer = _load_tokenizer(config)
    except (OSError, ValueError) as e:  # FileNotFoundError, the hub offline or unreachable
        what = config.model.tokenizer or config.model.name
        raise ConfigError(
            f"tokenizer {what!r} (model.tokenizer, or model.name when it is empty): {e}"
        ) from e
    fed = data_lib.make_federated_data(
        config.data, num_clients=config.num_clients, tokenizer=tokenizer, seed=config.seed
    )
    try:
        model = models.make_split_model(
            config.model,
            config.peft,
            task=fed.task,
            num_labels=fed.num_labels,
            seed=config.seed,
            **methods.model_options(config.method),
        )
    except UserError:
        raise
    except (OSError, ValueError) as e:  # an unknown name, missing files, a bad model value
        raise ConfigError(f"model.name={config.model.name!r}: {e}") from e
    units = units_lib.make_units(
        model.order,
        config.split.tensors_per_unit,
        model.head_keys,
        config.split.classifier_share,
        peft_method=model.peft_method,
    )
    parts = methods.build_round_parts(
        config,
        model.head_keys,
        tuple(model.trainable),
        methods.static_tangent_sets(config, units),
    )
    evaluator = evaluation.make_evaluator(model, fed, config.eval_batch_size)
    backend = config.round.backend
    mesh = None
    chunk = config.round.client_chunk
    num_slots = config.clients_per_round
    if backend == "shard_map":
        mesh = round_lib.make_client_mesh(config.round.num_devices or None)
        num_slots = round_lib.padded_slots(num_slots, mesh.shape[round_lib.CLIENT_AXIS], chunk)
    elif backend == "vmap":
        num_slots = round_lib.padded_slots(num_slots, 1, chunk)
    spec = round_lib.RoundSpec(
        loss_fn=tasks.make_loss_fn(model, config.model.dropout_bits),
        estimator=parts.estimator,
        client_optimizer=parts.client_optimizer,
        server_optimizer=parts.server_optimizer,
        units=units,
        split=parts.split,
        clients_per_round=config.clients_per_round,
        num_slots=num_slots,
        comm_mode=config.comm_mode,
        backend=backend,
        mesh=mesh,
        fwd_sigma=parts.fwd_sigma,
        fwd_tangents=parts.fwd_tangents,
        client_var_threshold=parts.client_var_threshold,
        eval_fn=evaluator.batch_sums,
        per_iteration_round_optimizer=parts.per_iteration_round_optimizer,
        client_chunk=chunk,
    )
    b = config.client.batch_size
    max_train = max(len(t["input_ids"]) for t in fed.train)
    num_steps = config.client.epochs * math.ceil(max_train / b)
    caps = [s for s in (config.client.max_steps, parts.max_steps) if s]
    if caps:
        num_steps = min([num_steps, *caps])
    max_test = max(len(t["input_ids"]) for t in fed.test)
    eval_steps = max(1, math.ceil(max_test / config.eval_batch_size))
    round_fn = round_lib.make_round_fn(spec)
    programs = backend in ("vmap", "shard_map")
    donating = round_lib.make_round_fn(spec, donate_state=True) if programs else None
    return Experiment(
        config, fed, model, spec, round_fn, num_steps, eval_steps, evaluator, donating
    )


# Config fields (top-level names or groups) a resume may change: they decide what is evaluated,
# saved and logged, or on which devices the same program runs -- never the trajectory (the four
# round backends give the same numbers, tests/core/test_round.py). Every other field, including
# any added later, is part of a checkpoint's identity, so a forgotten field refuses a resume
# rather than silently continuing a different experiment. ``rounds`` is handled apart.
RESUMABLE_FIELDS = (
    "rounds",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "eval_batch_size",
    "eval_all_clients",
    "log_memory",
    "round",
    "report",
    "resume_allow_schedule_change",
    "memory",
)

_flatten = config_lib.flatten


def _identity(exp: Experiment) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every config field that changes the
    trajectory (all but :data:`RESUMABLE_FIELDS`; optimizers as they resolve, so ``auto`` equals
    the name it stands for), ``rounds`` where the server schedule depends on it, and
    fingerprints of the frozen base and of the data partition (neither is saved)."""
    c = exp.config
    identity = {k: v for k, v in _flatten(c).items() if k.split(".")[0] not in RESUMABLE_FIELDS}
    identity.update(methods.resolved_optimizers(c))
    # Extending a run resumes it bit-identically unless the server schedule is spread over
    # ``rounds``; only then does ``rounds`` take part (None = free to change).
    identity["rounds"] = c.rounds if c.server.schedule != "constant" else None
    identity["model_fingerprint"] = models_fingerprint(exp.model)
    identity["data_fingerprint"] = exp.fed.fingerprint
    return json.loads(json.dumps(identity))  # as it reads back from JSON (tuples -> lists)


def restore(
    exp: Experiment, manager: ckpt_lib.Checkpointer, template: round_lib.ServerState
) -> tuple[round_lib.ServerState, int] | None:
    """The newest checkpoint of this experiment (None if there is none).

    Raises:
      CheckpointMismatchError: it is of a different experiment (the message names the fields,
        both values and the fix); a changed ``rounds`` under a rounds-dependent server schedule
        counts unless ``resume_allow_schedule_change``.
    """
    c = exp.config
    ignore = ("rounds",) if c.resume_allow_schedule_change else ()
    hint = (
        f"server.schedule={c.server.schedule!r} scales the server step by a factor that runs "
        "from 1 at round 0 to server.final_fraction at round rounds-1, so a new rounds changes "
        "the factor of every round still to run (round r gets factor(r / (new rounds - 1)) "
        "instead of factor(r / (old rounds - 1)); the rounds already run keep theirs). Set "
        "--config.resume_allow_schedule_change=True to continue on the stretched schedule."
    )
    return manager.restore_latest(
        template,
        _identity(exp),
        ignore=ignore,
        hints={"rounds": hint},
        added_with_default=config_lib.added_with_default,
    )


def models_fingerprint(model: SplitModel) -> str:
    """A hash of the frozen base's leaf names, shapes, dtypes and a strided sample of values."""
    import hashlib

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(model.frozen)[0]
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, arr.dtype)).encode())
        flat = arr.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 64)]).tobytes())
    for k in model.order:
        h.update(k.encode())
    return h.hexdigest()[:16]


def _is_eval_round(config: ml_collections.ConfigDict, r: int) -> bool:
    last = r == config.rounds - 1
    return last or (config.eval_every > 0 and (r + 1) % config.eval_every == 0)


def _is_checkpoint_round(config: ml_collections.ConfigDict, r: int) -> bool:
    last = r == config.rounds - 1
    return last or (config.checkpoint_every > 0 and (r + 1) % config.checkpoint_every == 0)


@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """What the host prepares for a round: its sampled clients and their packed, placed
    arrays (deterministic in (seed, round), so the next round's can be packed while the device
    runs this one)."""

    round: int
    clients: np.ndarray
    batches: dict[str, jax.Array]
    eval_batches: dict[str, jax.Array] | None


def prepare_round(exp: Experiment, r: int, evaluate: bool) -> RoundInputs:
    """Samples, packs and places round ``r``'s client arrays (and, on an eval round whose
    evaluation runs in the program, the clients' test batches)."""
    clients = exp.sample_clients(r)
    batches = exp.round_batches(r, clients)
    in_program = evaluate and exp.spec.eval_fn is not None
    eval_batches = exp.eval_batches(clients) if in_program else None
    return RoundInputs(r, clients, batches, eval_batches)


def dispatch_round(
    exp: Experiment,
    state: round_lib.ServerState,
    frozen: Any,
    evaluate: bool,
    inputs: RoundInputs | None = None,
) -> tuple[round_lib.ServerState, dict[str, Any]]:
    """Launches round ``state.round`` and returns ``(new state, round metrics)`` as device
    arrays without waiting for them (JAX dispatches asynchronously). A non-eval round donates
    ``state``'s buffers where the backend allows it (:attr:`Experiment.donating_round_fn`), so
    ``state`` must not be read afterwards; an eval round keeps it (its evaluation and the final
    all-clients evaluation read it)."""
    r = int(state.round)
    if inputs is None or inputs.round != r:
        inputs = prepare_round(exp, r, evaluate)
    # Per-client deltas only on host-evaluated rounds: num_slots copies of the trainable weights.
    host = evaluate and inputs.eval_batches is None
    fn = exp.round_fn if evaluate or exp.donating_round_fn is None else exp.donating_round_fn
    return fn(state, frozen, inputs.batches, None, inputs.eval_batches, client_deltas=host)


def round_evaluation(
    exp: Experiment, state: round_lib.ServerState, frozen: Any, metrics: dict[str, Any]
) -> dict[str, float]:
    """The evaluation record of the eval round that started from ``state`` (its metrics
    ``metrics``): see :func:`run_round`."""
    clients = exp.sample_clients(int(state.round))
    record = exp.evaluator.round(metrics, state.params, frozen, clients)
    record[metrics_lib.MODEL_AFTER_ROUNDS] = int(state.round)
    return record


def run_round(
    exp: Experiment, state: round_lib.ServerState, frozen: Any, evaluate: bool
) -> tuple[round_lib.ServerState, dict[str, Any], dict[str, float]]:
    """Round ``state.round`` (its clients, batches and key are deterministic in (seed, round)).

    Returns:
      ``(new state, round metrics, evaluation)``; the evaluation is ``{}`` unless ``evaluate``.
      It is of the model the round starts from, ``state.params`` (the global model after
      ``state.round`` rounds; ``eval/model_after_rounds`` says so): ``eval/generalized_*`` of
      that model on the round's sampled clients' local test splits, ``eval/personalized_*`` of
      each of those clients' models after its local training in this round, example-weighted
      (the paper's generalized and personalized accuracy: Panchal et al., NeurIPS 2024, arXiv
      2405.15551, evaluation setup), by the task's evaluator (:mod:`spry_jax.evaluation`):
      summed inside the round program where it can be (classification), else on the host from
      the round's per-client deltas (QA). A non-eval round donates ``state``
      (:func:`dispatch_round`).
    """
    new_state, m = dispatch_round(exp, state, frozen, evaluate)
    evaluation_record = round_evaluation(exp, state, frozen, m) if evaluate else {}
    return new_state, m, evaluation_record


def evaluate_final(exp: Experiment, state: round_lib.ServerState, frozen: Any) -> dict[str, float]:
    """The evaluation of the final global model ``state.params``: what round ``state.round``
    (the next one, were the run extended) reports at its start -- generalized on its sampled
    clients, personalized after their local training -- computed by that round's program with
    its update discarded. So ``eval/model_after_rounds`` = the rounds run, and an extended run
    that evaluates that round records these figures again."""
    return run_round(exp, state, frozen, evaluate=True)[2]


def _check_metrics_cover(path: str, start: int, directory: str) -> None:
    """Refuses to resume after ``start`` rounds when ``metrics.jsonl`` lacks some of them: the
    summary, its totals and the curves would silently leave them out."""
    have = {r.get("round") for r in metrics_lib.read_records(path)}
    missing = [r for r in range(start) if r not in have]
    if missing:
        span = f"{missing[0]}..{missing[-1]}" if len(missing) > 1 else str(missing[0])
        raise UserError(
            f"{path} lacks rounds {span} ({len(missing)} of the {start} the checkpoint in "
            f"{directory} has run); a resume would leave them out of summary.json and "
            "curves.png. Put the metrics file back (it is never rebuilt from checkpoints), or "
            "use a new --workdir."
        )


def _write_config(path: str, config: ml_collections.ConfigDict, resumed: bool) -> None:
    """Writes ``config.json`` on a fresh start; on a resume only if a field a resume may change
    (:data:`RESUMABLE_FIELDS`) changed -- every other field matched the checkpoint."""
    new = json.loads(config.to_json())
    if resumed and os.path.exists(path):
        old = metrics_lib.read_json(path)
        if old == new:
            return
        changed = sorted(
            k
            for k in set(_flatten(old)) | set(_flatten(new))
            if _flatten(old).get(k) != _flatten(new).get(k)
        )
        logging.info("config.json updated on resume: %s changed.", ", ".join(changed[:10]))
    metrics_lib.write_json_atomic(path, new)


def _write_summary(path: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Writes ``summary.json``, never with less than it had: a rerun of a finished run with an
    evaluation switched off (``eval_all_clients=False``) keeps the figures already there, which
    are of the same final model (same ``rounds``; the checkpoint proved the experiment)."""
    old = metrics_lib.read_json(path) if os.path.exists(path) else None
    if old and old.get("rounds") == summary["rounds"]:
        kept = [k for k in old.get("final", {}) if k not in summary["final"]]
        summary["final"] = {**{k: old["final"][k] for k in kept}, **summary["final"]}
        for k, v in old.items():
            if summary.get(k) is None and v is not None:
                summary[k] = v
                kept.append(k)
        if kept:
            logging.info("summary.json keeps %s from the previous run's.", ", ".join(kept))
    metrics_lib.write_json_atomic(path, summary)
    return summary


@contextlib.contextmanager
def _clean_start(workdir: str) -> Iterator[Any]:
    """Removes what a run created in ``workdir`` if it fails before its first round is logged
    (then the call yields ``commit``, which the run calls once it has), so a refused or failed
    start leaves the workdir as it found it."""
    names = ("config.json", "metrics.jsonl", "tensorboard", "checkpoints", "summary.json")
    existed = os.path.isdir(workdir)
    before = {n for n in names if os.path.lexists(os.path.join(workdir, n))}
    done = []
    try:
        yield lambda: done.append(True)
    except BaseException:
        if not done:
            for n in names:
                p = os.path.join(workdir, n)
                if n not in before and os.path.lexists(p):
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            if not existed and os.path.isdir(workdir) and not os.listdir(workdir):
                os.rmdir(workdir)
        raise


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) an experiment in ``workdir``; returns the summary.

    Writes ``config.json``, ``metrics.jsonl`` (one record per round; on eval rounds the eval
    fields are of the model that round starts from, see :func:`run_round`), ``checkpoints/``
    (orbax) and ``summary.json``, whose ``final`` is entirely of the final global model:
    :func:`evaluate_final` plus ``eval/all_clients_*`` (and ``eval/heldout_*`` with a global
    held-out set). Rerunning the same command resumes from the last checkpoint that restores
    (refused if the experiment changed, :func:`restore`, or if ``metrics.jsonl`` lacks rounds
    it covers); the metrics of rounds after it are recomputed bit-for-bit. Everything that can
    refuse the run (config, data, checkpoint, memory: :func:`spry_jax.memory.check_round_memory`) runs before
    anything is written, and a run that fails before its first round leaves the workdir as it
    found it.
    """
    config = ml_collections.ConfigDict(config)
    config_lib.validate(config)
    t_build = time.time()
    exp = build_experiment(config)
    logging.info("Built the experiment in %.1fs.", time.time() - t_build)
    identity = _identity(exp)
    state = exp.init_state()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    manager = None
    start = 0
    if os.path.isdir(ckpt_dir):
        manager = ckpt_lib.Checkpointer(ckpt_dir, config.keep_checkpoints)
        restored = restore(exp, manager, state)
        if restored is not None:
            state, start = restored
            state = exp.replicate(state)
            _check_metrics_cover(os.path.join(workdir, "metrics.jsonl"), start, ckpt_dir)
            logging.info("Resumed from the checkpoint after round %d.", start - 1)
    check = config.memory.check and start < config.rounds
    step_memory = memory_lib.experiment_step_memory(exp) if (config.log_memory or check) else {}
    if check:
        memory_lib.check_round_memory(exp, step_memory)
    memory = step_memory if config.log_memory else {}
    # Several processes: each computes every figure (the round's outputs are replicated), only
    # the primary one writes files (spry_jax.multihost); orbax checkpoints involve all of them.
    primary = multihost.is_primary()
    with _clean_start(workdir) as commit:
        os.makedirs(workdir, exist_ok=True)
        if primary:
            _write_config(os.path.join(workdir, "config.json"), config, resumed=start > 0)
        log = metrics_lib.MetricsLog(
            os.path.join(workdir, "metrics.jsonl"), keep_before=start, write=primary
        )
        board = reporting.TensorBoard(workdir) if primary else reporting.NoBoard()
        if manager is None:
            manager = ckpt_lib.Checkpointer(ckpt_dir, config.keep_checkpoints)
        if start >= config.rounds:
            commit()
        return _run_rounds(exp, state, start, manager, log, board, memory, identity, commit)


class _Dispatched(NamedTuple):
    """A round launched on the device, its figures not read back yet."""

    round: int
    start_time: float
    metrics: dict[str, Any]
    finite: jax.Array  # device bool: the loss and the new weights are finite
    evaluation: dict[str, float]


@jax.jit
def _round_is_finite(loss: jax.Array, params: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
    return jnp.isfinite(loss) & jnp.all(jnp.stack(leaves))


def _read_back(
    exp: Experiment,
    pending: list[_Dispatched],
    checkpoints: str,
    wall0: float,
    memory: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Yields the metrics records of the dispatched rounds ``pending`` in order, once the
    device has finished them.

    With several rounds read back at once (``log_every > 1``) each gets an equal share of the
    stretch's wall time as ``time/round_s``.

    Raises:
      FloatingPointError: at the first round whose loss or new weights are not finite, after
        yielding the rounds before it (checkpoints are written only after a read-back, so
        nothing non-finite is ever saved).
    """
    config = exp.config
    jax.block_until_ready(pending[-1].finite)
    now = time.time()
    seconds = (now - pending[0].start_time) / len(pending)
    for d in pending:
        loss = float(d.metrics["train/loss"])
        if not bool(d.finite):
            what = (
                f"train/loss is {loss}" if not math.isfinite(loss) else "the weights are not finite"
            )
            raise FloatingPointError(
                f"{what} after round {d.round}; stopping without saving. The last good checkpoint "
                f"in {checkpoints} is intact. Lower client.lr (or fwd.sigma) and rerun with a "
                "new --workdir (with another lr it is another experiment; this checkpoint would "
                "refuse it)."
            )
        m = d.metrics
        up, down = comm.round_bytes(
            exp.spec.comm_mode, exp.model.trainable, m, config.fwd.num_tangents
        )
        record = {
            "round": d.round,
            "train/loss": loss,
            "train/examples": float(m["train/examples"]),
            "train/steps": float(m["train/steps"]),  # real local steps, all clients together
            "train/examples_per_s": float(m["train/examples"]) / max(seconds, 1e-9),
            "time/round_s": seconds,
            "time/wall_s": now - wall0,
            "comm/up_bytes": up,
            "comm/down_bytes": down,
        }
        for key in ("train/dropped_clients", "train/client_variance"):
            if key in m:
                record[key] = float(m[key])
        if d.round == 0 and memory:
            record.update({f"memory/client_step_{k}": v for k, v in memory.items()})
        record.update(d.evaluation)
        yield record


def _run_rounds(
    exp: Experiment,
    state: round_lib.ServerState,
    start: int,
    manager: ckpt_lib.Checkpointer,
    log: metrics_lib.MetricsLog,
    board: Any,
    memory: dict[str, Any],
    identity: dict[str, Any],
    commit: Any,
) -> dict[str, Any]:
    """The round loop, the final evaluation and ``summary.json`` (see :func:`train_and_evaluate`)."""
    config = exp.config
    workdir = os.path.dirname(manager.directory)
    primary = multihost.is_primary()
    progress = reporting.Progress(start, config.rounds, disable=not primary)
    logging.info(
        "method=%s model=%s data=%s: %d trainable tensors in %d units, %d clients/round, "
        "%d local steps",
        config.method,
        config.model.name,
        config.data.name,
        len(exp.model.order),
        exp.spec.units.num_units,
        config.clients_per_round,
        exp.num_steps,
    )
    frozen = exp.replicate(exp.model.frozen)
    wall0 = time.time()
    # Rounds dispatched to the device whose metrics the host has not read back yet.
    pending: list[_Dispatched] = []
    ahead = (
        prepare_round(exp, start, _is_eval_round(config, start)) if start < config.rounds else None
    )
    for r in range(start, config.rounds):
        t0 = time.time()
        evaluate = _is_eval_round(config, r)
        new_state, m = dispatch_round(exp, state, frozen, evaluate, ahead)
        # The guard stays on the device until a read-back point; meanwhile the host packs the
        # next round's arrays while the device runs this one.
        finite = _round_is_finite(m["train/loss"], new_state.params)
        if r + 1 < config.rounds:
            ahead = prepare_round(exp, r + 1, _is_eval_round(config, r + 1))
        evaluation = round_evaluation(exp, state, frozen, m) if evaluate else {}
        pending.append(_Dispatched(r, t0, m, finite, evaluation))
        state = new_state
        last = r == config.rounds - 1
        save = _is_checkpoint_round(config, r)
        if evaluate or save or last or (r + 1 - start) % config.log_every == 0:
            for record in _read_back(exp, pending, manager.directory, wall0, memory):
                log.append(record)
                commit()
                board.write(record)
                progress.update(record)
                logging.info("round %d: %s", record["round"], metrics_lib.brief(record))
            pending = []
        if save:  # only after its rounds were read back and found finite
            manager.save(r + 1, state, identity)
    manager.close()
    # Every figure in summary.json's "final" is of the final global model (after all rounds).
    final = evaluate_final(exp, state, frozen)
    if config.eval_all_clients:
        final.update(exp.evaluator.all_clients(state.params, frozen))
    final.update(exp.evaluator.heldout(state.params, frozen))
    done = int(state.round)
    # TensorBoard step r of an eval scalar is the model after r rounds, so the final model is r=R.
    board.write({"round": done, **final})
    logging.info("final model, after %d rounds: %s", done, metrics_lib.brief(final))
    if config.data.val_fraction > 0 and config.rounds > 0:
        val = exp.evaluator.all_clients(state.params, frozen, split="val")
        final.update(val)
        board.write({"round": done, **val})
        logging.info("final model, after %d rounds: %s", done, metrics_lib.brief(val))
    board.close()
    progress.close()
    if log.records and primary:
        reporting.plot_run(
            log.records,
            os.path.join(workdir, "curves.png"),
            f"{config.method} / {config.model.name} / {config.data.name}",
        )
    summary = {
        "rounds": config.rounds,
        "method": config.method,
        "final": final,
        "train/loss": log.last("train/loss"),
        "time/total_s": log.total("time/round_s"),
        "comm/up_bytes": log.total("comm/up_bytes"),
        "comm/down_bytes": log.total("comm/down_bytes"),
        **{f"memory/client_step_{k}": v for k, v in memory.items()},
    }
    if not primary:
        return summary
    return _write_summary(os.path.join(workdir, "summary.json"), summary)
