"""The workflow passes `snakemake --lint` without a single lint, and `snakefmt --check`.

Lints are fixed, not silenced: Snakemake prints each one as a "Lints for ..." block and exits
with 1, and "Congratulations, your workflow is in a good condition!" with 0 when there is none.
Snakemake lints every rule whatever the config; the configs differ in what common.smk parses
(the demo config; TIFF datasets converted by rule convert, fine-tuning, a regression model).
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import BIN, REPO, TINY_CONFIG, snakemake, write_config

TIFF_CONFIG = {
    "datasets": {
        "tif": {"image": "raw/image.tif", "target": "raw/labels.tif", "axes": "yx",
                "pixel_size": {"y": 0.5, "x": 0.5}},
        **TINY_CONFIG["datasets"],
    },
    "models": {
        "tif_seg": {"task": "segmentation", "train_on": ["tif"], "predict_on": ["tif"]},
        **TINY_CONFIG["models"],
        "dn_tuned": {"task": "regression", "train_on": ["tr_dn"], "predict_on": ["te_dn"],
                     "train": {"init_from": "results/dn/checkpoint_best.pt"}},
    },
}


def lint(workdir, configfile) -> subprocess.CompletedProcess:
    return snakemake(workdir, "--lint", "--configfile", str(configfile), check=False)


@pytest.mark.parametrize("config", ["demo", "tiff"])
def test_snakemake_lint_finds_nothing(tmp_path, config):
    configfile = (REPO / "config" / "config.yaml" if config == "demo"
                  else write_config(tmp_path, TIFF_CONFIG))
    result = lint(tmp_path, configfile)
    output = result.stdout + result.stderr
    assert "Lints for" not in output, output
    assert result.returncode == 0, output
    assert "your workflow is in a good condition" in output


def test_snakefmt_check_passes():
    """Formatted with `snakefmt Snakefile workflow/` (settings in pyproject.toml)."""
    assert (BIN / "snakefmt").exists(), "snakefmt is a test extra: pip install -e '.[test]'"
    result = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
