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
    plate_grid,
    write_comparison,
    write_plate_map,
    write_position_strip,
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


ROWS96, COLUMNS96 = list("ABCDEFGH"), [str(c) for c in range(1, 13)]


def test_plate_grid_puts_each_well_at_its_row_and_column():
    grid, selected = plate_grid({("A", "1"): 0.5, ("H", "12"): 0.25, ("C", "4"): None},
                                ROWS96, COLUMNS96)
    assert grid.shape == (8, 12) and selected.sum() == 3
    assert grid[0, 0] == 0.5 and grid[7, 11] == 0.25
    assert selected[2, 3] and np.isnan(grid[2, 3])  # selected, no value: "n/a"
    assert np.isnan(grid[~selected]).all()  # unselected wells are blank


def test_plate_map_is_a_png_of_the_whole_plate(tmp_path):
    from matplotlib.image import imread

    values = {(r, c): 20.0 + i for i, (r, c) in enumerate((r, c) for r in ROWS96[:2]
                                                          for c in COLUMNS96)}
    values[("B", "12")] = float("inf")  # a perfect PSNR: drawn at the top of the scale
    output = tmp_path / "map.png"
    grid = write_plate_map(values, ROWS96, COLUMNS96, "psnr", "psnr per well", str(output))
    assert grid.shape == (8, 12) and np.isinf(grid[1, 11]) and np.isnan(grid[2:]).all()
    image = imread(output)
    assert image.shape[1] > image.shape[0] > 100  # a plate is wider than tall
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_position_strip_orders_images_worst_first(tmp_path):
    order = write_position_strip({"a": 0.9, "b": 0.2, "c": None, "d": 0.5}, "foreground_iou",
                                 "t", str(tmp_path / "strip.png"))
    assert order == ["b", "d", "a"]
    assert write_position_strip({"a": 1.0, "b": 3.0}, "mae", "t",
                                str(tmp_path / "mae.png")) == ["b", "a"]
    many = {f"img{i:03d}": float(i) for i in range(100)}
    assert write_position_strip(many, "psnr", "t", str(tmp_path / "many.png"))[:2] == [
        "img000", "img001"]
    assert (tmp_path / "many.png").read_bytes().startswith(b"\x89PNG")
