"""Planning-time checks (issue 16, item 1): what metadata can tell is refused when Snakemake
plans, before any job, with one line naming the key or file and the fix.

Settings are checked against the data they apply to (tiles, shards, sigmas, patches), images
against each other (channels, pixel sizes, time points, label dtypes) and against the
checkpoint a model starts from (train.init_from). Each case runs `validate_config` or
`dataset_problems` (what common.smk calls) on real small OME-Zarr stores; one real
`snakemake -n` shows the lines appear before any job.
"""

from __future__ import annotations

import time

import pytest
import yaml

from test_bad_input import assert_one_clear_line, config_error
from unetflow.config import ConfigError, load_config, validate_config


# --- YAML alias bomb -----------------------------------------------------------------------
def alias_bomb(levels: int = 9) -> str:
    """A YAML list whose aliases expand to 9**levels strings (a 'billion laughs')."""
    anchors = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        anchors.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "[" + ", ".join(anchors) + "]"


def test_an_alias_bomb_is_refused_in_a_fraction_of_a_second(tmp_path, tiny_config):
    text = yaml.safe_dump(tiny_config, sort_keys=False).replace(
        "train:\n", f"train:\n  init_from: {alias_bomb()}\n", 1)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 2
    assert_one_clear_line(str(err.value), "config key 'train.init_from'", "YAML aliases",
                          "write the value out without nested aliases")


def test_a_value_that_contains_itself_is_refused(tiny_config):
    looped = yaml.safe_load("a: &a [1, *a]")["a"]
    tiny_config["train"]["init_from"] = looped
    assert_one_clear_line(config_error(tiny_config), "config key 'train.init_from'",
                          "refers to itself")


def test_aliases_that_stay_small_are_fine(tiny_config):
    shared = {"residual": True}
    tiny_config["models"]["dn"]["model"] = shared
    tiny_config["models"]["seg"]["model"] = shared  # the same dict twice, as an alias gives
    validate_config(tiny_config)
