"""What a study file declares (:class:`Study`, :class:`Arm`, :class:`Claim`), how it is loaded,
and the resolved config of every cell.

A study file is a Python file with ``get_study()`` (or ``get_study(variant)`` for
``file.py:variant``) returning a :class:`Study`, loaded from its path the way
``--config=file.py[:variant]`` loads an experiment config; its ``base`` config is loaded with
ml_collections' ``DEFINE_config_file``, the loader behind the main CLI's ``--config``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from spry_jax.errors import UserError

STAGES = ("tune", "final")
CLAIM_METRICS = ("test_accuracy", "val_accuracy")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class StudyError(UserError):
    """A user error in a study file or study directory (the CLI exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method or variant of a study.

    Attributes:
      overrides: dotted config keys to values, e.g. ``{"method": "fedavg"}``.
      grid: the tuning grid, either ``{key: [values]}`` (every combination, in key order) or a
        list of ``{key: value}`` points (tied values, e.g. K with its learning rate). Empty: one
        point, the arm's own settings.
    """

    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim ``lhs op rhs + margin`` about two arms' final figures, judged by the 95 % CI of
    their paired difference over seeds (:func:`spry_jax.study.stats.verdict`).

    Attributes:
      text: what the report prints, e.g. "FedFGD < Spry (Spry paper, ablations)".
      lhs, rhs: arm names.
      op: ``"<"`` or ``">"``.
      margin: the claim is ``lhs - rhs op margin`` (e.g. ``">", 0.02``: lhs beats rhs by more
        than 2 points; ``">", -0.062``: lhs within 6.2 points of rhs).
      metric: ``"test_accuracy"`` (all clients' test splits) or ``"val_accuracy"``.
    """

    text: str
    lhs: str
    rhs: str
    op: str
    margin: float = 0.0
    metric: str = "test_accuracy"


@dataclasses.dataclass(frozen=True)
class Study:
    """A grid of ordinary runs: per arm, tune on validation, then run the choice with seeds.

    Attributes:
      base: the base experiment config: a path ``experiments/<name>.py[:variant]`` (relative to
        the current directory, as ``--config``), a ConfigDict, or a function returning one.
      arms: name -> :class:`Arm` (or a dict with its fields).
      overrides: applied to the base before each arm's overrides (e.g.
        ``{"data.val_fraction": 0.1}``, which every study needs: selection reads validation).
      tune_seeds: seeds of the tuning runs; a point's score is the mean over them.
      seeds: seeds of the final runs of each arm's chosen point (>= 3 for a claim to mean much).
        A final run whose config equals a tuning run's (same seed and rounds) is that run, not
        a second copy (it would be bit-identical); pick tune_seeds disjoint from seeds to keep
        the runs that chose a point out of its final figures.
      rounds: rounds of every run (None: the base config's).
      tune_rounds: rounds of the tuning runs (None: ``rounds``).
      pairs: ``(a, b)`` arm pairs whose paired differences ``a - b`` the report prints.
      claims: :class:`Claim` (or dicts with its fields) for the report's claims section.
      name: the study's name in the report (default: the file name).
    """

    base: str | ml_collections.ConfigDict | Callable[[], ml_collections.ConfigDict]
    arms: Mapping[str, Arm | Mapping[str, Any]]
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tune_seeds: Sequence[int] = (0,)
    seeds: Sequence[int] = (0, 1, 2)
    rounds: int | None = None
    tune_rounds: int | None = None
    pairs: Sequence[tuple[str, str]] = ()
    claims: Sequence[Claim | Mapping[str, Any]] = ()
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point of an arm: its directory-safe name and its overrides."""

    name: str
    overrides: dict[str, Any]


def load_study(path: str) -> Study:
    """Loads ``file.py[:variant]`` and checks it (:func:`check_study`).

    Raises:
      StudyError: the file is missing, fails to import, or its study is invalid.
    """
    file, _, variant = path.partition(":")
    if not os.path.isfile(file):
        raise StudyError(f"study file {file!r} not found")
    stem = os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(f"spry_jax_study_{stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise StudyError(f"study file {file}: {type(e).__name__}: {e}") from e
    get_study = getattr(module, "get_study", None)
    if not callable(get_study):
        raise StudyError(f"study file {file} defines no get_study()")
    try:
        study = get_study(variant) if variant else get_study()
    except StudyError:
        raise
    except Exception as e:
        raise StudyError(f"study file {path}: get_study() raised {type(e).__name__}: {e}") from e
    if not isinstance(study, Study):
        raise StudyError(
            f"study file {path}: get_study() returned {type(study).__name__}, not a "
            "spry_jax.study.Study"
        )
    return check_study(study, default_name=stem)


def check_study(study: Study, default_name: str = "study") -> Study:
    """Normalises a study (dicts to :class:`Arm`/:class:`Claim`) and checks it, including
    that every tuning cell's config resolves and validates.

    Raises:
      StudyError: naming the arm, key or field at fault.
    """
    if not isinstance(study.arms, Mapping) or not study.arms:
        raise StudyError("a study needs at least one arm (arms={'name': Arm(...)})")
    arms = {}
    for name, arm in study.arms.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise StudyError(f"arm name {name!r} must match {_NAME.pattern}")
        if isinstance(arm, Mapping):
            unknown = set(arm) - {"overrides", "grid"}
            if unknown:
                raise StudyError(f"arm {name!r}: unknown field(s) {sorted(unknown)}")
            arm = Arm(**arm)
        if not isinstance(arm, Arm):
            raise StudyError(f"arm {name!r} must be an Arm or a dict, got {type(arm).__name__}")
        arms[name] = arm
    claims = []
    for claim in study.claims:
        if isinstance(claim, Mapping):
            fields = {f.name for f in dataclasses.fields(Claim)}
            claim = dict(claim)
            if "claim" in claim and "text" not in claim:  # {"claim": "A < B", ...} reads well
                claim["text"] = claim.pop("claim")
            if set(claim) - fields or not {"text", "lhs", "rhs", "op"} <= set(claim):
                raise StudyError(
                    f"claim {claim!r}: needs text, lhs, rhs, op (optional margin, metric)"
                )
            claim = Claim(**claim)
        if claim.lhs not in arms or claim.rhs not in arms:
            raise StudyError(f"claim {claim.text!r}: unknown arm {claim.lhs!r} or {claim.rhs!r}")
        if claim.op not in ("<", ">"):
            raise StudyError(f"claim {claim.text!r}: op must be '<' or '>', got {claim.op!r}")
        if claim.metric not in CLAIM_METRICS:
            raise StudyError(f"claim {claim.text!r}: metric must be one of {CLAIM_METRICS}")
        claims.append(claim)
    pairs = []
    for pair in study.pairs:
        if len(pair) != 2:
            raise StudyError(f"pair {pair!r}: needs two arm names")
        unknown = [a for a in pair if a not in arms]
        if unknown:
            raise StudyError(f"pair {pair!r}: unknown arm {unknown[0]!r} (arms: {sorted(arms)})")
        pairs.append((pair[0], pair[1]))
    for field in ("tune_seeds", "seeds"):
        seeds = list(getattr(study, field))
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
            raise StudyError(f"{field} must be distinct ints, at least one; got {seeds}")
    for field in ("rounds", "tune_rounds"):
        value = getattr(study, field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise StudyError(f"{field} must be None or an int >= 1, got {value!r}")
    study = dataclasses.replace(
        study,
        arms=arms,
        claims=tuple(claims),
        pairs=tuple(pairs),
        tune_seeds=tuple(study.tune_seeds),
        seeds=tuple(study.seeds),
        name=study.name or default_name,
    )
    base = base_config(study)
    for arm in arms:
        for point in grid_points(study, arm):
            cfg = cell_config(study, arm, point, study.tune_seeds[0], "tune", base=base)
            if not cfg.data.val_fraction > 0:
                raise StudyError(
                    f"arm {arm!r}: data.val_fraction is 0, so there is no validation split to "
                    "choose on; set it in the study's overrides (e.g. 0.1)"
                )
    return study


def base_config(study: Study) -> ml_collections.ConfigDict:
    """The base config, loaded (a path) or called (a function), as a fresh copy."""
    base = study.base
    if isinstance(base, str):
        file = base.partition(":")[0]
        if not os.path.isfile(file):
            raise StudyError(f"base config {file!r} not found (relative to {os.getcwd()})")
        # The --config flag of the main CLI, on a flag set of its own: the same loader.
        flag_values = flags.FlagValues()
        try:
            config_flags.DEFINE_config_file(
                "config", base, "base config", flag_values=flag_values, lock_config=False
            )
            flag_values(["study"])
            base = flag_values["config"].value
        except (flags.Error, OSError, TypeError, ValueError) as e:
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [""]
            raise StudyError(f"base config {study.base!r}: {last[0].strip()}") from e
    elif callable(base) and not isinstance(base, ml_collections.ConfigDict):
        base = base()
    if not isinstance(base, ml_collections.ConfigDict):
        raise StudyError(f"base config {study.base!r} is not an ml_collections.ConfigDict")
    return base.copy_and_resolve_references()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # exact: 0.001, 1e-05
    if isinstance(value, (list, tuple)):
        return "_".join(_format_value(v) for v in value) or "none"
    return str(value)


def grid_points(study: Study, arm: str) -> list[Point]:
    """The grid points of ``arm`` in declaration order, each with a directory-safe name
    (``client.lr=0.001+fwd.num_tangents=4``; ``default`` for an empty grid)."""
    grid = study.arms[arm].grid
    if isinstance(grid, Mapping):
        keys = list(grid)
        for k in keys:
            if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Sequence):
                raise StudyError(f"arm {arm!r}: grid[{k!r}] must be a list of values")
            if not grid[k]:
                raise StudyError(f"arm {arm!r}: grid[{k!r}] is empty")
        points = [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())
        ]
    else:
        points = [dict(p) for p in grid]
        if not all(isinstance(p, Mapping) for p in grid):
            raise StudyError(f"arm {arm!r}: a grid list must hold {{key: value}} points")
    points = points or [{}]
    out, names = [], set()
    for p in points:
        if "seed" in p or "seed" in study.arms[arm].overrides:
            raise StudyError(f"arm {arm!r}: the seed is the study's (tune_seeds, seeds)")
        name = "+".join(f"{k}={_format_value(v)}" for k, v in p.items()) or "default"
        name = re.sub(r"[^A-Za-z0-9._=+-]", "_", name)
        if name in names:
            raise StudyError(f"arm {arm!r}: two grid points are both named {name!r}")
        names.add(name)
        out.append(Point(name, p))
    return out


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
) -> None:
    """Sets dotted keys of an existing config; an unknown key is a user error."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise StudyError(f"{where}: unknown config key {key!r}")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise StudyError(f"{where}: {key}={value!r}: {e}") from e


def cell_config(
    study: Study,
    arm: str,
    point: Point,
    seed: int,
    stage: str,
    base: ml_collections.ConfigDict | None = None,
) -> ml_collections.ConfigDict:
    """The resolved, validated config of one cell: base <- study overrides <- arm overrides <-
    grid point <- seed and the stage's rounds."""
    from spry_jax import config as config_lib  # local: imports the JAX-heavy method table

    config = (base or base_config(study)).copy_and_resolve_references()
    where = f"arm {arm!r}"
    apply_overrides(config, study.overrides, "study overrides")
    apply_overrides(config, study.arms[arm].overrides, where)
    apply_overrides(config, point.overrides, f"{where}, grid point {point.name}")
    config.seed = seed
    rounds = study.tune_rounds if stage == "tune" and study.tune_rounds else study.rounds
    if rounds:
        config.rounds = rounds
    try:
        config_lib.validate(config)
    except (ValueError, KeyError) as e:
        raise StudyError(f"{where}, point {point.name}, seed {seed}: {e}") from e
    return config


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as ``config.json`` holds it (what a finished cell is matched against)."""
    return json.loads(config.to_json())
