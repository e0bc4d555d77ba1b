"""Orbax checkpoints of the server state, with an identity check on restore.

A checkpoint holds the trainable weights, the server optimizer state, the round, the RNG key
and the last aggregated update (FwdLLM+'s guide), plus an identity record (method, model name
and fingerprint, PEFT, data fingerprint, seed); the frozen base weights are not copied. Orbax writes each step to a temporary directory and
renames it when complete, so a process killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from spry_jax.core.round import ServerState

FAULT_ENV = "SPRY_JAX_FAULT"


def _inject_fault(point: str, step: int) -> None:
    """Fault injection for the crash-safety tests: ``SPRY_JAX_FAULT=during_checkpoint:2`` kills
    the process with SIGKILL while checkpoint 2 is being written (``after_checkpoint`` once it is
    complete). Unset in normal runs."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir belongs to a different experiment."""


def _as_dict(state: ServerState) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "round": state.round,
        "rng": state.rng,
        "last_delta": state.last_delta,
    }


class Checkpointer:
    """Saves and restores :class:`ServerState` under ``directory``."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: ServerState, identity: dict[str, Any]) -> None:
        """Saves after ``step`` completed rounds and waits until it is on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_dict(state)),
                identity=ocp.args.JsonSave(identity),
            ),
        )
        _inject_fault("during_checkpoint", step)
        self._manager.wait_until_finished()
        _inject_fault("after_checkpoint", step)

    def steps(self) -> list[int]:
        """The saved steps (completed rounds), oldest first."""
        return sorted(self._manager.all_steps())

    def restore_latest(
        self, template: ServerState, identity: dict[str, Any], step: int | None = None
    ) -> tuple[ServerState, int] | None:
        """Restores the newest checkpoint (or the one after ``step`` rounds), or None if there
        is none.

        Raises:
          CheckpointMismatchError: the checkpoint's identity differs from ``identity``.
          ValueError: ``step`` was given but is not saved.
        """
        if step is not None and step not in self.steps():
            raise ValueError(
                f"no checkpoint after {step} rounds in {self.directory}; saved: {self.steps()}"
            )
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        saved = self._manager.restore(
            step, args=ocp.args.Composite(identity=ocp.args.JsonRestore())
        )
        found = dict(saved["identity"])
        diffs = {k: (found.get(k), v) for k, v in identity.items() if found.get(k) != v}
        if diffs:
            detail = "; ".join(
                f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diffs.items()
            )
            raise CheckpointMismatchError(
                f"The checkpoint in {self.directory} is from a different experiment ({detail}). "
                "Use a new --workdir, or delete that checkpoints directory to start over."
            )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), _as_dict(template)
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        opt_state = jax.tree.unflatten(
            jax.tree.structure(template.opt_state), jax.tree.leaves(restored["opt_state"])
        )
        state = ServerState(
            params=restored["params"],
            opt_state=opt_state,
            round=restored["round"],
            rng=restored["rng"],
            last_delta=restored["last_delta"],
        )
        return state, int(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
