"""``train_and_evaluate(config, workdir)``: the one round loop.

restore -> sample clients -> pack -> round (one XLA program) -> log -> evaluate -> checkpoint,
then the final evaluation of the final global model (:func:`evaluate_final`).
It never branches on dataset, model or method names: those are resolved by the data registry,
the model registry and the algorithm table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spry_jax import checkpoint as ckpt_lib
from spry_jax import config as config_lib
from spry_jax import data as data_lib
from spry_jax import memory as memory_lib
from spry_jax import methods, models, multihost, reporting, tasks
from spry_jax import metrics as metrics_lib
from spry_jax.core import round as round_lib
from spry_jax.core import units as units_lib
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
    fed = data_lib.make_federated_data(
        config.data,
        num_clients=config.num_clients,
        tokenizer=_load_tokenizer(config),
        seed=config.seed,
    )
    model = models.make_split_model(
        config.model, config.peft, task=fed.task, num_labels=fed.num_labels, seed=config.seed
    )
    parts = methods.build_round_parts(config, model.head_keys, tuple(model.trainable))
    units = units_lib.make_units(
        model.order,
        config.split.tensors_per_unit,
        model.head_keys,
        config.split.classifier_share,
        peft_method=model.peft_method,
    )
    backend = config.round.backend
    mesh = None
    num_slots = config.clients_per_round
    if backend == "shard_map":
        mesh = round_lib.make_client_mesh(config.round.num_devices or None)
        num_slots = round_lib.padded_slots(num_slots, mesh.shape[round_lib.CLIENT_AXIS])
    spec = round_lib.RoundSpec(
        loss_fn=tasks.make_loss_fn(model),
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
        eval_fn=tasks.make_eval_fn(model) if fed.task == "classification" else None,
        per_iteration_round_optimizer=parts.per_iteration_round_optimizer,
    )
    b = config.client.batch_size
    max_train = max(len(t["input_ids"]) for t in fed.train)
    num_steps = config.client.epochs * math.ceil(max_train / b)
    caps = [s for s in (config.client.max_steps, parts.max_steps) if s]
    if caps:
        num_steps = min([num_steps, *caps])
    max_test = max(len(t["input_ids"]) for t in fed.test)
    eval_steps = max(1, math.ceil(max_test / config.eval_batch_size))
    return Experiment(
        config, fed, model, spec, round_lib.make_round_fn(spec), num_steps, eval_steps
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
    "eval_batch_size",
    "eval_all_clients",
    "log_memory",
    "round",
    "report",
    "resume_allow_schedule_change",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"server.optimizer": ..., ...}`` from a (nested) ConfigDict or dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    return manager.restore_latest(template, _identity(exp), ignore=ignore, hints={"rounds": hint})


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


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _is_eval_round(config: ml_collections.ConfigDict, r: int) -> bool:
    last = r == config.rounds - 1
    return last or (config.eval_every > 0 and (r + 1) % config.eval_every == 0)


def _is_checkpoint_round(config: ml_collections.ConfigDict, r: int) -> bool:
    last = r == config.rounds - 1
    return last or (config.checkpoint_every > 0 and (r + 1) % config.checkpoint_every == 0)


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
      (REFERENCE.md §2 "Evaluation"). Classification in the round program; QA (SQuAD v2 exact
      match / F1) on the host, the personalized figures from the round's per-client deltas.
    """
    r = int(state.round)
    clients = exp.sample_clients(r)
    batches = exp.round_batches(r, clients)
    in_program = evaluate and exp.spec.eval_fn is not None
    qa = evaluate and exp.fed.task == "qa"
    eval_batches = exp.eval_batches(clients) if in_program else None
    # Per-client deltas only on QA eval rounds: num_slots copies of the trainable weights.
    new_state, m = exp.round_fn(state, frozen, batches, None, eval_batches, client_deltas=qa)
    evaluation: dict[str, float] = {}
    if in_program:
        evaluation = _eval_record(m)
    elif qa:
        evaluation = {
            **evaluate_qa(exp, state.params, frozen, clients),
            **evaluate_qa(exp, state.params, frozen, clients, m["client_deltas"]),
        }
    if evaluation:
        evaluation["eval/model_after_rounds"] = r
    return new_state, m, evaluation


def evaluate_final(exp: Experiment, state: round_lib.ServerState, frozen: Any) -> dict[str, float]:
    """The evaluation of the final global model ``state.params``: what round ``state.round``
    (the next one, were the run extended) reports at its start -- generalized on its sampled
    clients, personalized after their local training -- computed by that round's program with
    its update discarded. So ``eval/model_after_rounds`` = the rounds run, and an extended run
    that evaluates that round records these figures again. ``{}`` for a task without a
    per-round evaluation (causal LM)."""
    if exp.spec.eval_fn is None and exp.fed.task != "qa":
        return {}
    return run_round(exp, state, frozen, evaluate=True)[2]


def _eval_record(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name in ("generalized", "personalized"):
        sums = {k: float(v) for k, v in metrics["eval"][name].items()}
        count = max(sums["count"], 1.0)
        out[f"eval/{name}_accuracy"] = sums["correct"] / count
        out[f"eval/{name}_loss"] = sums["loss_sum"] / count
    out["eval/examples"] = float(metrics["eval"]["generalized"]["count"])
    return out


def evaluate_all_clients(
    exp: Experiment, params: Any, frozen: Any, split: str = "test"
) -> dict[str, float]:
    """The global model on the union of every client's local test split (``eval/all_clients_*``),
    or with ``split="val"`` of every client's validation split (``eval/all_clients_val_*``).

    The per-round generalized figure averages only the round's sampled clients (a few hundred
    examples with that sample's label mix under a Dirichlet split); this is the fixed, full test
    set, so runs and methods can be compared without that sampling noise. The validation figure
    is what a study chooses hyper-parameters on, so that choice never sees the test split.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    prefix = "eval/all_clients_" if split == "test" else "eval/all_clients_val_"
    data = getattr(exp.fed, split)
    clients = np.arange(exp.config.num_clients)
    if exp.fed.task == "qa":
        out = evaluate_qa(exp, params, frozen, clients, split=split)
        return {
            f"{prefix}exact_match": out["eval/generalized_exact_match"],
            f"{prefix}f1": out["eval/generalized_f1"],
            f"{prefix}examples": out["eval/examples"],
        }
    eval_fn = tasks.make_eval_fn(exp.model)
    union = {k: np.concatenate([data[c][k] for c in clients]) for k in data[0]}
    packed = data_lib.pack_eval([union], batch_size=exp.config.eval_batch_size)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_mask")
    keys = [k for k in keys if k in packed]  # token_type_ids: text pairs only
    sums = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
    for step in range(packed["example_mask"].shape[1]):
        out = eval_fn(params, frozen, {k: packed[k][0, step] for k in keys})
        for k, v in out.items():
            sums[k] += float(v)
    count = max(sums["count"], 1.0)
    # The control every accuracy stands beside: always predicting the split's commonest label.
    labels = np.asarray(union["labels"]).reshape(-1)
    majority = float(np.bincount(labels).max() / max(len(labels), 1)) if len(labels) else 0.0
    return {
        f"{prefix}accuracy": sums["correct"] / count,
        f"{prefix}loss": sums["loss_sum"] / count,
        f"{prefix}examples": sums["count"],
        f"{prefix}majority_accuracy": majority,
    }


def evaluate_qa(
    exp: Experiment,
    params: Any,
    frozen: Any,
    clients: np.ndarray,
    client_deltas: dict[str, Any] | None = None,
    split: str = "test",
) -> dict[str, float]:
    """SQuAD v2 exact match / F1 (percent) on the clients' local test (or ``split="val"``:
    validation) features, with the standard n-best post-processing (host side), over the union
    of their examples.

    Args:
      params: the global trainable weights.
      clients: the clients whose splits are scored.
      client_deltas: None: score ``params`` (``eval/generalized_*``). Else
        ``{leaf: [num_slots, ...]}`` from ``round_fn(..., client_deltas=True)`` with slot ``i``
        = ``clients[i]``: client ``clients[i]`` is scored with its own model
        ``params + delta[i]`` (``eval/personalized_*``).
      split: ``"test"`` or ``"val"``.
    """
    apply = jax.jit(lambda p, ids, m: exp.model.apply_fn(p, frozen, ids, m, None))
    bs = exp.config.eval_batch_size
    ds = exp.fed.dataset
    name = "generalized" if client_deltas is None else "personalized"
    preds: dict[int, str] = {}
    for slot, c in enumerate(clients):
        t = getattr(exp.fed, split)[c]
        n = len(t["input_ids"])
        if n == 0:
            continue
        p = params
        if client_deltas is not None:
            p = {k: np.asarray(params[k]) + np.asarray(client_deltas[k][slot]) for k in params}
        logits = []
        for i in range(0, n, bs):
            ids, m = t["input_ids"][i : i + bs], t["attention_mask"][i : i + bs]
            pad = bs - len(ids)
            out = apply(p, np.pad(ids, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0))))
            logits.append(np.asarray(out)[: len(ids)])
        logits = np.concatenate(logits)
        preds.update(
            data_lib.postprocess_qa(
                logits[..., 0], logits[..., 1], t["offsets"], t["example_index"], ds.text_pairs
            )
        )
    refs = {ex: list(ds.answers[ex]["text"]) for ex in preds}
    scores = data_lib.squad_v2_metrics(preds, refs)
    return {
        f"eval/{name}_exact_match": float(scores["exact"]),
        f"eval/{name}_f1": float(scores["f1"]),
        "eval/examples": float(len(preds)),
    }


def client_step_memory(exp: Experiment) -> dict[str, int | float]:
    """XLA memory estimate and FLOP count (``flops``) of one client step of this experiment
    (one batch); see :func:`spry_jax.memory.client_step_memory`."""
    b = exp.config.client.batch_size
    first = exp.fed.train[0]
    batch = {k: jnp.asarray(np.resize(v, (b, *v.shape[1:]))) for k, v in first.items()}
    batch["example_mask"] = jnp.ones((b,), jnp.float32)
    return memory_lib.client_step_memory(exp.spec, exp.model.trainable, exp.model.frozen, batch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) an experiment in ``workdir``; returns the summary.

    Writes ``config.json``, ``metrics.jsonl`` (one record per round; on eval rounds the eval
    fields are of the model that round starts from, see :func:`run_round`), ``checkpoints/``
    (orbax) and ``summary.json``, whose ``final`` is entirely of the final global model:
    :func:`evaluate_final` plus ``eval/all_clients_*``. Rerunning the same command resumes from
    the last checkpoint (refused if the experiment changed, :func:`restore`); the metrics of
    rounds after it are recomputed bit-for-bit.
    """
    config = ml_collections.ConfigDict(config)
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    t_build = time.time()
    exp = build_experiment(config)
    identity = _identity(exp)
    state = exp.init_state()
    manager = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    restored = restore(exp, manager, state)
    start = 0
    if restored is not None:
        state, start = restored
        state = exp.replicate(state)
        logging.info("Resumed from the checkpoint after round %d.", start - 1)
    # Several processes: each computes every figure (the round's outputs are replicated), only
    # the primary one writes files (spry_jax.multihost); orbax checkpoints involve all of them.
    primary = multihost.is_primary()
    if primary:
        metrics_lib.write_json_atomic(
            os.path.join(workdir, "config.json"), json.loads(config.to_json())
        )
    log = metrics_lib.MetricsLog(
        os.path.join(workdir, "metrics.jsonl"), keep_before=start, write=primary
    )
    board = reporting.TensorBoard(workdir) if primary else reporting.NoBoard()
    memory = client_step_memory(exp) if config.log_memory else {}
    progress = reporting.Progress(start, config.rounds, disable=not primary)
    logging.info(
        "method=%s model=%s data=%s: %d trainable tensors in %d units, %d clients/round, "
        "%d local steps, build %.1fs",
        config.method,
        config.model.name,
        config.data.name,
        len(exp.model.order),
        exp.spec.units.num_units,
        config.clients_per_round,
        exp.num_steps,
        time.time() - t_build,
    )
    frozen = exp.replicate(exp.model.frozen)
    wall0 = time.time()
    for r in range(start, config.rounds):
        t0 = time.time()
        new_state, m, evaluation = run_round(exp, state, frozen, _is_eval_round(config, r))
        loss = float(m["train/loss"])
        if not (math.isfinite(loss) and bool(_all_finite(new_state.params))):
            what = (
                f"train/loss is {loss}" if not math.isfinite(loss) else "the weights are not finite"
            )
            raise FloatingPointError(
                f"{what} after round {r}; stopping without saving. The last good checkpoint in "
                f"{manager.directory} is intact. Lower client.lr (or fwd.sigma) and rerun with a "
                "new --workdir (with another lr it is another experiment; this checkpoint would "
                "refuse it)."
            )
        state = new_state
        seconds = time.time() - t0
        up, down = round_lib.comm_bytes(exp.spec, exp.model.trainable, m, config.fwd.num_tangents)
        record = {
            "round": r,
            "train/loss": loss,
            "train/examples": float(m["train/examples"]),
            "train/steps": float(m["train/steps"]),  # real local steps, all clients together
            "train/examples_per_s": float(m["train/examples"]) / max(seconds, 1e-9),
            "time/round_s": seconds,
            "time/wall_s": time.time() - wall0,
            "comm/up_bytes": up,
            "comm/down_bytes": down,
        }
        for key in ("train/dropped_clients", "train/client_variance"):
            if key in m:
                record[key] = float(m[key])
        if r == 0 and memory:
            record.update({f"memory/client_step_{k}": v for k, v in memory.items()})
        record.update(evaluation)
        log.append(record)
        board.write(record)
        progress.update(record)
        logging.info("round %d: %s", r, metrics_lib.brief(record))
        if _is_checkpoint_round(config, r):
            manager.save(r + 1, state, identity)
    manager.close()
    # Every figure in summary.json's "final" is of the final global model (after all rounds).
    final = evaluate_final(exp, state, frozen)
    if config.eval_all_clients:
        final.update(evaluate_all_clients(exp, state.params, frozen))
    done = int(state.round)
    # TensorBoard step r of an eval scalar is the model after r rounds, so the final model is r=R.
    board.write({"round": done, **final})
    logging.info("final model, after %d rounds: %s", done, metrics_lib.brief(final))
    if config.data.get("val_fraction", 0.0) > 0 and config.rounds > 0:
        val = evaluate_all_clients(exp, state.params, frozen, split="val")
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
    if primary:
        metrics_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary
