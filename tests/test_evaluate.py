"""The evaluate stage on real OME-Zarr stores: scores, baselines, ignore_label, summary."""

import json
import math

import numpy as np
import pytest

from unetflow.evaluate import (
    evaluate_prediction,
    format_table,
    read_summary,
    tune_gaussian_baseline,
    write_summary,
    write_summary_html,
)
from unetflow.metrics import gaussian_smooth
from unetflow.ome import write_image, write_label_image

SEG_SETTINGS = {"ignore_label": None, "iou_threshold": 0.5}
AXES = ["c", "y", "x"]


def nuclei_labels() -> np.ndarray:
    """Four separate square objects on a 48 x 48 image."""
    labels = np.zeros((48, 48), np.uint16)
    for i, (y, x) in enumerate([(4, 4), (4, 28), (28, 4), (28, 28)], start=1):
        labels[y:y + 12, x:x + 12] = i
    return labels


def write_prediction(path, labels=None, image=None, predict=None):
    """A store shaped like predict's output, with its provenance."""
    provenance = {"predict": {"level": 0, "instances": True, "probabilities": False,
                              "output_units": "input", **(predict or {})},
                  "task": "segmentation" if labels is not None else "regression",
                  "checkpoint_sha256": "0" * 64}
    data = image if image is not None else labels[None].astype(np.uint32)
    write_image(path, data, AXES, attrs=provenance)
    if labels is not None:
        write_label_image(path, "prediction", labels.astype(np.uint32), AXES[1:])
    return str(path)


@pytest.fixture
def seg_case(tmp_path):
    truth = nuclei_labels()
    rng = np.random.default_rng(0)
    image = (truth > 0) * 10.0 + rng.uniform(0, 1, truth.shape)  # Otsu separates it exactly
    write_image(tmp_path / "image.ome.zarr", image[None].astype(np.float32), AXES)
    write_image(tmp_path / "target.ome.zarr", truth[None], AXES)
    return tmp_path, truth


def run_segmentation(tmp_path, pred_labels, settings=SEG_SETTINGS, num_classes=2):
    pred = write_prediction(tmp_path / "pred.ome.zarr", pred_labels)
    out = tmp_path / "metrics" / "seg.json"
    record = evaluate_prediction(pred, str(tmp_path / "image.ome.zarr"),
                                 str(tmp_path / "target.ome.zarr"), "segmentation", settings,
                                 num_classes, None, "m", "d", str(out))
    assert json.loads(out.read_text())["scores"] == record["scores"]
    return record


def test_segmentation_scores_model_and_otsu_baseline(seg_case):
    tmp_path, truth = seg_case
    pred = truth.copy()
    pred[pred == 4] = 0  # one object missed
    record = run_segmentation(tmp_path, pred)
    unet, otsu = record["scores"]["unet"], record["scores"]["otsu"]
    assert record["instance_target"] is True
    assert (unet["instance_matching"]["tp"], unet["instance_matching"]["fn"]) == (3, 1)
    assert unet["precision"] == 1.0 and unet["recall"] == pytest.approx(0.75)
    assert unet["mean_ap"] == pytest.approx(0.75)  # TP/(TP+FP+FN) = 3/4 at every threshold
    assert unet["foreground_iou"] == pytest.approx(3 / 4)  # 3 of 4 equal squares
    assert otsu["mean_ap"] == 1.0 and otsu["foreground_dice"] == 1.0
    assert "mean_ap" in record["definitions"]


def test_ignored_pixels_are_left_out(seg_case):
    tmp_path, truth = seg_case
    target = truth.copy()
    target[40:48, 40:48] = 99  # an unannotated corner
    write_image(tmp_path / "target.ome.zarr", target[None], AXES)
    pred = truth.copy()
    pred[42:47, 42:47] = 7  # a false object, but only in the unannotated corner
    record = run_segmentation(tmp_path, pred, {"ignore_label": 99, "iou_threshold": 0.5})
    assert record["excluded_pixels"] == 64
    assert record["scores"]["unet"]["instance_matching"]["fp"] == 0
    assert record["scores"]["unet"]["mean_ap"] == 1.0
    without = run_segmentation(tmp_path, pred, SEG_SETTINGS)
    assert without["scores"]["unet"]["mean_ap"] < 1.0


def test_semantic_target_skips_instance_metrics(tmp_path):
    classes = (nuclei_labels() > 0).astype(np.uint8)
    write_image(tmp_path / "image.ome.zarr", classes[None].astype(np.float32) * 5, AXES)
    write_image(tmp_path / "target.ome.zarr", classes[None], AXES)
    record = run_segmentation(tmp_path, classes)
    assert record["instance_target"] is False
    assert "mean_ap" not in record["scores"]["unet"]
    assert record["scores"]["unet"]["iou_class_1"] == 1.0
    assert any("instance metrics skipped" in n for n in record["notes"])


def test_regression_against_input_and_tuned_gaussian(tmp_path):
    rng = np.random.default_rng(1)
    clean = gaussian_smooth(rng.uniform(0, 10, (1, 40, 40)), 2.0)
    noisy = (clean + rng.normal(0, 1, clean.shape)).astype(np.float32)
    write_image(tmp_path / "image.ome.zarr", noisy, AXES)
    write_image(tmp_path / "target.ome.zarr", clean, AXES)
    pred = write_prediction(tmp_path / "pred.ome.zarr", image=clean.copy())
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"sigma": 1.0}))
    out = tmp_path / "reg.json"
    record = evaluate_prediction(pred, str(tmp_path / "image.ome.zarr"),
                                 str(tmp_path / "target.ome.zarr"), "regression", SEG_SETTINGS,
                                 2, None, "m", "d", str(out), baseline=str(baseline))
    scores = record["scores"]
    assert scores["unet"]["psnr"] == math.inf and scores["unet"]["mae"] == 0.0
    assert json.loads(out.read_text())["scores"]["unet"]["psnr"] == "inf"  # standard JSON
    assert scores["gaussian"]["sigma"] == 1.0
    assert scores["gaussian"]["psnr"] > scores["input"]["psnr"]  # smoothing removes noise
    expected_range = float(clean.max() - clean.min())
    assert scores["input"]["data_range"] == pytest.approx(expected_range)


def test_prediction_of_other_shape_is_refused(seg_case):
    tmp_path, truth = seg_case
    with pytest.raises(ValueError, match="must cover the same pixels"):
        run_segmentation(tmp_path, truth[:40, :40])


def test_tune_gaussian_baseline_on_stores(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (1, 64, 64)).astype(np.float32)
    write_image(tmp_path / "image.ome.zarr", image, AXES)
    write_image(tmp_path / "target.ome.zarr", gaussian_smooth(image, 2.0), AXES)
    datasets = [{"name": "tr", "image": str(tmp_path / "image.ome.zarr"),
                 "target": str(tmp_path / "target.ome.zarr"), "channels": None}]
    settings = {"gaussian_sigmas": [1.0, 2.0, 3.0], "tuning_crops": 3, "tuning_crop_size": 64}
    result = tune_gaussian_baseline(datasets, settings, str(tmp_path / "b.json"))
    assert result["sigma"] == 2.0 and result["crops"] == 1  # the crop is the whole image
    assert json.loads((tmp_path / "b.json").read_text())["sigma"] == 2.0


def test_summary_tsv_table_and_html(tmp_path):
    seg = {"model": "s", "dataset": "d1", "task": "segmentation",
           "scores": {"unet": {"foreground_iou": 0.9, "mean_ap": 0.5, "f1": 0.7},
                      "otsu": {"foreground_iou": 0.6, "mean_ap": 0.1, "f1": 0.2,
                               "precision": None}}}
    reg = {"model": "r", "dataset": "d2", "task": "regression",
           "scores": {"unet": {"psnr": "inf", "ssim": 1.0, "mae": 0.0, "pearson_r": 0.95},
                      "gaussian": {"psnr": 30.0, "ssim": 0.9, "mae": 0.1, "sigma": 1.5,
                                   "pearson_r": 0.99}}}
    files = []
    for i, record in enumerate((seg, reg)):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(record))
        files.append(str(path))
    rows = write_summary(files, str(tmp_path / "summary.tsv"))
    assert read_summary(str(tmp_path / "summary.tsv")) == rows
    assert [r["method"] for r in rows] == ["unet", "otsu", "unet", "gaussian(sigma=1.5)"]
    assert rows[0]["mean_ap"] == "0.5000" and rows[0]["psnr"] == ""
    assert rows[1]["precision"] == ""  # None (undefined) stays an empty cell
    assert rows[2]["psnr"] == "inf" and rows[2]["pearson_r"] == "0.9500"
    table = format_table(rows)
    seg_part, reg_part, said = table.split("\n\n")
    assert said.splitlines() == [
        "s on d1: better than every baseline on foreground_iou, f1, mean_ap.",
        "r on d2: NOT better than every baseline - behind gaussian(sigma=1.5) on pearson_r."]
    assert "psnr" not in seg_part and "mean_ap" in seg_part
    assert "mean_ap" not in reg_part and "gaussian(sigma=1.5)" in reg_part
    write_summary_html(rows, str(tmp_path / "summary.html"))
    html = (tmp_path / "summary.html").read_text()
    assert "<b>0.9000</b>" in html and "<b>0.6000</b>" not in html  # best IoU marked
    assert "<b>0.0000</b>" in html  # lowest MAE marked
    assert "<li>r on d2: NOT better than every baseline" in html
    assert not list(tmp_path.glob("*.tmp"))  # files.atomic_path's temporaries are gone
