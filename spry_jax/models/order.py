"""Model order, declared: the order in which an architecture lists its weights.

Spry splits the trainable weights among a round's clients (Panchal et al., "Thinking Forward:
Memory-Efficient Federated Finetuning of Language Models", NeurIPS 2024, arXiv 2405.15551,
the weight-splitting step of the method); its PyTorch release deals them out in consecutive
chunks of ``named_parameters()`` of the PEFT-wrapped transformers model
(``trainers/server_spry.py``: ``trainable_keys``, ``per_client_layer_count``). Each architecture states that
order in a :class:`ModelOrder` class attribute ``MODEL_ORDER``: the module paths before the
layer stack, the stack itself (layer index first, numerically), the sub-layer table inside
one layer, and the module paths after it (the task head last). Inside a module, each layer
class lists its variables in ``VARIABLE_ORDER`` (torch's ``weight`` then ``bias``; PEFT's
adapters after the base weights: LoRA A, LoRA B, IA3). Neither the order in which modules are
created nor the order of attribute assignments in an ``__init__`` plays any part, and a module
that holds variables but is not declared is an error, not a silent guess.

``tests/models/test_order.py`` checks every family's declared order against the release's
order (transformers' PyTorch model with PEFT's adapters) for LoRA, IA3 and BitFit.
"""

from __future__ import annotations

import dataclasses
import functools
import re

__all__ = ["ModelOrder", "variable_rank"]


@dataclasses.dataclass(frozen=True)
class ModelOrder:
    """The declared order of an architecture's modules.

    Attributes:
      before: module paths before the layer stack, in order (embeddings, ...).
      layers: the path of one layer of the stack with ``{}`` for each index, e.g.
        ``"encoder/layer/{}"`` or, for ALBERT's groups of inner layers,
        ``"encoder/albert_layer_groups/{}/albert_layers/{}"``; layers sort by their indices
        as numbers (layer 10 after layer 9).
      sublayers: module paths inside one layer, relative to it, in order.
      after: module paths after the stack, in order (final norms, the task head).
    """

    before: tuple[str, ...]
    layers: str
    sublayers: tuple[str, ...]
    after: tuple[str, ...]

    def __post_init__(self):
        for field in ("before", "sublayers", "after"):
            names = getattr(self, field)
            if len(set(names)) != len(names):
                raise ValueError(f"ModelOrder.{field} lists a module twice: {names}.")
        if "{}" not in self.layers:
            raise ValueError(f"ModelOrder.layers={self.layers!r} needs a '{{}}' per layer index.")

    @functools.cached_property
    def _layer_re(self) -> re.Pattern:
        parts = [re.escape(p) for p in self.layers.split("{}")]
        return re.compile(r"(\d+)".join(parts) + r"(?:/(.*))?")

    def module_key(self, module_path: str) -> tuple:
        """A sort key of a module path (that holds variables) in the declared order.

        Raises:
          ValueError: if the path is not declared.
        """
        if module_path in self.before:
            return (0, self.before.index(module_path))
        m = self._layer_re.fullmatch(module_path)
        if m is not None:
            *indices, rest = m.groups()
            rest = rest or ""
            if rest in self.sublayers:
                return (1, tuple(int(i) for i in indices), self.sublayers.index(rest))
        if module_path in self.after:
            return (2, self.after.index(module_path))
        raise ValueError(
            f"Module {module_path!r} holds weights but its architecture's MODEL_ORDER does not "
            f"place it (before={self.before}, layers={self.layers!r}, "
            f"sublayers={self.sublayers}, after={self.after}); add it where the PyTorch model "
            "lists it in named_parameters()."
        )


def variable_rank(module, name: str) -> int:
    """The position of variable ``name`` in its module's declared ``VARIABLE_ORDER``."""
    order = getattr(type(module), "VARIABLE_ORDER", None)
    if order is None or name not in order:
        raise ValueError(
            f"{type(module).__name__} holds the variable {name!r} but does not declare its "
            f"place: add it to {type(module).__name__}.VARIABLE_ORDER (now {order})."
        )
    return order.index(name)
