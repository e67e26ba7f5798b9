"""Config validation: defaults filled from the schema, errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from unetflow.config import ConfigError, load_config, model_section, validate_config


def test_demo_config_is_valid_and_gets_defaults():
    config = load_config("config/config.yaml")
    assert config["train"]["optimizer"] == "adamw"  # a default from the schema
    assert config["predict"]["blending"] == "crop"
    assert set(config["models"]) == {"nuclei_seg", "nuclei_boundaries", "nuclei_denoise"}
    assert config["models"]["nuclei_boundaries"]["model"]["target"] == "boundaries"


def test_model_override_merges_over_the_global_section(tiny_config):
    tiny_config["models"]["dn"]["train"] = {"steps": 9, "augment": {"noise": 0.1}}
    config = validate_config(tiny_config)
    train = model_section(config, "dn", "train")
    assert train["steps"] == 9 and train["batch_size"] == 4
    assert train["augment"]["noise"] == 0.1 and train["augment"]["flips"] is True
    assert model_section(config, "seg", "train")["steps"] == 4


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["train"].update(stpes=3), "unknown key 'stpes'. Did you mean 'steps'?"),
    (lambda c: c["train"].update(steps="many"), "config key 'train.steps'"),
    (lambda c: c["models"]["seg"].update(train_on=["nope"]),
     "'models.seg.train_on[0]': dataset 'nope' is not defined"),
    (lambda c: c["models"]["seg"].update(task="classify"), "config key 'models.seg.task'"),
    (lambda c: c["patches"].update(shape=[32, 32, 32]), "has 3 dimensions but the model is 2D"),
    (lambda c: c["predict"].update(tile_shape=[66, 66]), "not divisible by 2**model.depth = 4"),
    (lambda c: c["datasets"].update({"bad name;rm": {"image": "x"}}), "is not allowed"),
    (lambda c: c.update(datasets={}), "config key 'datasets'"),
])
def test_bad_config_names_the_key(tiny_config, edit, message):
    edit(tiny_config)
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_config)
    assert message in str(err.value)


def test_load_config_refuses_a_non_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
