"""The whole workflow runs for real on tiny data, and only stale stages rerun after an edit.

Each edit is checked with a real dry run against the metadata of a real completed run: the
jobs Snakemake plans are exactly those whose inputs or params changed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import zarr

from conftest import planned_jobs, snakemake, write_config
from unetflow.ome import open_image

pytestmark = pytest.mark.slow
# Figures redrawn whenever a prediction changes: the montage of it and the comparison chart.
REPORT_RULES = {"montage", "compare"}
# A prediction is three rules: create the raw store, predict its shards, gather (predict.smk).
PREDICT_RULES = {"predict_create", "predict_shard", "predict"}


def dry_run(workdir, config) -> set[tuple[str, str]]:
    write_config(workdir, config)
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml")
    return planned_jobs(result.stdout + result.stderr)


def rules_of(jobs) -> set[str]:
    return {rule for rule, _ in jobs}


def test_complete_run_leaves_nothing_to_do(completed_tiny_run, tiny_config):
    assert dry_run(completed_tiny_run, tiny_config) == set()


def test_complete_run_writes_the_documented_results(completed_tiny_run):
    results = completed_tiny_run / "results"
    for model in ("seg", "dn"):
        for name in ("checkpoint_best.pt", "checkpoint_last.pt", "training_log.csv",
                     "loss_curve.png", "patches_manifest.tsv"):
            assert (results / model / name).is_file(), name
    metrics = json.loads((results / "seg" / "metrics" / "te_seg.json").read_text())
    assert metrics["model"] == "seg" and metrics["dataset"] == "te_seg"
    assert (results / "summary.tsv").read_text().count("\n") >= 5


def test_predictions_validate_as_ome_zarr(completed_tiny_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    for model, dataset in (("seg", "te_seg"), ("dn", "te_dn")):
        path = completed_tiny_run / "results" / model / "predictions" / f"{dataset}.ome.zarr"
        open_ome_zarr(zarr.open_group(str(path), mode="r"))
        nodes = list(Reader(parse_url(str(path)))())
        assert nodes and nodes[0].data[0].shape[-2:] == (192, 192)


def test_editing_predict_reruns_predict_and_evaluate_only(tiny_run_copy, tiny_config):
    tiny_config["predict"]["tile_shape"] = [32, 32]
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert rules_of(jobs) == PREDICT_RULES | {"evaluate", "summarize", "all"} | REPORT_RULES
    assert ("predict", "model=seg, dataset=te_seg") in jobs
    assert ("predict", "model=dn, dataset=te_dn") in jobs


def test_editing_train_reruns_from_train_on(tiny_run_copy, tiny_config):
    tiny_config["train"]["steps"] = 5
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert rules_of(jobs) == PREDICT_RULES | {"train", "evaluate", "summarize",
                                              "all"} | REPORT_RULES


def test_editing_patches_reruns_from_extract_patches_on(tiny_run_copy, tiny_config):
    tiny_config["patches"]["per_dataset"] = 12
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert rules_of(jobs) == PREDICT_RULES | {"extract_patches", "train", "evaluate",
                                              "summarize", "all"} | REPORT_RULES


def test_adding_a_prediction_dataset_runs_only_its_jobs(tiny_run_copy, tiny_config):
    tiny_config["datasets"]["extra_seg"] = {"image": "data/demo/train_2d/image.ome.zarr",
                                            "target": "data/demo/train_2d/labels.ome.zarr"}
    tiny_config["models"]["seg"]["predict_on"].append("extra_seg")
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert jobs == {("normalize", "dataset=extra_seg"),
                    ("predict_create", "model=seg, dataset=extra_seg"),
                    ("predict_shard", "model=seg, dataset=extra_seg, shard=0"),
                    ("predict", "model=seg, dataset=extra_seg"),
                    ("evaluate", "model=seg, dataset=extra_seg"),
                    ("montage", "model=seg, dataset=extra_seg"), ("compare", ""),
                    ("summarize", ""), ("all", "")}


def test_a_model_override_touches_only_that_model(tiny_run_copy, tiny_config):
    tiny_config["models"]["dn"]["train"] = {"steps": 5}
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert {w for _, w in jobs if w} == {"model=dn", "model=dn, dataset=te_dn",
                                         "model=dn, dataset=te_dn, shard=0"}
    assert rules_of(jobs) == PREDICT_RULES | {"train", "evaluate", "summarize",
                                              "all"} | REPORT_RULES


# --- settings of how a stage runs rerun nothing (config.EXECUTION_KEYS) ---------------------
@pytest.mark.parametrize("section, key, value", [
    ("train", "device", "cpu"),
    ("train", "amp", False),  # the trainer would resume its saved state at the last step
    ("train", "compile", True),
    ("train", "num_workers", 2),
    ("train", "threads", 1),
    ("train", "deterministic", True),
    ("predict", "device", "cuda"),  # not even one that could not run here
    ("predict", "threads", 1),
    ("predict", "dask_workers", 3),
    ("predict", "batch_size", 4),
], ids=lambda v: str(v))
def test_editing_how_a_stage_runs_reruns_nothing(tiny_run_copy, tiny_config, section, key,
                                                 value):
    assert tiny_config.get(section, {}).get(key) != value
    tiny_config.setdefault(section, {})[key] = value
    assert dry_run(tiny_run_copy, tiny_config) == set()


def test_editing_normalization_statistics_reruns_from_normalize_on(tiny_run_copy, tiny_config):
    tiny_config["normalize"] = {"percentiles": [2.0, 99.5]}
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert {w for r, w in jobs if r == "normalize"} == {f"dataset={d}" for d in
                                                        ("tr_seg", "te_seg", "tr_dn", "te_dn")}
    assert rules_of(jobs) == PREDICT_RULES | {"normalize", "extract_patches", "train",
                                              "evaluate", "summarize", "all"} | REPORT_RULES


def test_editing_how_predictions_are_written_reruns_the_gather_on(tiny_run_copy, tiny_config):
    """Output keys (config.PREDICT_OUTPUT_KEYS) are not params of the tile steps. After a
    complete run the raw store, a temp() output, is gone, so the tile steps make it again;
    while it is there with its shards (as after a gather that failed), only the gather
    reruns."""
    tiny_config["predict"]["pyramid_levels"] = 1
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert rules_of(jobs) == PREDICT_RULES | {"evaluate", "summarize", "all"} | REPORT_RULES
    write_config(tiny_run_copy, tiny_config)
    shard = "results/seg/predictions/te_seg.shards/shard_0.json"  # with its raw store kept
    (tiny_run_copy / shard).unlink()
    snakemake(tiny_run_copy, shard, "--notemp", "--cores", "2", "--configfile", "config.yaml")
    result = snakemake(tiny_run_copy, "results/seg/predictions/te_seg.ome.zarr", "-n",
                       "--cores", "2", "--configfile", "config.yaml")
    assert planned_jobs(result.stdout + result.stderr) == {
        ("predict", "model=seg, dataset=te_seg")}


def test_editing_predict_amp_reruns_prediction(tiny_run_copy, tiny_config):
    """AMP is on the results side for prediction: on a GPU it changes outputs by bf16/fp16
    rounding (config.EXECUTION_KEYS says why)."""
    tiny_config["predict"]["amp"] = False
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert rules_of(jobs) == PREDICT_RULES | {"evaluate", "summarize", "all"} | REPORT_RULES


def test_editing_evaluation_reruns_evaluate_only(tiny_run_copy, tiny_config):
    tiny_config["evaluate"] = {"iou_threshold": 0.7}
    jobs = dry_run(tiny_run_copy, tiny_config)
    assert jobs == {("evaluate", "model=seg, dataset=te_seg"),
                    ("evaluate", "model=dn, dataset=te_dn"), ("summarize", ""),
                    ("compare", ""), ("all", "")}


# --- predict.device: only the shard step uses a device ----------------------------------------
def test_create_and_gather_run_without_the_gpu_that_predict_device_asks_for(
        tiny_run_copy, tiny_config):
    """With predict.device: cuda on this GPU-less machine, predict_create and the gather
    succeed (they never load the network), and predict_shard fails with one line naming
    predict.device. The shard then runs with device cpu, and the gather with cuda again:
    editing the device reran nothing on the way."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    work, folder = tiny_run_copy, "results/seg/predictions"
    raw, shard, store = (f"{folder}/te_seg.shards/raw.zarr",
                         f"{folder}/te_seg.shards/shard_0.json", f"{folder}/te_seg.ome.zarr")
    shutil.rmtree(work / store)
    (work / shard).unlink()
    on_gpu = {**tiny_config, "predict": {**tiny_config["predict"], "device": "cuda"}}
    write_config(work, on_gpu)
    options = ("--cores", "2", "--configfile", "config.yaml")
    snakemake(work, raw, *options, "--notemp")
    assert (work / raw).is_dir()
    failed = snakemake(work, shard, *options, "--notemp", check=False)
    assert failed.returncode != 0 and not (work / shard).exists()
    log = (work / "logs/predict/seg/te_seg.shard_0.log").read_text()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, log
    assert errors[0].startswith("unetflow predict shard: error: predict.device is 'cuda' but "
                                "no usable CUDA GPU is available"), log
    assert errors[0].endswith("set predict.device: auto to fall back to the CPU"), log
    write_config(work, {**tiny_config, "predict": {**tiny_config["predict"], "device": "cpu"}})
    snakemake(work, shard, *options, "--notemp")
    write_config(work, on_gpu)
    gathered = snakemake(work, store, *options)
    assert {r for r, _ in planned_jobs(gathered.stdout + gathered.stderr)} == {"predict"}
    assert open_image(work / store).data.shape[-2:] == (192, 192)
