"""Units of trainable weights and their assignment to the clients of a round (REFERENCE.md §2).

A *unit* is a consecutive chunk of ``tensors_per_unit`` trainable tensors in model order
(default 2 = one LoRA module's (A, B) pair). Each round, the M participating clients take
*slots* in a random order and units are dealt to slots:

* M <= G (G units): unit g goes to slot ``g mod M``; every unit is trained by exactly one client.
* M > G: slot m trains unit ``m mod G``; each unit is shared by floor(M/G) or ceil(M/G) clients
  and averaged over them (the PyTorch release crashes here).
* ``classifier_share``: the task head is removed from the units and trained by every client.

Per-client weight subsets are *masks*: one 0/1 scalar per (client, trainable leaf), so every
client has the same shapes and ``vmap`` applies.
"""

from __future__ import annotations

import dataclasses

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
        return tuple(k for k in self.keys if self.unit_of_key[k] == g)


def make_units(
    order: tuple[str, ...] | list[str],
    tensors_per_unit: int = 2,
    head_keys: tuple[str, ...] | list[str] = (),
    classifier_share: bool = False,
) -> Units:
    """Groups trainable keys (in model order) into units.

    Args:
      order: trainable keys in model order (``SplitModel.order``).
      tensors_per_unit: consecutive tensors per unit (``per_client_layer_count`` in the release).
      head_keys: keys of the task head.
      classifier_share: if True the head is trained by every client and is not a unit.

    Returns:
      The :class:`Units`.
    """
    if tensors_per_unit < 1:
        raise ValueError(
            f"split.tensors_per_unit must be >= 1, got {tensors_per_unit}; "
            "use 2 for one LoRA (A, B) pair per unit."
        )
    order = tuple(order)
    if len(set(order)) != len(order):
        raise ValueError("SplitModel.order lists a trainable key twice.")
    unknown = set(head_keys) - set(order)
    if unknown:
        raise ValueError(f"head_keys not in the trainable order: {sorted(unknown)}")
    dealt = [k for k in order if not (classifier_share and k in head_keys)]
    unit_of_key = {k: -1 for k in order}
    for i, k in enumerate(dealt):
        unit_of_key[k] = i // tensors_per_unit
    num_units = -(-len(dealt) // tensors_per_unit)
    if num_units == 0:
        raise ValueError("No trainable tensors to split into units (is the PEFT method empty?).")
    return Units(keys=order, unit_of_key=unit_of_key, num_units=num_units)


def slot_table(num_clients: int, num_units: int) -> np.ndarray:
    """The static slot -> unit table, ``[M, G]`` of 0/1 (REFERENCE.md §2)."""
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
