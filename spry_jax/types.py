"""Types shared across the package boundary: model parts and packed client batches.

These are the only things the round program knows about models and data:

* A model is reduced to :class:`SplitModel` -- a pure ``apply_fn`` plus a flat dict of
  trainable arrays (the PEFT weights and the task head) and an opaque frozen pytree.
* Data for a round is a dict of arrays with a leading ``[clients, steps, batch]`` prefix
  (see :data:`BATCH_KEYS`), plus ``step_mask`` ``[clients, steps]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax

Array = jax.Array
PyTree = Any
Trainable = dict[str, Array]  # flat "path/to/leaf" -> array
Batch = dict[str, Array]


class ApplyFn(Protocol):
    def __call__(
        self,
        trainable: Trainable,
        frozen: PyTree,
        input_ids: Array,
        attention_mask: Array,
        dropout_rng: Array | None = None,
        token_type_ids: Array | None = None,
    ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model split at the functional boundary.

    Attributes:
      apply_fn: pure ``(trainable, frozen, input_ids, attention_mask, dropout_rng,
        token_type_ids=None) -> logits``; ``dropout_rng=None`` means deterministic
        (evaluation); ``token_type_ids`` (segment ids of text pairs) is optional and callers
        pass it only when the batch has it, so an ``apply_fn`` without it still works.
      trainable: flat dict of the trainable leaves (PEFT weights and task head).
      frozen: everything else (the frozen base), any pytree.
      order: the keys of ``trainable`` in model order (layer index numerically, attention
        before MLP, query before value, LoRA A before B, task head last). Units are
        consecutive chunks of this order.
      head_keys: the keys of the task head (a subset of ``order``), used by
        ``classifier_share``.
      task: "classification", "qa" or "causal_lm".
      num_labels: number of classes for classification.
      peft_method: the PEFT method that chose ``trainable`` ("lora", "ia3", "bitfit" or
        "head"); units deal its tensors by it (:func:`spry_jax.core.units.make_units`).
    """

    apply_fn: Callable[..., Array]
    trainable: Trainable
    frozen: PyTree
    order: tuple[str, ...]
    head_keys: tuple[str, ...]
    task: str = "classification"
    num_labels: int = 2
    peft_method: str = "lora"


# Keys of a packed batch. Every leaf has a leading [clients, steps, batch] prefix in a round.
#   input_ids       int32 [..., seq]
#   attention_mask  int32 [..., seq]   1 = real token
#   token_type_ids  int32 [..., seq]   optional: segment ids of text pairs (absent = all 0)
#   labels          int32 [...]        classification label (or [..., seq] for causal_lm, -100 = ignore)
#   start_positions int32 [...]        QA only
#   end_positions   int32 [...]        QA only
#   example_mask    float32 [...]      1 = real example, 0 = padding example
# and, outside the per-example leaves:
#   step_mask       float32 [clients, steps]  1 = a real local step
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "start_positions",
    "end_positions",
    "example_mask",
)

# The round program's backends and communication modes (``round.backend``, ``comm_mode``):
# declared here, beside the other shared vocabulary, so the config can check a name before any
# work without importing the round program.
BACKENDS = ("shard_map", "vmap", "loop", "debug")
COMM_MODES = ("per_epoch", "per_iteration")
