"""Orbax checkpoints of the server state, with an identity check on restore.

A checkpoint holds the trainable weights, the server optimizer state, the round, the RNG key
and the last aggregated update (FwdLLM+'s guide), plus an identity record: every config field
that decides the trajectory and fingerprints of the frozen base and the data partition
(``spry_jax.train._identity``); the frozen base weights are not copied. Orbax writes each step
to a temporary directory and renames it when complete, so a process killed mid-write leaves the
previous checkpoint intact.
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


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and -- for a ``jax.Array`` -- sharding of a template leaf: restored leaves are
    placed as the template's are. Several processes: the template is replicated over the global
    mesh, and orbax needs that sharding to restore arrays no single process holds whole."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


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


def _check_identity(
    found: dict[str, Any],
    expected: dict[str, Any],
    directory: str,
    ignore: tuple[str, ...],
    hints: dict[str, str],
) -> None:
    """Raises :class:`CheckpointMismatchError` naming every field that differs."""
    missing = [k for k in expected if k not in found and k not in ignore]
    diffs = {
        k: (found[k], v)
        for k, v in expected.items()
        if k in found and k not in ignore and found[k] != v
    }
    if not diffs and not missing:
        return
    parts = [f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diffs.items()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        parts.append(
            f"the checkpoint records no {', '.join(missing[:5])}{more} (it was written by an "
            "older spry_jax)"
        )
    notes = "".join(f" {hints[k]}" for k in diffs if k in hints)
    raise CheckpointMismatchError(
        f"The checkpoint in {directory} is from a different experiment ({'; '.join(parts)}).{notes}"
        " Use a new --workdir for the changed experiment (or delete that checkpoints directory to "
        "start over)."
    )


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
        self,
        template: ServerState,
        identity: dict[str, Any],
        step: int | None = None,
        ignore: tuple[str, ...] = (),
        hints: dict[str, str] | None = None,
    ) -> tuple[ServerState, int] | None:
        """Restores the newest checkpoint (or the one after ``step`` rounds), or None if there
        is none.

        Args:
          template: a state of the right structure (shapes and dtypes are read from it).
          identity: ``{field: value}`` the checkpoint's identity must match (JSON values).
          step: completed rounds of the checkpoint to restore; None = the newest.
          ignore: identity fields allowed to differ.
          hints: per field, a sentence appended to the refusal when that field differs.

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
        _check_identity(dict(saved["identity"]), identity, self.directory, ignore, hints or {})
        abstract = jax.tree.map(_abstract, _as_dict(template))
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
