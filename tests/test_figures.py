"""Choosing montage crops and drawing their errors; the montage reads only its crops."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from matplotlib.image import imread

from conftest import run_cli
from unetflow.blockwise import plan_blocks
from unetflow.demo import synthesize_nuclei
from unetflow.evaluate import read_channels_first
from unetflow.figures import (
    CROP_SCORE_COLUMNS,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    HIT,
    CropScores,
    _crop_name,
    _label_colors,
    _plane,
    _plt,
    _save_png,
    candidate_crops,
    display_range,
    error_image,
    montage_error,
    pick_crops,
    plate_grid,
    read_crop_scores,
    write_comparison,
    write_montage,
    write_plate_map,
    write_position_strip,
)
from unetflow.integrity import DamagedFileError
from unetflow.metrics import otsu_instances
from unetflow.normalize import denormalize_array, position_stats, read_stats
from unetflow.ome import channel_first, open_image, write_image, write_label_image


def test_candidate_crops_tile_the_image_and_sample_planes():
    crops = candidate_crops((100, 64), 32)
    assert len(crops) == 3 * 2  # 100 // 32 rows, 64 // 32 columns
    assert crops[0] == (None, slice(0, 32), slice(0, 32))
    stack = candidate_crops((20, 64, 64), 64, planes=5)
    assert [c[0] for c in stack] == [0, 5, 10, 14, 19]
    assert candidate_crops((10, 12), 64) == [(None, slice(0, 10), slice(0, 12))]


def whole_array_scores(error: np.ndarray, interesting: np.ndarray | None,
                       size: int) -> list:
    """Each candidate crop's mean error and whether it shows something, from whole arrays."""
    return [(c, float(_plane(error, c).mean()),
             True if interesting is None else bool(_plane(interesting, c).any()))
            for c in candidate_crops(error.shape, size)]


def test_pick_crops_runs_from_best_to_worst():
    error = np.zeros((64, 64))
    error[32:, 32:] = 1.0  # the bottom-right crop is all wrong
    error[:32, 32:] = 0.25
    crops = pick_crops(whole_array_scores(error, None, 32), 3)
    # four crops with errors 0, 0.25, 0, 1: ranks 0, 2, 3 of the sorted errors
    assert [e for _, e in crops] == [0.0, 0.25, 1.0]
    assert crops[-1][0] == (None, slice(32, 64), slice(32, 64))


def test_pick_crops_prefers_crops_that_show_objects():
    error = np.zeros((64, 64))
    objects = np.zeros((64, 64), bool)
    objects[40:44, 8:12] = True  # only the bottom-left crop has an object
    crops = pick_crops(whole_array_scores(error, objects, 32), 3)
    assert [c for c, _ in crops] == [(None, slice(32, 64), slice(0, 32))]
    nothing = pick_crops(whole_array_scores(error, np.zeros_like(objects), 32), 2)
    assert len(nothing) == 2  # no crop shows anything: all are candidates


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


# --- crop scores block by block -------------------------------------------------------------
def crops_and_blocks(ndim: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
    """An error map and a sparse foreground of odd shape, blocks that do not divide it nor
    align with the crops, and a crop size."""
    rng = np.random.default_rng(ndim)
    shape, block = ((70, 83), (17, 23)) if ndim == 2 else ((11, 40, 37), (4, 13, 9))
    error = rng.uniform(0, 1, shape).astype(np.float32)
    interesting = rng.uniform(0, 1, shape) > 0.999
    return error, interesting, block, 16


def block_scores(error: np.ndarray, interesting: np.ndarray | None,
                 blocks: list, size: int) -> CropScores:
    scores = CropScores(error.shape, size)
    for block in blocks:
        scores.add(block.core, error[block.core],
                   None if interesting is None else interesting[block.core])
    return scores


def same_scores(streamed: list, whole: list) -> bool:
    return ([(c, s) for c, _, s in streamed] == [(c, s) for c, _, s in whole]
            and np.allclose([e for _, e, _ in streamed], [e for _, e, _ in whole],
                            rtol=1e-6, atol=0))


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_scores_over_blocks_equal_whole_array_means(ndim):
    error, interesting, block, size = crops_and_blocks(ndim)
    blocks = plan_blocks(error.shape, block)
    whole = whole_array_scores(error, interesting, size)
    assert 0 < sum(s for _, _, s in whole) < len(whole)  # some crops show something
    scores = block_scores(error, interesting, blocks, size)
    assert same_scores(scores.scored(), whole)
    halves = [block_scores(error, interesting, part, size)
              for part in (blocks[::2], blocks[1::2])]
    assert same_scores(halves[0].merge(halves[1]).scored(), whole)
    regression = block_scores(error, None, blocks, size).scored()
    assert same_scores(regression, whole_array_scores(error, None, size))


def test_crop_scores_round_trip_through_a_tsv(tmp_path):
    for ndim in (2, 3):
        error, interesting, block, size = crops_and_blocks(ndim)
        scores = block_scores(error, interesting, plan_blocks(error.shape, block), size)
        path = tmp_path / f"crops{ndim}.tsv"
        scores.write_tsv(str(path))
        assert read_crop_scores(str(path)) == scores.scored()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops2.tsv", "crops3.tsv"]


@pytest.mark.parametrize("text, says", [
    ("z\ty\tx\n", "not a crop scores table"),
    ("", "not a crop scores table"),
    ("\t".join(CROP_SCORE_COLUMNS) + "\n\t0\t16\t0\t16\t0.5\n", "line 2"),
    ("\t".join(CROP_SCORE_COLUMNS) + "\n\t0\t16\t0\t16\tlow\t1\n", "line 2"),
    ("\t".join(CROP_SCORE_COLUMNS) + "\n\t0\t16\t0\t16\t0.5\tyes\n", "shows is 'yes'"),
])
def test_a_bad_crop_scores_file_is_refused_naming_it(tmp_path, text, says):
    path = tmp_path / "crops.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=says) as caught:
        read_crop_scores(str(path))
    assert str(path) in str(caught.value)


# --- the montage against today's whole-array montage -----------------------------------------
def todays_montage(prediction, image, target, stats_path, task, channels, settings, output,
                   title, position=None):
    """The montage as it was before it streamed, whole arrays in memory: the oracle."""
    def whole(path, level=0, chosen=None):
        return np.asarray(channel_first(open_image(path, level), chosen).compute())

    provenance = dict(open_image(prediction).attrs.get("unetflow", {}))
    level = int(provenance.get("predict", {}).get("level", 0))
    pred = {"image": whole(prediction)}
    if task == "segmentation":
        pred["labels"] = whole(f"{prediction}/labels/prediction")[0]
    elif provenance["predict"].get("output_units") == "normalized":
        pred["image"] = denormalize_array(pred["image"], provenance["normalization"],
                                          provenance["normalize"]["method"])
    image_arr, target_arr = whole(image, level, channels), whole(target, level)
    low, high = display_range(position_stats(read_stats(stats_path), position))
    if task == "segmentation":
        truth, ignore_label = target_arr[0], settings["ignore_label"]
        valid = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
        pred_fg, true_fg = pred["labels"] != 0, (truth != 0) & valid
        error, interesting = ((pred_fg != true_fg) & valid).astype(np.float32), true_fg
        panels = [("prediction (objects)", lambda c: _label_colors(_plane(pred["labels"], c)),
                   {}),
                  ("target (objects)",
                   lambda c: _label_colors(_plane(np.where(valid, truth, 0), c)), {}),
                  ("error: orange = false object pixels,\nblue = missed, grey = right",
                   lambda c: error_image(_plane(pred_fg, c), _plane(true_fg, c),
                                         _plane(valid, c)), {})]
    else:
        shown, limit = {"cmap": "gray", "vmin": low, "vmax": high}, (high - low) / 4
        difference = pred["image"][0] - target_arr[0]
        panels = [("prediction", lambda c: _plane(pred["image"][0], c), shown),
                  ("target", lambda c: _plane(target_arr[0], c), shown),
                  (f"error: prediction - target (±{limit:.3g})", lambda c: _plane(difference, c),
                   {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit})]
        error, interesting = difference**2, None
    crops = candidate_crops(error.shape, settings["montage_crop_size"])
    if interesting is not None:
        crops = [c for c in crops if _plane(interesting, c).any()] or crops
    scored = sorted(((c, float(_plane(error, c).mean())) for c in crops), key=lambda t: t[1])
    ranks = sorted({int(r) for r in np.linspace(0, len(scored) - 1,
                                                settings["montage_crops"]).round()})
    crops = [scored[r] for r in ranks]
    panels = [(f"input (channel 0, {low:.3g} to {high:.3g})", lambda c: _plane(image_arr[0], c),
               {"cmap": "gray", "vmin": low, "vmax": high}), *panels]
    plt = _plt()
    fig, axes = plt.subplots(len(crops), len(panels), squeeze=False,
                             figsize=(2.6 * len(panels), 2.6 * len(crops) + 0.6))
    for row, (crop, err) in enumerate(crops):
        for col, (name, draw, style) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(draw(crop), interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8, wrap=True)
        axes[row, 0].set_ylabel(_crop_name(crop, row, len(crops), err, task), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, output)
    return crops


CHUNK = 16  # the crop size too: a crop is one chunk per plane


def write_stats(path, low: float, high: float) -> dict:
    stats = {"dataset": "d", "channels": [{"percentiles": {"1.0": low, "99.8": high},
                                           "mean": (low + high) / 2, "std": high - low,
                                           "min": low, "max": high}]}
    path.write_text(json.dumps(stats))
    return stats


def segmentation_case(tmp_path) -> dict:
    """A 2D image of nuclei, its labels with an ignored band, Otsu's objects as the
    prediction: stores chunked like the crops."""
    nuclei = synthesize_nuclei((64, 80), seed=2)
    truth = nuclei.labels.astype(np.uint16)
    truth[:, 70:] = 999  # ignored
    write_image(tmp_path / "image.ome.zarr", nuclei.noisy[None], ["c", "y", "x"],
                chunks=(1, CHUNK, CHUNK))
    write_image(tmp_path / "target.ome.zarr", truth[None], ["c", "y", "x"],
                chunks=(1, CHUNK, CHUNK))
    pred = tmp_path / "pred.ome.zarr"
    labels = otsu_instances(nuclei.noisy)
    write_image(pred, (labels > 0)[None].astype(np.float32), ["c", "y", "x"],
                chunks=(1, CHUNK, CHUNK), attrs={"predict": {"level": 0},
                                                    "task": "segmentation",
                                                    "checkpoint_sha256": "0" * 64})
    write_label_image(pred, "prediction", labels, ["y", "x"], chunks=(CHUNK, CHUNK))
    write_stats(tmp_path / "stats.json", float(nuclei.noisy.min()), 20.0)
    return {"task": "segmentation", "settings": {"ignore_label": 999, "montage_crops": 3,
                                                 "montage_crop_size": CHUNK, "block_pixels": 800},
            "stores": [tmp_path / "image.ome.zarr", tmp_path / "target.ome.zarr",
                       pred / "labels" / "prediction"]}


def regression_case(tmp_path) -> dict:
    """A 3D stack (odd depth, chunks of 3 planes), its clean scene as the target, and a
    prediction stored normalized (denormalized for the montage)."""
    nuclei = synthesize_nuclei((33, 32, 48), seed=3)
    write_image(tmp_path / "image.ome.zarr", nuclei.noisy[None], ["c", "z", "y", "x"],
                chunks=(1, 3, CHUNK, CHUNK))
    write_image(tmp_path / "target.ome.zarr", nuclei.clean[None], ["c", "z", "y", "x"],
                chunks=(1, 3, CHUNK, CHUNK))
    stats = write_stats(tmp_path / "stats.json", 1.0, 25.0)
    noise = np.random.default_rng(3).normal(0, 0.02, nuclei.clean.shape)
    normalized = ((nuclei.clean - 1.0) / 24.0 + noise).astype(np.float32)
    provenance = {"predict": {"level": 0, "output_units": "normalized"},
                  "normalization": stats, "normalize": {"method": "percentile"},
                  "task": "regression", "checkpoint_sha256": "0" * 64}
    write_image(tmp_path / "pred.ome.zarr", normalized[None], ["c", "z", "y", "x"],
                chunks=(1, 3, CHUNK, CHUNK), attrs=provenance)
    return {"task": "regression", "settings": {"ignore_label": None, "montage_crops": 4,
                                               "montage_crop_size": CHUNK, "block_pixels": 3000},
            "stores": [tmp_path / "image.ome.zarr", tmp_path / "target.ome.zarr",
                       tmp_path / "pred.ome.zarr"]}


def montage(tmp_path, case: dict, name: str, draw=write_montage, **kwargs) -> tuple:
    output = tmp_path / f"{name}.png"
    crops = draw(str(tmp_path / "pred.ome.zarr"), str(tmp_path / "image.ome.zarr"),
                 str(tmp_path / "target.ome.zarr"), str(tmp_path / "stats.json"), case["task"],
                 None, case["settings"], str(output), "a title", **kwargs)
    return crops, imread(output)


def same_crops(drawn: list, oracle: list) -> bool:
    """The same crops in the same order, with the same mean error (the oracle's is a float32
    mean, the streamed one float64 sums over blocks)."""
    return ([c for c, _ in drawn] == [c for c, _ in oracle]
            and np.allclose([e for _, e in drawn], [e for _, e in oracle], rtol=1e-6, atol=0))


def evaluation_crop_scores(tmp_path, case: dict) -> str:
    """The TSV evaluate writes: CropScores over blocks of the prediction and target."""
    seg = case["task"] == "segmentation"
    target = channel_first(open_image(str(tmp_path / "target.ome.zarr"))).compute()
    pred = channel_first(open_image(str(tmp_path / "pred.ome.zarr"))).compute()
    if seg:
        pred = channel_first(open_image(str(tmp_path / "pred.ome.zarr/labels/prediction")))[0]
    else:
        provenance = dict(open_image(str(tmp_path / "pred.ome.zarr")).attrs["unetflow"])
        pred = denormalize_array(pred, provenance["normalization"], "percentile")
    scores = CropScores(target.shape[1:], case["settings"]["montage_crop_size"])
    for block in plan_blocks(target.shape[1:], (5, 20, 24)[-(target.ndim - 1):]):
        scores.add(block.core, *montage_error(case["task"], np.asarray(pred[(..., *block.core)]),
                                              target[(..., *block.core)],
                                              case["settings"]["ignore_label"]))
    path = tmp_path / "crop_scores.tsv"
    scores.write_tsv(str(path))
    return str(path)


def touches(crop, start: list[int], stop: list[int]) -> bool:
    """Whether a crop overlaps the region from `start` to `stop` (trailing axes spatial)."""
    z, ys, xs = crop
    spans = ([] if z is None else [(z, z + 1)]) + [(ys.start, ys.stop), (xs.start, xs.stop)]
    return all(a < e and s < b for (a, b), s, e
               in zip(spans, start[-len(spans):], stop[-len(spans):], strict=True))


def spoil_chunks_outside(array_dir: Path, crops: list) -> int:
    """Overwrite every stored chunk that no crop touches with bytes that do not decode, so
    reading one fails; returns how many were spoiled."""
    chunks = zarr.open_array(str(array_dir), mode="r").chunks
    spoiled = 0
    for path in (array_dir / "c").rglob("*"):
        if not path.is_file():
            continue
        index = [int(p) for p in path.relative_to(array_dir / "c").parts]
        start = [i * c for i, c in zip(index, chunks, strict=True)]
        stop = [s + c for s, c in zip(start, chunks, strict=True)]
        if not any(touches(crop, start, stop) for crop, _ in crops):
            path.write_bytes(b"not a chunk")
            spoiled += 1
    return spoiled


def level_zero(store: Path) -> Path:
    return next(p.parent for p in store.glob("*/zarr.json") if (p.parent / "c").is_dir())


@pytest.mark.parametrize("make_case", [segmentation_case, regression_case])
def test_montage_draws_what_the_whole_array_montage_drew(tmp_path, make_case):
    case = make_case(tmp_path)
    crops, oracle = montage(tmp_path, case, "oracle", draw=todays_montage)
    assert len({e for _, e in crops}) == len(crops) == case["settings"]["montage_crops"]
    streamed, picture = montage(tmp_path, case, "streamed", workers=2)
    assert same_crops(streamed, crops) and np.array_equal(picture, oracle)
    scores = evaluation_crop_scores(tmp_path, case)
    from_tsv, picture = montage(tmp_path, case, "from_tsv", crop_scores=scores)
    assert same_crops(from_tsv, crops) and np.array_equal(picture, oracle)


@pytest.mark.parametrize("make_case", [segmentation_case, regression_case])
def test_montage_with_crop_scores_reads_only_the_crops_it_draws(tmp_path, make_case):
    """Every chunk of the image, the prediction and the target that no chosen crop touches
    is spoiled: the montage still draws the same picture, so it never read one."""
    case = make_case(tmp_path)
    crops, oracle = montage(tmp_path, case, "oracle", draw=todays_montage)
    scores = evaluation_crop_scores(tmp_path, case)
    for store in case["stores"]:
        total = sum(1 for p in (level_zero(store) / "c").rglob("*") if p.is_file())
        spoiled = spoil_chunks_outside(level_zero(store), crops)
        assert spoiled >= total - 4 * len(crops)
    with pytest.raises(DamagedFileError, match="cannot be decoded"):
        read_channels_first(str(tmp_path / "target.ome.zarr"))  # spoiled chunks do not read
    drawn, picture = montage(tmp_path, case, "from_tsv", crop_scores=scores)
    assert same_crops(drawn, crops) and np.array_equal(picture, oracle)


def test_crop_scores_of_another_image_are_refused(tmp_path):
    case = segmentation_case(tmp_path)
    other = CropScores((64, 96), CHUNK)
    other.write_tsv(str(tmp_path / "other.tsv"))
    with pytest.raises(ValueError, match="other.tsv.*another image or montage_crop_size"):
        montage(tmp_path, case, "m", crop_scores=str(tmp_path / "other.tsv"))


def test_montage_command_takes_crop_scores_and_workers(tmp_path):
    case = segmentation_case(tmp_path)
    crops, oracle = montage(tmp_path, case, "oracle", draw=todays_montage)
    scores = evaluation_crop_scores(tmp_path, case)
    args = ["montage", "--prediction", str(tmp_path / "pred.ome.zarr"), "--image",
            str(tmp_path / "image.ome.zarr"), "--target", str(tmp_path / "target.ome.zarr"),
            "--stats", str(tmp_path / "stats.json"), "--task", "segmentation", "--settings",
            json.dumps(case["settings"]),
            "--title", "a title"]
    for name, extra in [("tsv", ["--crop-scores", scores]),
                        ("streamed", ["--execution", '{"workers": 2}'])]:
        result = run_cli(*args, "--output", str(tmp_path / f"{name}.png"), *extra)
        assert result.returncode == 0, result.stderr
        assert np.array_equal(imread(tmp_path / f"{name}.png"), oracle)
    result = run_cli(*args, "--output", str(tmp_path / "bad.png"), "--execution",
                     '{"workers": 0}')
    assert result.returncode == 1 and "evaluate.workers" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "bad.png").exists()
