"""The one command line: every subcommand reports a missing input or invalid JSON in one
line, `unetflow <stage>: error: ...`, naming the argument and the file, with no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli as conftest_run_cli
from unetflow.cli import build_parser

UNETFLOW = Path(sys.executable).with_name("unetflow")
MISSING = "/nonexistent/unetflow-test/missing.ome.zarr"
SETTINGS = json.dumps({})


def run_cli(*args: str) -> tuple[int, str, str]:
    result = conftest_run_cli(*args)
    return result.returncode, result.stdout, result.stderr

def existing(tmp_path: Path) -> dict[str, str]:
    """Real (empty) files and folders for the inputs a case does not test."""
    paths = {}
    for name in ("image", "target", "prediction", "raw", "store"):
        (tmp_path / f"{name}.zarr").mkdir(exist_ok=True)
        paths[name] = str(tmp_path / f"{name}.zarr")
    for name in ("checkpoint.pt", "stats.json", "record.json", "summary.tsv", "metrics.json",
                 "baseline.json", "stack.tif"):
        (tmp_path / name).write_text("{}")
        paths[name.split(".")[0]] = str(tmp_path / name)
    return paths


def commands(p: dict[str, str], missing: str, bad_json: str) -> dict[str, tuple[list, str]]:
    """Each subcommand's arguments, with one input replaced by `missing` (and the flag that
    names it), and its JSON settings given as `bad_json`."""
    out = str(Path(p["image"]).parent / "out")
    predict = ["--checkpoint", p["checkpoint"], "--image", missing, "--settings", bad_json,
               "--output", out]
    datasets = json.dumps([{"name": "d", "image": missing, "target": p["target"],
                            "stats": p["stats"], "channels": None}])
    return {
        "demo-data": (["--output-dir", out, "--settings", bad_json], ""),
        "normalize": (["--image", missing, "--dataset", "d", "--settings", bad_json,
                       "--output", out], "--image"),
        "extract-patches": (["--datasets", datasets, "--task", "segmentation", "--settings",
                             bad_json, "--normalize", "{}", "--store", out, "--manifest", out],
                            "--datasets[0].image"),
        "train": (["--store", missing, "--model-dir", out, "--task", "segmentation",
                   "--model-settings", "{}", "--settings", bad_json, "--best", out, "--last",
                   out, "--log", out, "--curve", out], "--store"),
        "predict create": (predict, "--image"),
        "predict shard": ([*predict, "--stats", p["stats"], "--raw", p["raw"], "--shard", "0"],
                          "--image"),
        "predict gather": ([*predict, "--stats", p["stats"], "--raw", p["raw"], "--model", "m",
                            "--dataset", "d", p["record"]], "--image"),
        "predict run": ([*predict, "--stats", p["stats"], "--model", "m", "--dataset", "d"],
                        "--image"),
        "predict positions": (["--checkpoint", p["checkpoint"], "--positions", missing,
                               "--stats", p["stats"], "--settings", bad_json, "--model", "m",
                               "--dataset", "d", "--output", out, "--record", out],
                              "--positions"),
        "predict finish": (["--positions", p["record"], "--checkpoint", p["checkpoint"],
                            "--settings", bad_json, "--model", "m", "--dataset", "d",
                            "--output", out, "--index", out, p["record"], missing], "records"),
        "evaluate": (["--prediction", missing, "--image", p["image"], "--target", p["target"],
                      "--task", "segmentation", "--settings", bad_json, "--output", out,
                      "--model", "m", "--dataset", "d"], "--prediction"),
        "evaluate-positions": (["--positions", missing, "--prediction", p["prediction"],
                                "--task", "segmentation", "--settings", bad_json, "--model",
                                "m", "--dataset", "d", "--output", out], "--positions"),
        "evaluate-dataset": (["--positions", p["record"], "--task", "segmentation", "--model",
                              "m", "--dataset", "d", "--output", out, "--table", out,
                              "--wells", out, p["summary"], missing], "batches"),
        "tune-baseline": (["--datasets", datasets, "--settings", bad_json, "--output", out],
                          "--datasets[0].image"),
        "montage": (["--prediction", p["prediction"], "--image", missing, "--target",
                     p["target"], "--stats", p["stats"], "--task", "segmentation",
                     "--settings", bad_json, "--output", out], "--image"),
        "compare": (["--summary", missing, "--output", out], "--summary"),
        "export": (["--checkpoint", p["checkpoint"], "--image", missing, "--stats-dataset", "d",
                    "--train-on", '["d"]', "--settings", bad_json, "--metrics", p["metrics"],
                    "--model", "m", "--output", out], "--image"),
        "convert": ([missing, out, "--chunks", bad_json], "input"),
        "summarize": (["--output", out, p["metrics"], missing], "metrics"),
        "show": ([missing], "summary"),
        "positions": (["--dataset", "d", "--spec", bad_json, "--output", out], ""),
        "convert-collection": (["--dataset", "d", "--spec", bad_json, "--output-dir", out],
                               ""),
        "demo-plate": (["--output", out, "--shape", bad_json], ""),
    }


def test_every_subcommand_is_covered():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    names = set(sub.choices) - {"predict"}
    names |= {f"predict {step}" for step in sub.choices["predict"]._subparsers._actions[-1]
              .choices}
    assert names == set(commands(existing_paths_stub(), MISSING, "{}"))


def existing_paths_stub() -> dict[str, str]:
    return {k: k for k in ("image", "target", "prediction", "raw", "store", "checkpoint",
                           "stats", "record", "summary", "metrics", "baseline", "stack")}


@pytest.mark.parametrize("stage", sorted(commands(existing_paths_stub(), MISSING, "{}")))
def test_a_missing_input_is_one_line_naming_the_argument_and_the_path(tmp_path, stage):
    args, flag = commands(existing(tmp_path), MISSING, SETTINGS)[stage]
    if not flag:
        pytest.skip(f"{stage} reads no input file")
    code, _, err = run_cli(*stage.split(), *args)
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"unetflow {stage}: error: {flag}: {MISSING}: no such file or directory; "
                   f"fix the path\n"), err
    assert not (tmp_path / "out").exists()


# the JSON argument of each subcommand; summarize reads JSON files (metrics) instead, and
# compare, show and evaluate-dataset read TSV tables (and a positions file) only
JSON_ARGUMENT = {"convert": "--chunks", "summarize": None, "compare": None, "show": None,
                 "positions": "--spec", "demo-plate": "--shape", "evaluate-dataset": None,
                 "convert-collection": "--spec"}


@pytest.mark.parametrize("stage", sorted(commands(existing_paths_stub(), MISSING, "{}")))
def test_invalid_json_is_one_line_naming_the_argument(tmp_path, stage):
    paths = existing(tmp_path)
    flag = JSON_ARGUMENT.get(stage, "--settings")
    if flag is None:
        pytest.skip(f"{stage} takes no JSON argument")
    args, _ = commands(paths, paths["image"], "{not json")[stage]
    code, _, err = run_cli(*stage.split(), *args)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"unetflow {stage}: error: argument {flag}: not valid JSON"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["{not json", '{"model": "m"}'])
def test_a_damaged_json_input_file_is_one_line_naming_the_file(tmp_path, content):
    """Inputs that are JSON files: metrics (summarize) and shard records (predict gather)."""
    paths = existing(tmp_path)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(content)
    code, _, err = run_cli("summarize", "--output", str(tmp_path / "out"), str(damaged))
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"unetflow summarize: error: {damaged}: not "), err
    assert not (tmp_path / "out").exists()
    if content.startswith("{not"):
        args, _ = commands(paths, paths["image"], "{}")["predict gather"]
        args = [str(damaged) if a == paths["record"] else a for a in args]
        code, _, err = run_cli("predict", "gather", *args)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"unetflow predict gather: error: {damaged}: not a shard "
                              f"record"), err


def test_an_unknown_setting_is_one_line_naming_the_config_key(tmp_path):
    paths = existing(tmp_path)
    args, _ = commands(paths, paths["image"], json.dumps({"tile_shape": [64, 64],
                                                          "amp_dtype": "bfloat16"}))[
        "predict create"]
    code, _, err = run_cli("predict", "create", *args)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("unetflow predict create: error: config key 'predict': unknown key "
                          "'amp_dtype'. It was merged into amp"), err


def test_the_installed_command_prints_the_same_line(tmp_path):
    """What a user sees from the console script: one line on stderr, nothing on stdout."""
    args, _ = commands(existing(tmp_path), MISSING, SETTINGS)["normalize"]
    result = subprocess.run([str(UNETFLOW), "normalize", *args], capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"unetflow normalize: error: --image: {MISSING}: no such file or " \
                            f"directory; fix the path\n"
