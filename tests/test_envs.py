"""pyproject.toml, the lock (envs/constraints.txt) and the rules' conda environment agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "envs" / "constraints.txt"
# conda-forge names that differ from PyPI's
CONDA_NAMES = {"pytorch": "torch"}
# Installed with torch, at the version of the user's choice: never in the lock.
UNLOCKED = re.compile(r"^(torch|triton|nvidia-.*)$")
# Extras that rules run (rule export: bioimageio): the rules' environment has them too.
RULE_EXTRAS = ("bioimageio",)


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    name = canonicalize_name(name)
    return CONDA_NAMES.get(name, name)


def _pyproject() -> dict:
    """Read from the file, not the installed metadata: an editable install's metadata is as old
    as its last `pip install` and may come from another checkout."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pyproject_requirements(extras: bool | tuple[str, ...] = True) -> list[Requirement]:
    """The dependencies, with every extra (True) or with those named."""
    project = _pyproject()
    lines = list(project["dependencies"])
    groups = project["optional-dependencies"]
    for name in (groups if extras is True else extras or ()):
        lines += groups[name]
    return [Requirement(line) for line in lines]


def _lock_lines() -> list[str]:
    lines = (line.strip() for line in LOCK.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _lock() -> dict[str, Version]:
    """Package name -> its exact version in the lock."""
    pins = {}
    for line in _lock_lines():
        name, version = line.split("==")
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _lock_python() -> str:
    """The major.minor of the Python the lock was made on (its `# Made on Python` line)."""
    found = re.search(r"^# Made on Python (\d+\.\d+)\.", LOCK.read_text(), re.MULTILINE)
    assert found, "the lock does not say which Python it was made on"
    return found.group(1)


def _torch_spec() -> Requirement:
    """The torch that `make install` installs into a venv without one."""
    found = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found, "the Makefile sets no TORCH_SPEC"
    return Requirement(found.group(1))


def _conda_specs(path: Path) -> list[str]:
    spec = yaml.safe_load(path.read_text())
    return [d for d in spec["dependencies"] if isinstance(d, str)]


def _conda_names(path: Path) -> set[str]:
    return {_name(d) for d in _conda_specs(path)} - {"python", "pip"}


def test_every_env_file_matches_pyproject():
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files, "envs/ holds no environment file"
    pyproject = {canonicalize_name(r.name) for r in _pyproject_requirements(RULE_EXTRAS)}
    for path in env_files:
        assert _conda_names(path) == pyproject, path.name


def test_every_lock_line_pins_one_exact_version():
    names = []
    for line in _lock_lines():
        requirement = Requirement(line)
        assert len(requirement.specifier) == 1, line
        (specifier,) = requirement.specifier
        assert specifier.operator == "==" and "*" not in specifier.version, line
        assert not (requirement.extras or requirement.marker or requirement.url), line
        assert not UNLOCKED.match(canonicalize_name(requirement.name)), line
        assert canonicalize_name(requirement.name) != "unetflow", line
        names.append(canonicalize_name(requirement.name))
    assert len(names) == len(set(names)), "a package is pinned twice"


def test_lock_satisfies_every_pyproject_requirement():
    """Dependencies and every extra: the lock covers them, within pyproject's bounds."""
    lock = _lock()
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if UNLOCKED.match(name):
            continue
        assert name in lock, f"{name} is in pyproject.toml but not in {LOCK.name}"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={lock[name]}, outside pyproject's {requirement}")


def test_torch_spec_satisfies_pyproject():
    torch = next(r for r in _pyproject_requirements() if r.name == "torch")
    (pin,) = _torch_spec().specifier
    assert pin.operator == "==", _torch_spec()
    assert torch.specifier.contains(pin.version), f"TORCH_SPEC {pin} is outside {torch}"


def test_env_file_pins_the_lock_versions():
    """Each package at exactly the version of the lock (torch: of TORCH_SPEC), so that the
    rules' environment runs what the suite passed with."""
    lock = _lock()
    lock["torch"] = Version(next(iter(_torch_spec().specifier)).version)
    for spec in _conda_specs(REPO / "envs" / "unetflow.yaml"):
        name = _name(spec)
        if name == "pip":
            continue
        if name == "python":
            python = _lock_python()
            assert spec == f"python={python}", f"{spec}: the lock was made on Python {python}"
            continue
        found = re.fullmatch(r"[A-Za-z0-9_.-]+==(\S+)", spec)
        assert found, f"{spec}: envs/unetflow.yaml pins exact versions (name==version)"
        assert name in lock, f"{spec}: not in {LOCK.name}"
        assert Version(found.group(1)) == lock[name], f"{spec}: the lock has {lock[name]}"


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
