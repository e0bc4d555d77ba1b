"""Units of trainable weights and their assignment to the clients of a round
(Spry's weight splitting, Panchal et al., NeurIPS 2024, arXiv 2405.15551; the release's ``trainable_keys_mapping`` in
``trainers/server_spry.py``).

A *unit* is what one client slot is dealt. How the trainable tensors (``SplitModel.order``, model
order) are grouped into units depends on the PEFT method, as in the PyTorch release:

* ``lora``: ``tensors_per_unit`` consecutive tensors of ONE adapted module (the release's
  ``per_client_layer_count``; default 2 = that module's (A, B) pair, 1 = A and B apart). A unit
  never holds tensors of two modules, so values above 2 are refused.
* ``ia3`` and ``bitfit``: one tensor per unit, whatever ``tensors_per_unit`` says (the release
  deals them out one by one).
* The task head is one unit of its own, last, in every method (``head``: the only unit). It is
  never split over units nor mixed with body tensors. The release keeps the head whole when it
  shares it (``classifier_share``: the last 2 tensors for BERT/ALBERT, 4 for DistilBERT's
  pre_classifier + classifier and RoBERTa's dense + out_proj); unshared, it chunks the head
  like the body, which puts DistilBERT's two head layers on different clients (LoRA) or deals
  single head tensors (IA3). A two-layer head trained half by one client and half by another
  is not the model either client estimates a gradient for, so we keep it whole.

Each round, the M participating clients take *slots* in a random order and units are dealt to
slots:

* M <= G (G units): unit g goes to slot ``g mod M``; every unit is trained by exactly one client.
* M > G: slot m trains unit ``m mod G``; each unit is shared by floor(M/G) or ceil(M/G) clients
  and averaged over them (the PyTorch release crashes here).
* ``classifier_share``: the task head is removed from the units and trained by every client.

Per-client weight subsets are *masks*: one 0/1 scalar per (client, trainable leaf), so every
client has the same shapes and ``vmap`` applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spry_jax.types import Trainable


@dataclasses.dataclass(frozen=True)
class Units:
    """How the trainable leaves are grouped.

    Attributes:
      keys: the trainable keys in model order.
      unit_of_key: unit index of each key; -1 for keys every client trains (shared head).
      num_units: G, the number of units dealt out.
    """

    keys: tuple[str, ...]
    unit_of_key: dict[str, int]
    num_units: int

    def unit_members(self, g: int) -> tuple[str, ...]:
        """The keys of unit ``g`` in model order."""
        return tuple(k for k in self.keys if self.unit_of_key[k] == g)

    def members(self) -> tuple[tuple[str, ...], ...]:
        """Every unit's keys, unit 0 first (shared keys, unit -1, are not listed)."""
        return tuple(self.unit_members(g) for g in range(self.num_units))


PEFT_METHODS = ("lora", "ia3", "bitfit", "head")


def _module_of(key: str) -> str:
    """The adapted module a trainable key belongs to: its state path without the leaf name."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


def _body_chunks(body: list[str], peft_method: str, tensors_per_unit: int) -> list[list[str]]:
    """Consecutive body tensors grouped into units by the method's rule (module docstring)."""
    if peft_method in ("ia3", "bitfit"):
        return [[k] for k in body]
    if peft_method == "lora" and tensors_per_unit > 2:
        raise ValueError(
            f"split.tensors_per_unit={tensors_per_unit} would put tensors of several LoRA "
            "modules in one unit; use 2 (one module's (A, B) per unit) or 1 (A and B apart)."
        )
    chunks: list[list[str]] = []
    run: list[str] = []
    for k in body:
        if run and (_module_of(k) != _module_of(run[0]) or len(run) == tensors_per_unit):
            chunks.append(run)
            run = []
        run.append(k)
    if run:
        chunks.append(run)
    return chunks


def make_units(
    order: tuple[str, ...] | list[str],
    tensors_per_unit: int = 2,
    head_keys: tuple[str, ...] | list[str] = (),
    classifier_share: bool = False,
    *,
    peft_method: str,
) -> Units:
    """Groups trainable keys (in model order) into units, as the method deals them.

    Args:
      order: trainable keys in model order (``SplitModel.order``).
      tensors_per_unit: LoRA tensors per unit, within one module (``per_client_layer_count``
        in the release); ignored by IA3 and BitFit, which deal one tensor per unit.
      head_keys: keys of the task head; they form one unit of their own.
      classifier_share: if True the head is trained by every client and is not a unit.
      peft_method: ``SplitModel.peft_method`` ("lora", "ia3", "bitfit" or "head").

    Returns:
      The :class:`Units`.
    """
    if tensors_per_unit < 1:
        raise ValueError(
            f"split.tensors_per_unit must be >= 1, got {tensors_per_unit}; "
            "use 2 for one LoRA (A, B) pair per unit."
        )
    if peft_method not in PEFT_METHODS:
        raise ValueError(f"peft.method={peft_method!r} is unknown; use one of {PEFT_METHODS}.")
    order = tuple(order)
    if len(set(order)) != len(order):
        raise ValueError("SplitModel.order lists a trainable key twice.")
    unknown = set(head_keys) - set(order)
    if unknown:
        raise ValueError(f"head_keys not in the trainable order: {sorted(unknown)}")
    head = [k for k in order if k in set(head_keys)]
    body = [k for k in order if k not in set(head_keys)]
    if peft_method == "head" and body:
        raise ValueError(f"peft.method='head' but non-head keys are trainable: {body[:3]}")
    chunks = _body_chunks(body, peft_method, tensors_per_unit)
    if head and not classifier_share:
        chunks.append(head)
    unit_of_key = {k: -1 for k in order}
    for g, chunk in enumerate(chunks):
        for k in chunk:
            unit_of_key[k] = g
    if not chunks:
        raise ValueError("No trainable tensors to split into units (is the PEFT method empty?).")
    return Units(keys=order, unit_of_key=unit_of_key, num_units=len(chunks))


def slot_table(num_clients: int, num_units: int) -> np.ndarray:
    """The static slot -> unit table, ``[M, G]`` of 0/1 (the module docstring's two cases)."""
    if num_clients < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {num_clients}")
    table = np.zeros((num_clients, num_units), np.float32)
    if num_clients <= num_units:
        for g in range(num_units):
            table[g % num_clients, g] = 1.0
    else:
        for m in range(num_clients):
            table[m, m % num_units] = 1.0
    return table


def assign_units(
    key: jax.Array, num_clients: int, num_units: int, num_slots: int | None = None
) -> jax.Array:
    """Deals units to the clients of one round, shuffling the slot order with ``key``.

    Args:
      key: PRNG key of the round; the same key gives the same assignment.
      num_clients: M, the real clients of the round.
      num_units: G.
      num_slots: total rows (>= M) so the result can be padded for sharding; padded rows are 0.

    Returns:
      float32 ``[num_slots, G]``: row c is 1 on the units client c trains.
    """
    num_slots = num_clients if num_slots is None else num_slots
    table = jnp.asarray(slot_table(num_clients, num_units))
    perm = jax.random.permutation(key, num_clients)
    assign = table[perm]
    return jnp.pad(assign, ((0, num_slots - num_clients), (0, 0)))


def unit_masks(units: Units, assignment: jax.Array) -> Trainable:
    """Per-leaf client masks from a ``[M, G]`` assignment: ``{key: float32 [M]}``.

    Shared keys (unit -1) are 1 for every real client (rows with any unit assigned).
    """
    real = (jnp.sum(assignment, axis=1) > 0).astype(jnp.float32)
    masks = {}
    for k in units.keys:
        g = units.unit_of_key[k]
        masks[k] = real if g < 0 else assignment[:, g]
    return masks


def full_masks(units: Units, num_clients: int, num_slots: int | None = None) -> Trainable:
    """Masks for methods without a split: every real client trains every leaf."""
    num_slots = num_clients if num_slots is None else num_slots
    real = jnp.concatenate([jnp.ones(num_clients), jnp.zeros(num_slots - num_clients)])
    return {k: real for k in units.keys}


def tangent_sets(
    units: Units, num_clients: int, layer_of: Callable[[str], int | None]
) -> tuple[tuple[str, ...], ...]:
    """The static leaf sets a slot's jvp can be restricted to (``round.static_tangents``).

    The slot table (:func:`slot_table`) fixes each slot's units for the run; only the clients
    are shuffled over the slots. A slot's tangent pass starts at its lowest leaf in model order,
    so the useful static set of a slot is every leaf from the first leaf of that leaf's layer
    (``layer_of``; a leaf with no layer starts its own) to the top. Slots whose lowest leaf is
    in the same layer share one set, which bounds the sets by the layers (each set is one more
    branch of the compiled step). Returns the distinct sets, smallest first, each in model order.
    """
    order = units.keys
    start: dict[str, int] = {}  # per leaf: the position of the first leaf of its layer
    first_of_layer: dict[int, int] = {}
    for i, k in enumerate(order):
        layer = layer_of(k)
        start[k] = i if layer is None else first_of_layer.setdefault(layer, i)
    shared = [k for k in order if units.unit_of_key[k] < 0]
    cuts = set()
    for row in slot_table(num_clients, units.num_units):
        keys = [k for g in np.flatnonzero(row) for k in units.unit_members(int(g))] + shared
        if keys:
            cuts.add(min(start[k] for k in keys))
    return tuple(order[p:] for p in sorted(cuts, reverse=True))
