"""No result that is wrong can look complete, and warnings that change what a result means
reach the terminal and the report (issue 16, items 3 and 4).

Real stores of the completed tiny run (conftest), real `unetflow` stages and one real
Snakemake run of a config whose images are all zero.
"""

from __future__ import annotations

import json
import shutil
import time
from html import escape
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_CONFIG, run_cli, snakemake, write_config
from test_bad_input import assert_cli_error, normalize_cli, write_2d
from unetflow import notices
from unetflow.evaluate import verdicts, write_summary, write_summary_html
from unetflow.ome import open_image


def _rows(unet: dict, **baselines: dict) -> list[dict]:
    rows = [{"model": "m", "dataset": "d", "task": "segmentation", "method": "unet", **unet}]
    rows += [{"model": "m", "dataset": "d", "task": "segmentation", "method": name, **scores}
             for name, scores in baselines.items()]
    return rows


ZERO = {"foreground_iou": "0.0000", "foreground_dice": "0.0000", "f1": "0.0000"}


# --- verdicts -----------------------------------------------------------------------------
def test_a_model_that_only_ties_a_baseline_is_no_better_than_it():
    assert verdicts(_rows(ZERO, otsu=ZERO)) == [
        "m on d: no better than otsu - equal on every score "
        "(foreground_iou, foreground_dice, f1)."]


def test_ahead_on_one_score_and_equal_on_the_rest_is_better():
    unet = {**ZERO, "f1": "0.5000"}
    assert verdicts(_rows(unet, otsu=ZERO)) == [
        "m on d: better than every baseline on foreground_iou, foreground_dice, f1."]


def test_behind_any_baseline_on_any_score_is_not_better():
    unet = {**ZERO, "f1": "0.5000"}
    otsu = {**ZERO, "foreground_iou": "0.1000"}
    assert verdicts(_rows(unet, otsu=otsu)) == [
        "m on d: NOT better than otsu (behind on foreground_iou)."]


def test_undefined_scores_are_neither_a_win_nor_a_tie():
    nan = {"foreground_iou": "nan", "foreground_dice": "nan", "f1": "nan"}
    assert verdicts(_rows(nan, otsu=ZERO)) == [
        "m on d: cannot be compared with the baselines: no score is defined."]
    # a score the baseline lacks is not compared; the rest decide
    assert verdicts(_rows({**ZERO, "f1": "0.3000"}, otsu={**ZERO, "f1": "nan"})) == [
        "m on d: no better than otsu - equal on every score "
        "(foreground_iou, foreground_dice, f1)."]


# --- statistics -----------------------------------------------------------------------------
def test_statistics_that_overflow_fail_normalization_and_write_nothing(tmp_path):
    values = np.full((32, 32), 1e300)
    values[::2] = -1e300
    image = write_2d(tmp_path / "huge.ome.zarr", values)
    out = tmp_path / "stats.json"
    result = normalize_cli(image, out)
    assert_cli_error(result, "normalize", "dataset 'd'", "not finite", "std inf",
                     "rescale the image", str(out))
    assert not out.exists()


def test_statistics_record_the_warnings_said_while_computing_them(tmp_path):
    image = write_2d(tmp_path / "flat.ome.zarr", np.full((32, 32), 7.0, np.float32))
    out = tmp_path / "stats.json"
    result = normalize_cli(image, out)
    assert result.returncode == 0, result.stderr
    assert "unetflow normalize: warning: dataset 'd' channel 0 of" in result.stderr
    stats = json.loads(out.read_text())
    assert len(stats["warnings"]) == 1 and "is constant (7)" in stats["warnings"][0]


# --- checkpoint task and SHA-256 ------------------------------------------------------------
def _predict_create(run: Path, checkpoint: str, task: str, out: Path):
    return run_cli("predict", "create", "--checkpoint", checkpoint, "--task", task,
                   "--image", str(run / TINY_CONFIG["datasets"]["te_seg"]["image"]),
                   "--settings", json.dumps(TINY_CONFIG["predict"]), "--output", str(out))


def test_a_checkpoint_of_another_task_is_refused_before_any_tile(completed_tiny_run, tmp_path):
    regression = str(completed_tiny_run / "results/dn/checkpoint_best.pt")
    out = tmp_path / "raw.zarr"
    result = _predict_create(completed_tiny_run, regression, "segmentation", out)
    assert_cli_error(result, "predict create", regression, "holds a regression model",
                     "task: segmentation")
    assert not out.exists()
    segmentation = str(completed_tiny_run / "results/seg/checkpoint_best.pt")
    assert _predict_create(completed_tiny_run, segmentation, "segmentation", out).returncode == 0


def test_the_prediction_store_records_the_checkpoint_task_and_sha256(completed_tiny_run):
    from unetflow.files import file_sha256

    for model, dataset in (("seg", "te_seg"), ("dn", "te_dn")):
        store = completed_tiny_run / f"results/{model}/predictions/{dataset}.ome.zarr"
        record = open_image(store).attrs["unetflow"]
        assert record["task"] == TINY_CONFIG["models"][model]["task"]
        assert record["checkpoint_sha256"] == file_sha256(
            completed_tiny_run / f"results/{model}/checkpoint_best.pt")


def _evaluate(run: Path, model: str, dataset: str, task: str, out: Path, *extra: str):
    spec = TINY_CONFIG["datasets"][dataset]
    return run_cli("evaluate", "--prediction",
                   str(run / f"results/{model}/predictions/{dataset}.ome.zarr"),
                   "--image", str(run / spec["image"]), "--target", str(run / spec["target"]),
                   "--task", task, "--settings", "{}", "--model", model, "--dataset", dataset,
                   "--output", str(out), *extra)


def test_evaluate_refuses_a_store_of_another_task_or_another_checkpoint(completed_tiny_run,
                                                                         tmp_path):
    out = tmp_path / "metrics.json"
    result = _evaluate(completed_tiny_run, "dn", "te_dn", "segmentation", out)
    assert_cli_error(result, "evaluate", "te_dn.ome.zarr", "predicted by a regression model",
                     "task: segmentation", "delete it and run Snakemake again")
    other = str(completed_tiny_run / "results/seg/checkpoint_best.pt")
    result = _evaluate(completed_tiny_run, "dn", "te_dn", "regression", out,
                       "--checkpoint", other)
    assert_cli_error(result, "evaluate", "predicted with the checkpoint of SHA-256",
                     "predict with the current checkpoint")
    assert not out.exists()
    own = str(completed_tiny_run / "results/dn/checkpoint_best.pt")
    result = _evaluate(completed_tiny_run, "dn", "te_dn", "regression", out, "--checkpoint", own)
    assert result.returncode == 0, result.stderr


def test_the_montage_refuses_a_store_of_another_task(completed_tiny_run, tmp_path):
    spec = TINY_CONFIG["datasets"]["te_dn"]
    out = tmp_path / "montage.png"
    result = run_cli(
        "montage", "--prediction",
        str(completed_tiny_run / "results/dn/predictions/te_dn.ome.zarr"),
        "--image", str(completed_tiny_run / spec["image"]),
        "--target", str(completed_tiny_run / spec["target"]),
        "--stats", str(completed_tiny_run / "results/normalization/te_dn.json"),
        "--task", "segmentation", "--settings", "{}", "--output", str(out))
    assert_cli_error(result, "montage", "predicted by a regression model")
    assert not out.exists()


def test_a_store_without_provenance_is_refused(completed_tiny_run, tmp_path):
    import zarr

    store = tmp_path / "results/seg/predictions/te_seg.ome.zarr"
    shutil.copytree(completed_tiny_run / "results/seg/predictions/te_seg.ome.zarr", store)
    group = zarr.open_group(str(store), mode="r+")
    record = dict(group.attrs["unetflow"])
    del record["checkpoint_sha256"]
    group.attrs["unetflow"] = record
    for name in ("data",):
        (tmp_path / name).symlink_to(completed_tiny_run / name)
    result = _evaluate(tmp_path, "seg", "te_seg", "segmentation", tmp_path / "m.json")
    assert_cli_error(result, "evaluate", "records no task and checkpoint SHA-256")


# --- warnings reach the terminal and the report ---------------------------------------------
def test_job_warnings_are_read_back_once_from_the_logs_of_this_run(tmp_path):
    old = tmp_path / "logs/normalize/a.log"
    old.parent.mkdir(parents=True)
    old.write_text("unetflow normalize: warning: from an earlier run\n")
    started = time.time() + 1
    new = tmp_path / "logs/evaluate/m/a.log"
    new.parent.mkdir(parents=True)
    new.write_text("evaluate: ok\nunetflow evaluate: warning: the target is constant\n"
                   "unetflow evaluate: warning: the target is constant\n")
    other = tmp_path / "logs/evaluate/m/b.log"
    other.write_text("unetflow evaluate: warning: the target is constant\n")
    import os

    for path in (new, other):
        os.utime(path, (started + 1, started + 1))
    assert notices.job_warnings(tmp_path / "logs", started) == [
        f"{new}: unetflow evaluate: the target is constant"]


def test_the_summary_page_lists_the_warnings_recorded_with_the_scores(tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({
        "model": "m", "dataset": "d", "task": "segmentation",
        "scores": {"unet": {"foreground_iou": 0.0}, "otsu": {"foreground_iou": 0.0}},
        "warnings": ["channel 0 of x is constant", "channel 0 of x is constant"]}))
    rows = write_summary([str(metrics)], str(tmp_path / "s.tsv"))
    result = run_cli("summarize", "--output", str(tmp_path / "s2.tsv"),
                     "--html", str(tmp_path / "s.html"), str(metrics))
    assert result.returncode == 0, result.stderr
    assert "warning: m on d: channel 0 of x is constant" in result.stdout
    assert "no better than otsu" in result.stdout
    page = (tmp_path / "s.html").read_text()
    assert page.count("m on d: channel 0 of x is constant") == 1
    write_summary_html(rows, str(tmp_path / "t.html"))
    assert "Warnings" not in (tmp_path / "t.html").read_text()


@pytest.fixture(scope="module")
def all_zero_run(tmp_path_factory) -> tuple[Path, str]:
    """A real run whose training and test images are all zero (labels are real)."""
    workdir = tmp_path_factory.mktemp("all_zero")
    from unetflow.demo import synthesize_nuclei

    labels = synthesize_nuclei((96, 96), seed=2).labels.astype(np.uint16)
    write_2d(workdir / "zero.ome.zarr", np.zeros((96, 96), np.float32))
    write_2d(workdir / "labels.ome.zarr", labels)
    config = {
        "datasets": {"z": {"image": "zero.ome.zarr", "target": "labels.ome.zarr"}},
        "models": {"seg": {"task": "segmentation", "train_on": ["z"], "predict_on": ["z"]}},
        "patches": {"shape": [32, 32], "per_dataset": 8},
        "model": TINY_CONFIG["model"], "train": TINY_CONFIG["train"],
        "predict": {"tile_shape": [64, 64], "pyramid_levels": 1},
        "evaluate": {"montage_crops": 2, "montage_crop_size": 32},
    }
    write_config(workdir, config)
    result = snakemake(workdir, "--cores", "2", "--configfile", "config.yaml")
    return workdir, result.stdout + result.stderr


def test_an_all_zero_run_says_no_better_and_its_warnings_reach_terminal_and_report(
        all_zero_run):
    workdir, terminal = all_zero_run
    constant = "dataset 'z' channel 0 of zero.ome.zarr is constant (0)"
    # the terminal: repeated from the job log when the run ends
    assert "unetflow warning: logs/normalize/z.log: unetflow normalize: " + constant in terminal
    metrics = json.loads((workdir / "results/seg/metrics/z.json").read_text())
    assert any(constant in w for w in metrics["warnings"]), metrics["warnings"]
    summary = (workdir / "logs/summarize.log").read_text()
    assert "seg on z: no better than otsu" in summary
    assert "better than every baseline" not in summary
    page = (workdir / "results/summary.html").read_text()
    assert "Warnings that change what these scores mean" in page and escape(constant) in page
    assert yaml.safe_load((workdir / "config.yaml").read_text())  # the config ran as written


@pytest.mark.parametrize("content", ["{not json", "{}", '{"sigma": "NaN"}', "[1, 2]",
                                     '{"baselines": {"tv": {"weight": "NaN"}}, '
                                     '"noise_sd": [1.0]}',
                                     '{"baselines": {"tv": {"weight": 1}}, "noise_sd": [0]}'])
def test_a_damaged_baseline_file_is_named_in_one_line(completed_tiny_run, tmp_path, content):
    baseline = tmp_path / "baselines.json"
    baseline.write_text(content)
    out = tmp_path / "metrics.json"
    result = _evaluate(completed_tiny_run, "dn", "te_dn", "regression", out,
                       "--baseline", str(baseline))
    assert_cli_error(result, "evaluate", str(baseline), "delete it and run Snakemake again")
    assert not out.exists()


def test_a_complex_image_is_refused_at_planning_not_read_as_its_real_part(tmp_path):
    from test_bad_input import dag_problem, data_config

    image = write_2d(tmp_path / "complex.ome.zarr",
                     (np.ones((64, 64)) * (1 + 2j)).astype(np.complex64))
    labels = write_2d(tmp_path / "labels.ome.zarr", np.ones((64, 64), np.uint16))
    dag_problem(data_config(image, labels), "config key 'datasets.d.image'",
                "dtype complex64 is not a real number type", "write its magnitude")
    result = normalize_cli(image, tmp_path / "stats.json")
    assert_cli_error(result, "normalize", "dtype complex64 is not a real number type")
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("model, dataset, target, said", [
    ("seg", "te_seg", np.zeros((192, 192), np.uint16), "the target has no foreground pixel"),
    ("dn", "te_dn", np.full((192, 192), 3.0, np.float32), "the target is constant"),
])
def test_a_target_that_scores_cannot_speak_about_is_warned_and_recorded(
        completed_tiny_run, tmp_path, model, dataset, target, said):
    flat = write_2d(tmp_path / "target.ome.zarr", target)
    out = tmp_path / "metrics.json"
    spec = TINY_CONFIG["datasets"][dataset]
    result = run_cli("evaluate", "--prediction",
                     str(completed_tiny_run / f"results/{model}/predictions/{dataset}.ome.zarr"),
                     "--image", str(completed_tiny_run / spec["image"]), "--target", flat,
                     "--task", TINY_CONFIG["models"][model]["task"], "--settings", "{}",
                     "--model", model, "--dataset", dataset, "--output", str(out))
    assert result.returncode == 0, result.stderr
    where = f"model '{model}', dataset '{dataset}': {said}"
    assert f"unetflow evaluate: warning: {where}" in result.stderr
    assert any(w.startswith(where) for w in json.loads(out.read_text())["warnings"])
