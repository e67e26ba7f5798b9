"""Choosing montage crops and drawing their errors."""

import numpy as np

from unetflow.figures import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    HIT,
    candidate_crops,
    display_range,
    error_image,
    pick_crops,
    write_comparison,
)


def test_candidate_crops_tile_the_image_and_sample_planes():
    crops = candidate_crops((100, 64), 32)
    assert len(crops) == 3 * 2  # 100 // 32 rows, 64 // 32 columns
    assert crops[0] == (None, slice(0, 32), slice(0, 32))
    stack = candidate_crops((20, 64, 64), 64, planes=5)
    assert [c[0] for c in stack] == [0, 5, 10, 14, 19]
    assert candidate_crops((10, 12), 64) == [(None, slice(0, 10), slice(0, 12))]


def test_pick_crops_runs_from_best_to_worst():
    error = np.zeros((64, 64))
    error[32:, 32:] = 1.0  # the bottom-right crop is all wrong
    error[:32, 32:] = 0.25
    crops = pick_crops(error, candidate_crops(error.shape, 32), 3)
    # four crops with errors 0, 0.25, 0, 1: ranks 0, 2, 3 of the sorted errors
    assert [e for _, e in crops] == [0.0, 0.25, 1.0]
    assert crops[-1][0] == (None, slice(32, 64), slice(32, 64))


def test_pick_crops_prefers_crops_that_show_objects():
    error = np.zeros((64, 64))
    objects = np.zeros((64, 64), bool)
    objects[40:44, 8:12] = True  # only the bottom-left crop has an object
    crops = pick_crops(error, candidate_crops(error.shape, 32), 3, objects)
    assert [c for c, _ in crops] == [(None, slice(32, 64), slice(0, 32))]


def test_display_range_from_normalization_statistics():
    stats = {"channels": [{"percentiles": {"1.0": -2.0, "99.8": 30.0}}]}
    assert display_range(stats) == (-2.0, 30.0)
    flat = {"channels": [{"percentiles": {"1.0": 5.0, "99.8": 5.0}}]}
    assert display_range(flat) == (5.0, 6.0)


def test_error_image_colours():
    pred = np.array([[True, True, False, False]])
    true = np.array([[True, False, True, False]])
    rgb = error_image(pred, true, np.ones_like(pred))
    assert tuple(rgb[0, 0]) == HIT
    assert tuple(rgb[0, 1]) == FALSE_POSITIVE
    assert tuple(rgb[0, 2]) == FALSE_NEGATIVE
    assert tuple(rgb[0, 3]) == (0, 0, 0)


def test_comparison_chart_is_a_png_written_atomically(tmp_path):
    summary = tmp_path / "summary.tsv"
    summary.write_text("model\tdataset\ttask\tmethod\tforeground_iou\tmean_ap\n"
                       "m\td\tsegmentation\tunet\t0.9\t0.5\n"
                       "m\td\tsegmentation\totsu\t0.6\t0.1\n")
    output = tmp_path / "figures" / "comparison.png"
    write_comparison(str(summary), str(output))
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in output.parent.iterdir()] == ["comparison.png"]  # no temporary
