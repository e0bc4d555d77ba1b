"""Every experiment config resolves and validates; every ``:local`` variant builds."""

import glob
import importlib.util
import os

import pytest

from spry_jax import config as config_lib
from spry_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
)
PAPER = ["ag_news", "mnli", "multirc", "snli", "squad_v2", "sst2", "yahoo", "yelp"]


def _load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "experiments", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_paper_setting_has_a_config():
    assert set(PAPER) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_documents_its_command(name):
    mod = _load(name)
    assert f"--config=experiments/{name}.py" in mod.__doc__
    config_lib.validate(mod.get_config())


@pytest.mark.parametrize("name", PAPER)
def test_paper_settings_follow_the_release(name):
    c = _load(name).get_config()
    assert (c.peft.method, c.peft.lora_rank, c.peft.lora_alpha) == ("lora", 1, 1.0)
    assert (c.client.lr, c.client.batch_size, c.rounds) == (1e-4, 8, 1500)
    assert c.data.max_length == (384 if name == "squad_v2" else 64)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        _load("sst2").get_config("gpu")


@pytest.mark.parametrize("name", PAPER)
def test_local_variant_builds(name):
    exp = train.build_experiment(_load(name).get_config("local"))
    assert exp.spec.units.num_units >= 1
    assert len(exp.fed.train) == exp.config.num_clients
