"""Evaluation as a stage: one evaluator per task, used by the round, the final all-clients and
held-out evaluations and ``scripts/eval_checkpoints.py``.

An :class:`Evaluator` scores trainable weights on per-client tables of examples (the federated
data's ``test``, ``val`` or ``heldout`` arrays) and returns flat records keyed
``eval/{scope}_{metric}`` (:func:`spry_jax.metrics.eval_key`; the scopes and metrics per task
are declared once in :mod:`spry_jax.metrics`):

* :class:`ClassificationEvaluator` -- accuracy and mean cross-entropy from per-batch sums
  (``correct``, ``count``, ``loss_sum``). The same jitted sums run inside the round program
  (``RoundSpec.eval_fn``: the paper's generalized and personalized accuracy of the round's
  sampled clients, Panchal et al., NeurIPS 2024, evaluation setup) and on the host, batch by
  batch, over the union of every client's split; host scopes also report the majority class
  of the same examples, the control an accuracy is read against.
* :class:`QAEvaluator` -- SQuAD v2 exact match and F1 (percent): start/end logits on the
  device, the standard n-best span post-processing on the host (:func:`spry_jax.data.qa.
  postprocess_qa`), over the union of the clients' examples; personalized figures score each
  client with its own model, the global weights plus its delta from the round.

:func:`make_evaluator` picks the evaluator of a federated dataset's task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spry_jax import data as data_lib
from spry_jax import metrics as metrics_lib
from spry_jax import tasks
from spry_jax.metrics import eval_key
from spry_jax.types import Array, Batch, PyTree, SplitModel, Trainable

Tables = Sequence[dict[str, np.ndarray]]


class Evaluator:
    """Scores a model on tables of examples; one subclass per task.

    Attributes:
      task: the task it evaluates.
      batch_sums: ``batch_sums(trainable, frozen, batch) -> {name: sum}`` for the round program
        to sum over the sampled clients' test batches (``RoundSpec.eval_fn``), or None where the
        round's evaluation runs on the host (:meth:`round`).
    """

    task: str
    batch_sums: Callable[[Trainable, PyTree, Batch], dict[str, Array]] | None = None

    def __init__(self, model: SplitModel, fed: Any, batch_size: int):
        self.model = model
        self.fed = fed
        self.batch_size = batch_size

    def score(
        self,
        params: Trainable,
        frozen: PyTree,
        tables: Tables,
        scope: str,
        client_deltas: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """``eval/{scope}_*`` of ``params`` on the union of ``tables`` (one per client);
        ``client_deltas`` (``{leaf: [len(tables), ...]}``) scores table ``i`` with
        ``params + delta[i]``."""
        raise NotImplementedError

    def round(
        self,
        round_metrics: dict[str, Any],
        params: Trainable,
        frozen: PyTree,
        clients: np.ndarray,
    ) -> dict[str, float]:
        """A round's evaluation of the model it starts from, ``params``: generalized (that model
        on the sampled ``clients``' test splits) and personalized (each client's model after
        its local training) from the round's outputs ``round_metrics``."""
        raise NotImplementedError

    def all_clients(self, params: Trainable, frozen: PyTree, split: str = "test") -> dict:
        """The global model on the union of every client's local test split
        (``eval/all_clients_*``), or with ``split="val"`` of every client's validation split
        (``eval/all_clients_val_*``).

        The per-round generalized figure averages only the round's sampled clients (a few
        hundred examples with that sample's label mix under a Dirichlet split); this is the
        fixed, full test set, so runs and methods can be compared without that sampling noise.
        The validation figure is what a study chooses hyper-parameters on, so that choice never
        sees the test split.
        """
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        scope = metrics_lib.ALL_CLIENTS if split == "test" else metrics_lib.ALL_CLIENTS_VAL
        return self.score(params, frozen, getattr(self.fed, split), scope)

    def heldout(self, params: Trainable, frozen: PyTree) -> dict[str, float]:
        """The global model on the dataset's global held-out set (``data.heldout``, or a local
        file's split column): ``eval/heldout_*``; ``{}`` when there is none."""
        if self.fed.heldout is None:
            return {}
        return self.score(params, frozen, [self.fed.heldout], metrics_lib.HELDOUT)


def classification_batch_sums(model: SplitModel):
    """``batch_sums(trainable, frozen, batch) -> {"correct", "count", "loss_sum"}``, summed over
    the batch's real examples (``example_mask``); deterministic (no dropout)."""

    def batch_sums(trainable: Trainable, frozen: PyTree, batch: Batch) -> dict[str, Array]:
        logits = tasks.apply_batch(model, trainable, frozen, batch, None).astype(jnp.float32)
        m = batch["example_mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        pred = jnp.argmax(logits, axis=-1)
        return {
            "correct": jnp.sum((pred == batch["labels"]) * m),
            "count": jnp.sum(m),
            "loss_sum": jnp.sum(ce * m),
        }

    return batch_sums


def classification_record(sums: dict[str, Any], scope: str) -> dict[str, float]:
    """Accuracy and mean loss of ``scope`` from summed ``correct``/``count``/``loss_sum``."""
    sums = {k: float(v) for k, v in sums.items()}
    count = max(sums["count"], 1.0)
    return {
        eval_key(scope, "accuracy"): sums["correct"] / count,
        eval_key(scope, "loss"): sums["loss_sum"] / count,
    }


class ClassificationEvaluator(Evaluator):
    """Accuracy and loss from in-program sums (see the module docstring)."""

    task = "classification"

    def __init__(self, model: SplitModel, fed: Any, batch_size: int):
        super().__init__(model, fed, batch_size)
        self.batch_sums = jax.jit(classification_batch_sums(model))

    def round(self, round_metrics, params, frozen, clients) -> dict[str, float]:
        del params, frozen, clients  # summed inside the round program
        sums = round_metrics["eval"]
        out = {}
        for scope in metrics_lib.ROUND_SCOPES:
            out.update(classification_record(sums[scope], scope))
        out[metrics_lib.ROUND_EXAMPLES] = float(sums[metrics_lib.GENERALIZED]["count"])
        return out

    def score(self, params, frozen, tables, scope, client_deltas=None) -> dict[str, float]:
        if client_deltas is not None:
            raise ValueError("classification scores per-client models inside the round")
        union = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
        packed = data_lib.pack_eval([union], batch_size=self.batch_size)
        keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_mask")
        keys = [k for k in keys if k in packed]  # token_type_ids: text pairs only
        sums = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
        for step in range(packed["example_mask"].shape[1]):
            out = self.batch_sums(params, frozen, {k: packed[k][0, step] for k in keys})
            for k, v in out.items():
                sums[k] += float(v)
        labels = np.asarray(union["labels"]).reshape(-1)
        majority = float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
        return {
            **classification_record(sums, scope),
            eval_key(scope, metrics_lib.EXAMPLES): sums["count"],
            eval_key(scope, metrics_lib.MAJORITY): majority,
        }


class QAEvaluator(Evaluator):
    """SQuAD v2 exact match / F1 with host-side n-best post-processing."""

    task = "qa"

    def __init__(self, model: SplitModel, fed: Any, batch_size: int):
        super().__init__(model, fed, batch_size)
        self._logits = jax.jit(
            lambda p, frozen, batch: tasks.apply_batch(model, p, frozen, batch, None)
        )

    def round(self, round_metrics, params, frozen, clients) -> dict[str, float]:
        tables = [self.fed.test[c] for c in clients]
        deltas = round_metrics["client_deltas"]
        generalized = self.score(params, frozen, tables, metrics_lib.GENERALIZED)
        personalized = self.score(params, frozen, tables, metrics_lib.PERSONALIZED, deltas)
        out = {**generalized, **personalized}
        out[metrics_lib.ROUND_EXAMPLES] = out.pop(
            eval_key(metrics_lib.GENERALIZED, metrics_lib.EXAMPLES)
        )
        del out[eval_key(metrics_lib.PERSONALIZED, metrics_lib.EXAMPLES)]
        return out

    def score(self, params, frozen, tables, scope, client_deltas=None) -> dict[str, float]:
        bs = self.batch_size
        ds = self.fed.dataset
        keys = ("input_ids", "attention_mask", "token_type_ids")
        preds: dict[int, str] = {}
        for slot, t in enumerate(tables):
            n = len(t["input_ids"])
            if n == 0:
                continue
            p = params
            if client_deltas is not None:
                p = {k: np.asarray(params[k]) + np.asarray(client_deltas[k][slot]) for k in params}
            logits = []
            for i in range(0, n, bs):
                batch = {k: t[k][i : i + bs] for k in keys if k in t}
                pad = bs - len(batch["input_ids"])
                batch = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}
                logits.append(np.asarray(self._logits(p, frozen, batch))[: bs - pad])
            logits = np.concatenate(logits)
            preds.update(
                data_lib.postprocess_qa(
                    logits[..., 0], logits[..., 1], t["offsets"], t["example_index"], ds.text_pairs
                )
            )
        refs = {ex: list(ds.answers[ex]["text"]) for ex in preds}
        scores = data_lib.squad_v2_metrics(preds, refs)
        return {
            eval_key(scope, "exact_match"): float(scores["exact"]),
            eval_key(scope, "f1"): float(scores["f1"]),
            eval_key(scope, metrics_lib.EXAMPLES): float(len(preds)),
        }


EVALUATORS: dict[str, type[Evaluator]] = {
    "classification": ClassificationEvaluator,
    "qa": QAEvaluator,
}


def make_evaluator(model: SplitModel, fed: Any, batch_size: int) -> Evaluator:
    """The evaluator of ``fed.task`` for ``model``'s weights, ``batch_size`` examples a batch
    (``eval_batch_size``)."""
    if fed.task not in EVALUATORS:
        raise ValueError(f"no evaluator for task {fed.task!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[fed.task](model, fed, batch_size)
