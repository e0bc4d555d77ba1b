"""Orbax checkpoints of the server state, with an identity check on restore.

A checkpoint holds the trainable weights, the server optimizer state, the round, the RNG key
and the last aggregated update (FwdLLM+'s guide), plus an identity record: every config field
that decides the trajectory and fingerprints of the frozen base and the data partition
(``spry_jax.train._identity``); the frozen base weights are not copied. Orbax writes each step
to a temporary directory and renames it when complete, so a process killed mid-write leaves the
previous checkpoint intact. A step that does not restore (a truncated or bit-flipped blob, a
torn identity file) is skipped for the newest one that restores, and then moved aside to
``corrupt_checkpoints/`` next to ``checkpoints/`` with a one-line warning.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from spry_jax.core.round import ServerState
from spry_jax.errors import UserError

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


class CheckpointMismatchError(UserError):
    """The checkpoint in the workdir belongs to a different experiment."""


class CheckpointError(UserError):
    """No checkpoint in the workdir restores (every step is corrupt)."""


def _first_line(e: BaseException) -> str:
    """The most specific line of an exception chain (orbax wraps tensorstore's cause)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


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
    added_with_default: Callable[[str, Any], bool] | None = None,
) -> None:
    """Raises :class:`CheckpointMismatchError` naming every field that differs. A field the
    checkpoint does not record passes when ``added_with_default(field, value)`` (a field added
    to the code later, at the default that reproduces what the checkpoint's code did)."""
    old = added_with_default or (lambda k, v: False)
    missing = [
        k for k in expected if k not in found and k not in ignore and not old(k, expected[k])
    ]
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

    def _set_aside(self, step: int, reason: str) -> str:
        """Moves a step that does not restore out of the manager's sight (never deletes it)."""
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        logging.warning(
            "Checkpoint after %d rounds in %s does not restore (%s); moved it to %s and resumed "
            "from an earlier one.",
            step,
            self.directory,
            reason,
            target,
        )
        return target

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
        added_with_default: Callable[[str, Any], bool] | None = None,
    ) -> tuple[ServerState, int] | None:
        """Restores the newest checkpoint that restores and verifies (or the one after ``step``
        rounds), or None if there is none.

        A step whose files do not read back (truncated or corrupted blobs, a torn identity
        file) or whose state does not verify (its round is not its step, a weight is not
        finite) is skipped for the next newest; once one restores, the skipped steps are moved
        to ``corrupt_checkpoints/`` with a one-line warning each (so the rounds after it can be
        saved again). If none restores nothing is moved. A step of a different experiment is
        not corrupt: it is refused.

        Args:
          template: a state of the right structure (shapes and dtypes are read from it).
          identity: ``{field: value}`` the checkpoint's identity must match (JSON values).
          step: completed rounds of the checkpoint to restore; None = the newest.
          ignore: identity fields allowed to differ.
          hints: per field, a sentence appended to the refusal when that field differs.
          added_with_default: see :func:`_check_identity`.

        Raises:
          CheckpointMismatchError: the checkpoint's identity differs from ``identity``.
          CheckpointError: checkpoints exist but none restores (or ``step`` does not).
          ValueError: ``step`` was given but is not saved.
        """
        if step is not None and step not in self.steps():
            raise ValueError(
                f"no checkpoint after {step} rounds in {self.directory}; saved: {self.steps()}"
            )
        candidates = list(reversed(self.steps())) if step is None else [step]
        skipped: list[tuple[int, str]] = []
        for s in candidates:
            try:
                saved = self._manager.restore(
                    s, args=ocp.args.Composite(identity=ocp.args.JsonRestore())
                )
                found = dict(saved["identity"])
            except Exception as e:  # orbax/tensorstore/json raise many types for a bad file
                skipped.append((s, _first_line(e)))
                continue
            _check_identity(
                found, identity, self.directory, ignore, hints or {}, added_with_default
            )
            try:
                state = self._restore_state(s, template)
            except Exception as e:
                skipped.append((s, _first_line(e)))
                continue
            # Out of the manager's sight, so the rounds after ``s`` can be saved again.
            for bad, reason in skipped:
                self._set_aside(bad, reason)
            return state, int(s)
        if skipped:
            raise CheckpointError(
                f"No checkpoint in {self.directory} restores (step {skipped[0][0]}: "
                f"{skipped[0][1]}"
                + (f"; and steps {[b for b, _ in skipped[1:]]}" if len(skipped) > 1 else "")
                + "). Use a new --workdir, or move that checkpoints directory aside to start over "
                "in this one."
            )
        return None

    def _restore_state(self, step: int, template: ServerState) -> ServerState:
        abstract = jax.tree.map(_abstract, _as_dict(template))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        if int(restored["round"]) != step:
            raise ValueError(f"its state is of round {int(restored['round'])}, not {step}")
        for leaf in jax.tree.leaves(restored["params"]):
            if not np.all(np.isfinite(np.asarray(leaf))):
                raise ValueError("its weights are not finite")
        opt_state = jax.tree.unflatten(
            jax.tree.structure(template.opt_state), jax.tree.leaves(restored["opt_state"])
        )
        return ServerState(
            params=restored["params"],
            opt_state=opt_state,
            round=restored["round"],
            rng=restored["rng"],
            last_delta=restored["last_delta"],
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
