"""Small files that ship inside the package (``setup.py`` ``package_data``), found through
:mod:`importlib.resources` so they are there in an installed package as in a clone.

* ``squad_tiny.json``: a hand-written SQuAD v2-format file (answerable and unanswerable
  questions) that ``experiments/squad_v2.py:local`` trains on and the QA tests read.
"""

from __future__ import annotations

import importlib.resources
import pathlib

__all__ = ["path"]


def path(name: str) -> str:
    """The file system path of the packaged file ``name``.

    Raises:
      FileNotFoundError: no such packaged file (the message lists the packaged files), or the
        package is imported from an archive, where the file has no path of its own.
    """
    root = importlib.resources.files(__name__)
    entry = root / name
    if not entry.is_file():
        known = sorted(e.name for e in root.iterdir() if e.is_file() and e.name != "__init__.py")
        raise FileNotFoundError(f"No packaged file {name!r} in spry_jax.resources; have {known}.")
    if not isinstance(entry, pathlib.Path):
        raise FileNotFoundError(
            f"spry_jax.resources/{name} is inside an archive; install spry_jax as a directory "
            "(pip install, not a zipped import) to read it by path."
        )
    return str(entry)
