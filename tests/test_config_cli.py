"""Every declared config field can be set from the command line and is seen by the code.

The command lines are parsed by ``spry_jax.main.parse_flags`` itself (absl + ml_collections'
``DEFINE_config_file`` with the parsers ``spry_jax.config`` registers), in a subprocess because
absl's flags are process-global.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections.config_flags import config_path

from spry_jax import config as config_lib
from spry_jax.data import make_federated_data
from spry_jax.data.registry import resolve_data_config
from spry_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PARSE = """
import json, sys
from spry_jax import config as config_lib, main
main.parse_flags(sys.argv)
print(json.dumps(config_lib.flatten(main._CONFIG.value.to_dict())))
"""


def _parse(tmp_path, config_text: str, argv: list[str]) -> subprocess.CompletedProcess:
    config_file = tmp_path / "cfg.py"
    config_file.write_text(config_text)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _PARSE,
            f"--config={config_file}",
            f"--workdir={tmp_path / 'w'}",
            *argv,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


DEFAULT = (
    "from spry_jax.config import default_config\n\ndef get_config():\n    return default_config()\n"
)


def _declared_types() -> dict[str, type]:
    """Each declared leaf's type as ml_collections sees it (a placeholder's declared type)."""
    c = config_lib.default_config()
    return {k: config_path.get_type(k, c) for k in config_lib.flatten(c)}


def _other_value(key: str, value, kind: type):
    """A value of the field's declared type that differs from its default, and its flag text."""
    if kind is bool:
        return (not value), str(not value)
    if kind is int:
        return value + 3, str(value + 3)
    if kind is float:  # also the float placeholder server.lr (default None)
        new = 0.5 if value is None else value + 0.25
        return new, repr(new)
    if kind is str:
        return f"v_{value}", f"v_{value}"
    if kind is tuple:
        return ["neg", "pos"], "('neg', 'pos')"
    if kind is dict:  # model.overrides (default None)
        return {"num_hidden_layers": 2}, "{'num_hidden_layers': 2}"
    raise AssertionError(f"{key}: no command-line test value for type {kind}")


def test_every_declared_type_has_a_command_line_parser():
    settable = (*config_lib.CLI_TYPES, dict)
    unsettable = {k: t for k, t in _declared_types().items() if t not in settable}
    assert not unsettable, f"declared fields the command line cannot set: {unsettable}"
    # Both extra parsers are needed: a dict field and a None default exist.
    assert _declared_types()["model.overrides"] is dict
    assert config_lib.default_config().server.lr is None


def test_every_declared_field_can_be_set_from_the_command_line(tmp_path):
    leaves = config_lib.flatten(config_lib.default_config())
    types = _declared_types()
    assert {"data.columns.text", "data.columns.text_pair", "data.columns.label"} <= set(leaves)
    assert {"data.heldout", "data.heldout_fraction", "data.label_names"} <= set(leaves)
    assert {"data.synthetic_seed", "memory.check", "memory.budget_gib"} <= set(leaves)
    want, argv = {}, []
    for key, value in leaves.items():
        new, text = _other_value(key, value, types[key])
        if isinstance(new, dict):
            want.update({f"{key}.{k}": v for k, v in new.items()})
        else:
            want[key] = new
        argv.append(f"--config.{key}={text}")
    out = _parse(tmp_path, DEFAULT, argv)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = {k: (got.get(k, "<absent>"), v) for k, v in want.items() if got.get(k) != v}
    assert not wrong, wrong
    assert set(got) == set(want)
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


def test_placeholders_can_be_unset_from_the_command_line(tmp_path):
    text = DEFAULT.replace(
        "    return default_config()\n",
        "    c = default_config()\n    c.server.lr = 0.3\n"
        "    c.model.overrides = {'vocab_size': 99}\n    return c\n",
    )
    out = _parse(tmp_path, text, ["--config.server.lr=None", "--config.model.overrides=None"])
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["server.lr"] is None and got["model.overrides"] is None


def test_a_field_that_cannot_be_none_or_be_parsed_is_named(tmp_path):
    c = config_lib.default_config()
    c.client.lr = None  # what --config.client.lr=None gives: ConfigDict accepts None anywhere
    with pytest.raises(ConfigError, match=r"client\.lr=None: client\.lr takes a float"):
        config_lib.validate(c)
    out = _parse(tmp_path, DEFAULT, ["--config.model.overrides=3"])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.model.overrides" in lines[0], out.stderr
    assert "is not a dict" in lines[0]
    # A field an experiment file adds with a type ml_collections cannot parse: one line naming it.
    text = DEFAULT.replace(
        "    return default_config()\n",
        "    c = default_config()\n    c.extra = [1]\n    return c\n",
    )
    out = _parse(tmp_path, text, ["--config.extra=[2]"])
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "spry_jax.main: error: --config.extra: a field of type <class 'list'> cannot be set "
        "from the command line; set it in the config file"
    )


def test_complete_fills_declared_defaults_and_refuses_unknown_fields():
    got = config_lib.complete({"peft": {"lora_rank": 4}, "data": {"label_names": ["a", "b"]}})
    want = config_lib.default_config()
    want.peft.lora_rank = 4
    want.data.label_names = ("a", "b")  # a JSON list back as the declared tuple
    assert got.to_dict() == want.to_dict()
    assert config_lib.complete({"lora_dropout": 0.0}, "peft").lora_dropout == 0.0
    with pytest.raises(ConfigError, match=r"peft\.lora_rnak is not a peft field; did you mean"):
        config_lib.complete({"lora_rnak": 2}, "peft")
    with pytest.raises(ConfigError, match=r"client\.epochs="):
        config_lib.complete({"client": {"epochs": "two"}})


def test_library_defaults_are_the_declared_ones():
    """A model or PEFT config given in part takes the declared defaults, not others."""
    from spry_jax.models.peft import PeftConfig, as_peft_config

    declared = config_lib.default_config().peft
    p = as_peft_config({"method": "lora"})
    assert p == PeftConfig()
    assert (p.lora_rank, p.lora_alpha, p.lora_dropout) == (
        declared.lora_rank,
        declared.lora_alpha,
        declared.lora_dropout,
    )
    assert p.target_modules == tuple(declared.target_modules)


def _write_csv(path):
    """24 reviews with custom column names, a sentence pair, a group and a split column, and a
    comma inside a quoted field; labels as names."""
    rows = []
    for i in range(24):
        y = "pos" if i % 3 else "neg"
        word = "good, really" if y == "pos" else "bad"
        rows.append(
            {
                "review": f"{word} film {i}",
                "summary": f"about movie {i % 5}",
                "stars": y,
                "movie": f"m{i % 4}",
                "part": "test" if i % 6 == 0 else "train",
            }
        )
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_a_local_csv_with_a_column_mapping_is_used_from_the_cli(tmp_path, monkeypatch):
    from spry_jax import models
    from spry_jax.assets import fetch

    # Tokenized arrays are cached under $SPRY_JAX_CACHE: a fresh one, with the real assets.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "assets").symlink_to(fetch("minilm").parent, target_is_directory=True)
    monkeypatch.setenv("SPRY_JAX_CACHE", str(cache))
    path = tmp_path / "reviews.csv"
    rows = _write_csv(path)
    argv = [
        "--config.data.name=csv",
        f"--config.data.path={path}",
        "--config.data.columns.text=review",
        "--config.data.columns.text_pair=summary",
        "--config.data.columns.label=stars",
        "--config.data.columns.split=part",
        "--config.data.columns.group=movie",
        "--config.data.label_names=pos,neg",
        "--config.data.max_length=24",
        "--config.num_clients=4",
        "--config.clients_per_round=2",
        "--config.model.tokenizer=minilm",
    ]
    out = _parse(tmp_path, DEFAULT, argv)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    config = config_lib.complete(_unflatten(got))
    config_lib.validate(config)  # the checks main runs before any work
    tokenizer = models.load_tokenizer(config.model.tokenizer)
    fed = make_federated_data(
        config.data, num_clients=config.num_clients, tokenizer=tokenizer, seed=config.seed
    )
    assert fed.label_names == ("pos", "neg") and fed.num_labels == 2  # the order given
    ds = fed.dataset
    assert ds.texts == [r["review"] for r in rows]
    assert ds.text_pairs == [r["summary"] for r in rows]
    assert ds.labels.tolist() == [["pos", "neg"].index(r["stars"]) for r in rows]
    assert ds.group.tolist() == [r["movie"] for r in rows]
    test_rows = [i for i, r in enumerate(rows) if r["part"] == "test"]
    assert np.flatnonzero(ds.heldout).tolist() == test_rows
    assert len(fed.heldout["labels"]) == len(test_rows)
    # Every train row reaches exactly one client (20 = 4 clients x 5), no test row does.
    pooled = np.sort(np.concatenate([np.r_[tr, te] for tr, te in fed.client_examples]))
    assert pooled.tolist() == [i for i in range(len(rows)) if i not in test_rows]
    # Each client's arrays are the tokenizer's own encoding of its (review, summary) pairs.
    for c, (tr, _) in enumerate(fed.client_examples):
        enc = tokenizer(
            [rows[i]["review"] for i in tr],
            [rows[i]["summary"] for i in tr],
            truncation=True,
            max_length=24,
            padding="max_length",
        )
        np.testing.assert_array_equal(fed.train[c]["input_ids"], enc["input_ids"])
        np.testing.assert_array_equal(
            fed.train[c]["labels"], [["pos", "neg"].index(rows[i]["stars"]) for i in tr]
        )


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
