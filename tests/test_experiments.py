"""Every experiment config resolves and validates; every ``:local`` variant builds."""

import os

import pytest

import experiments
from spry_jax import config as config_lib
from spry_jax import resources, train

CONFIGS = list(experiments.names())
PAPER = ["ag_news", "mnli", "multirc", "snli", "squad_v2", "sst2", "yahoo", "yelp"]


def _load(name):
    return experiments.load(name)


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


def test_experiments_is_a_package_naming_its_configs():
    assert experiments.load("smoke").get_config().method == experiments.get_config("smoke").method
    with pytest.raises(ValueError, match="No experiment config 'smok'; known: .*'smoke'"):
        experiments.load("smok")


def test_local_squad_file_ships_with_the_package():
    """``squad_v2.py:local`` reads the SQuAD file packaged in ``spry_jax/resources`` (listed in
    setup.py's package_data), not a file of the test tree."""
    path = experiments.get_config("squad_v2", "local").data.path
    assert path == resources.path("squad_tiny.json")
    assert os.path.isfile(path) and os.sep + "resources" + os.sep in path
    with pytest.raises(FileNotFoundError, match="have \\['squad_tiny.json'\\]"):
        resources.path("missing.json")
