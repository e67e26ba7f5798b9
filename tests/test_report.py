"""The user's view of a real run: a TIFF dataset converted on the way in, the summary table,
the figures, and one self-contained HTML report from `snakemake --report`."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import tifffile

from conftest import BIN, planned_jobs, snakemake, write_config
from unetflow.ome import open_image

pytestmark = pytest.mark.slow

METHOD_COLUMNS = ("foreground_iou", "foreground_dice", "precision", "recall", "f1", "mean_ap")


def export_demo_as_tiffs(workdir) -> None:
    """The demo test image as an OME-TIFF with its pixel size, its labels as a plain TIFF."""
    image = open_image(workdir / "data/demo/test_2d/image.ome.zarr")
    labels = open_image(workdir / "data/demo/test_2d/labels.ome.zarr")
    (workdir / "raw").mkdir()
    tifffile.imwrite(workdir / "raw/test.ome.tif", np.asarray(image.data[0]), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    tifffile.imwrite(workdir / "raw/test_labels.tif", np.asarray(labels.data[0]))


def summary_rows(workdir) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(workdir / "results/summary.tsv", newline="") as fh:
        return {(r["model"], r["dataset"], r["method"]): r
                for r in csv.DictReader(fh, delimiter="\t")}


def test_tiff_dataset_and_report_from_a_real_run(tiny_run_copy, tiny_config):
    workdir = tiny_run_copy
    export_demo_as_tiffs(workdir)
    tiny_config["datasets"]["te_tif"] = {"image": "raw/test.ome.tif",
                                         "target": "raw/test_labels.tif",
                                         "pixel_size": {"y": 0.5, "x": 0.5}}
    tiny_config["models"]["seg"]["predict_on"].append("te_tif")
    write_config(workdir, tiny_config)
    snakemake(workdir, "--cores", "2", "--configfile", "config.yaml")

    converted = open_image(workdir / "results/converted/te_tif/image.ome.zarr")
    assert converted.axes == ["c", "y", "x"] and converted.spatial_scale() == {"y": 0.5, "x": 0.5}
    prediction = open_image(workdir / "results/seg/predictions/te_tif.ome.zarr")
    assert prediction.spatial_scale() == {"y": 0.5, "x": 0.5}

    # The same pixels through the TIFF route score exactly as through the OME-Zarr route.
    rows = summary_rows(workdir)
    for method in ("unet", "otsu"):
        tif, zarr_route = rows[("seg", "te_tif", method)], rows[("seg", "te_seg", method)]
        assert [tif[c] for c in METHOD_COLUMNS] == [zarr_route[c] for c in METHOD_COLUMNS]
    assert rows[("seg", "te_tif", "otsu")]["mean_ap"] != ""
    assert {m for (model, _, m) in rows if model == "dn"} >= {"unet", "input"}
    assert any(m.startswith("gaussian(sigma=") for (_, _, m) in rows)
    metrics = json.loads((workdir / "results/seg/metrics/te_tif.json").read_text())
    assert set(metrics["scores"]["unet"]["instance_matching"]["ap_per_threshold"]) == {
        f"{0.5 + 0.05 * i:.2f}" for i in range(10)}

    shown = subprocess.run([str(BIN / "unetflow"), "show", "results/summary.tsv"], cwd=workdir,
                           capture_output=True, text=True, check=True).stdout
    assert "segmentation:" in shown and "regression:" in shown and "te_tif" in shown

    for figure in ("seg/figures/te_tif_montage.png", "seg/figures/te_seg_montage.png",
                   "dn/figures/te_dn_montage.png", "comparison.png", "summary.html"):
        assert (workdir / "results" / figure).stat().st_size > 1000, figure

    snakemake(workdir, "--configfile", "config.yaml", "--report", "report.html")
    html = (workdir / "report.html").read_text()
    for category in ("1. Summary", "2. Predictions", "3. Metrics in detail", "Training"):
        assert f'"{category}"' in html, category
    for name in ("te_tif_montage.png", "te_dn_montage.png", "comparison.png", "summary.html",
                 "summary.tsv", "loss_curve.png", "te_tif.json"):
        assert f'"filename": "{name}"' in html, name
    assert html.count("data:image/png") >= 6  # figures are embedded: one self-contained file
    assert "unetflow results" in html and "napari" in html  # the workflow description


def test_evaluate_settings_rerun_only_the_rules_that_use_them(tiny_run_copy, tiny_config):
    def planned_rules(config) -> set[str]:
        write_config(tiny_run_copy, config)
        result = snakemake(tiny_run_copy, "-n", "--cores", "2", "--configfile", "config.yaml")
        return {rule for rule, _ in planned_jobs(result.stdout + result.stderr)}

    assert planned_rules({**tiny_config, "evaluate": {"montage_crops": 2}}) == {"montage", "all"}
    assert planned_rules({**tiny_config, "evaluate": {"iou_threshold": 0.6}}) == {
        "evaluate", "summarize", "compare", "all"}
    for tuning in ({"gaussian_sigmas": [1.0]}, {"tv_weights": [1.0]}, {"nlm_strengths": [1.0]},
                   {"baselines": ["gaussian", "tv"]}):
        assert planned_rules({**tiny_config, "evaluate": tuning}) == {
            "tune_baseline", "evaluate", "summarize", "compare", "all"}, tuning
