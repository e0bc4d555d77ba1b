"""Experiment configs, one module per paper setting (plus ``smoke`` and ``quickstart``).

Each module defines ``get_config(variant="")`` returning an ``ml_collections.ConfigDict``
(``variant="local"`` picks the CPU-sized version where one exists) and holds its exact command
and what to expect in its docstring. From the command line a config is named by its file::

    python -m spry_jax.main --config=experiments/sst2.py:local --workdir=runs/sst2_local

From Python (tests, benchmarks, notebooks) it is imported, from the repository root::

    from experiments import smoke
    cfg = smoke.get_config()
    cfg = experiments.get_config("squad_v2", "local")
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

__all__ = ["get_config", "load", "names"]


def names() -> tuple[str, ...]:
    """The experiment configs of this package (module names, sorted; studies excluded)."""
    return tuple(
        sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg)  # noqa: F821
    )


def load(name: str) -> ModuleType:
    """The config module ``experiments.<name>``.

    Raises:
      ValueError: ``name`` is not one of :func:`names`, naming the known configs.
    """
    if name not in names():
        raise ValueError(f"No experiment config {name!r}; known: {list(names())}.")
    return importlib.import_module(f"{__name__}.{name}")


def get_config(name: str, variant: str = "") -> Any:
    """``experiments.<name>.get_config(variant)`` (``get_config()`` for no variant: smoke and
    quickstart take none)."""
    module = load(name)
    return module.get_config(variant) if variant else module.get_config()
