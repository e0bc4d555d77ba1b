"""Every declared config field can be set from the command line and is seen by the code."""

import json
import os
import subprocess
import sys

from spry_jax import config as config_lib
from spry_jax.data import load_dataset
from spry_jax.data.registry import resolve_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ml_collections cannot override a dict-typed field from the command line (only int, float,
# bool, str, tuple); experiment files set it.
NOT_FROM_CLI = {"model.overrides"}

_PARSE = """
import json, sys
from absl import flags
from ml_collections import config_flags
from spry_jax import config as config_lib
cfg = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
flags.FLAGS(sys.argv)
print(json.dumps(config_lib.flatten(cfg.value.to_dict())))
"""


def _other_value(value):
    """A value of the field's type that differs from its default, and its flag text."""
    if isinstance(value, bool):
        return (not value), str(not value)
    if isinstance(value, int):
        return value + 3, str(value + 3)
    if isinstance(value, float):
        return value + 0.25, repr(value + 0.25)
    if isinstance(value, str):
        return f"v_{value}", f"v_{value}"
    if isinstance(value, tuple):
        return ["neg", "pos"], "('neg', 'pos')"
    if value is None:  # a float placeholder (server.lr)
        return 0.5, "0.5"
    raise AssertionError(f"no test value for {value!r}")


def test_every_declared_field_can_be_set_from_the_command_line(tmp_path):
    leaves = config_lib.flatten(config_lib.default_config())
    assert {"data.columns.text", "data.columns.text_pair", "data.columns.label"} <= set(leaves)
    assert {"data.heldout", "data.heldout_fraction", "data.label_names"} <= set(leaves)
    assert {"data.synthetic_seed", "memory.check", "memory.budget_gib"} <= set(leaves)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from spry_jax.config import default_config\n\ndef get_config():\n"
        "    return default_config()\n"
    )
    want, argv = {}, []
    for key, value in leaves.items():
        if key in NOT_FROM_CLI:
            continue
        want[key], text = _other_value(value)
        argv.append(f"--config.{key}={text}")
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, f"--config={config_file}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, wrong
    # The data loaders see what was set: no second default replaces a set data field.
    nested: dict = {}
    for k, v in got.items():
        if k.startswith("data."):
            node = nested
            *parents, leaf = k.split(".")[1:]
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
    resolved = config_lib.flatten(resolve_data_config(nested).to_dict())
    seen = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in resolved.items()}
    assert seen == {k[len("data.") :]: v for k, v in want.items() if k.startswith("data.")}


def test_a_local_file_is_read_through_the_cli_column_mapping(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [
        {"review": "great", "stars": "pos", "part": "train", "u": "a"},
        {"review": "bad", "stars": "neg", "part": "test", "u": "b"},
        {"review": "fine", "stars": "pos", "part": "train", "u": "a"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from spry_jax.config import default_config\n\ndef get_config():\n"
        "    return default_config()\n"
    )
    flags_ = [
        "--config.data.name=jsonl",
        f"--config.data.path={path}",
        "--config.data.columns.text=review",
        "--config.data.columns.label=stars",
        "--config.data.columns.split=part",
        "--config.data.columns.group=u",
        "--config.data.label_names=pos,neg",
    ]
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, f"--config={config_file}", *flags_],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    data = {k.split(".", 1)[1]: v for k, v in got.items() if k.startswith("data.")}
    cfg = {k: v for k, v in data.items() if "." not in k}
    cfg["columns"] = {k.split(".")[1]: v for k, v in data.items() if k.startswith("columns.")}
    ds = load_dataset(cfg)
    assert ds.texts == ["great", "bad", "fine"]
    assert ds.label_names == ("pos", "neg")  # the order given, not sorted
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.heldout.tolist() == [False, True, False]
    assert ds.group.tolist() == ["a", "b", "a"]
