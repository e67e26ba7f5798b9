"""The conda environment of the rules names the same packages as pyproject's dependencies."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's
CONDA_NAMES = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()
    return CONDA_NAMES.get(name, name).replace("_", "-")


def _pyproject_names() -> set[str]:
    """From the installed metadata (built from pyproject.toml; tomllib needs Python 3.11)."""
    deps = [d for d in requires("unetflow") if "extra ==" not in d]
    return {_name(d) for d in deps}


def _conda_names(path: Path) -> set[str]:
    spec = yaml.safe_load(path.read_text())
    names = {_name(d) for d in spec["dependencies"] if isinstance(d, str)}
    return names - {"python", "pip"}


def test_every_env_file_matches_pyproject():
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files, "envs/ holds no environment file"
    for path in env_files:
        assert _conda_names(path) == _pyproject_names(), path.name


def test_every_rule_uses_an_existing_env_file():
    rules = (REPO / "workflow" / "rules").glob("*.smk")
    text = "\n".join(p.read_text() for p in rules)
    assert 'ENV = "../../envs/unetflow.yaml"' in (REPO / "workflow/rules/common.smk").read_text()
    assert text.count("conda:") >= 6
    assert (REPO / "envs" / "unetflow.yaml").is_file()


def test_env_installs_this_package():
    spec = yaml.safe_load((REPO / "envs" / "unetflow.yaml").read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert "--editable .." in pip
