"""What predicting a plate of many small fields costs against the same pixels as one image.

Setup: a synthetic demo plate (`plates.write_demo_plate`) of ROWS x COLUMNS wells x FIELDS
fields of SIZE x SIZE px (default 8 x 4 x 2 = 64 fields of 256^2, NGFF 0.5), and one image
made of exactly those pixels (the fields laid side by side, ROWS x COLUMNS * FIELDS of them,
a 2048^2 image by default). The same network (the config schema's default model: depth 3,
base 16; random weights, segmentation with 2 classes, the class-1 bias set so that 30% of
pixels are foreground) predicts both with the schema's default predict settings (tiles of
1024, exact halo, crop, instance labels, 3 pyramid levels) on the CPU with the same
--threads (default 2):
- the plate: one batch of all its positions (`predict_positions`, what one job runs), each
  field written as its own NGFF image (labels/prediction, 3-level pyramid, provenance);
- the image: the single-image path (`predict_to_ome_zarr`: raw store, shard, gather).
Each is timed from the call to its return (best of --repeats, default 2, runs interleaved;
the batch is run from scratch each time, with the outputs deleted).

Printed as `name: value`:
- plate_vs_image_ratio: seconds for the image divided by seconds for the plate. Goal >= 0.8
  (the plate costs at most 1.25x the image).
- per_position_overhead_ms: (plate seconds - image seconds) / positions: what a position
  costs beyond its pixels. Negative when the plate is the cheaper: each field pays for a
  reflected halo instead of its neighbours' pixels, but the one image pays for its raw
  store, its dask graphs and its out-of-core labelling.
- plate_seconds, image_seconds, positions, field_shape, image_shape.

    python bench/plate_throughput.py [--rows 8] [--columns 4] [--fields 2] [--size 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unetflow.config import section_settings
from unetflow.model.checkpoint import new_checkpoint, save_checkpoint
from unetflow.model.unet import UNet
from unetflow.normalize import compute_dataset_stats, normalize_array, read_stats, write_stats
from unetflow.ome import open_image, write_image
from unetflow.plates import dataset_positions, write_demo_plate
from unetflow.predict import predict_to_ome_zarr
from unetflow.predict_positions import predict_positions


def write_checkpoint(path: Path, image: str, stats: str) -> str:
    """The schema's default model (random weights, eval-mode batch norms) as a checkpoint,
    its class-1 bias set so that 30% of `image` is foreground: the outputs have objects, and
    the labelling has its real work to do."""
    settings = section_settings("model", {})
    torch.manual_seed(0)
    model = UNet(settings["spatial_dims"], 1, settings["num_classes"],
                 depth=settings["depth"], base_features=settings["base_features"]).eval()
    x = normalize_array(np.asarray(open_image(image).data[:, :512, :512], dtype=np.float32),
                        read_stats(stats))
    with torch.inference_mode():
        logits = model(torch.from_numpy(x[None]))[0]
        model.head.bias[1] -= torch.quantile((logits[1] - logits[0]).flatten(), 0.7)
    save_checkpoint(path, new_checkpoint(model, "segmentation", {
        "method": "percentile", "clip": False, "datasets": {}}))
    return str(path)


def write_side_by_side(positions, rows: int, per_row: int, path: Path) -> tuple[int, ...]:
    """The fields of `positions` (plate order) laid out as rows x per_row tiles of one image."""
    fields = [np.asarray(open_image(p.image).data) for p in positions]
    grid = [np.concatenate(fields[r * per_row:(r + 1) * per_row], axis=-1) for r in range(rows)]
    image = np.concatenate(grid, axis=-2)
    first = open_image(positions[0].image)
    write_image(path, image, first.axes, scale=first.axis_scale(), units=first.units,
                chunks=(1, 1024, 1024))
    return image.shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--fields", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unetflow-plate-bench-") as tmp:
        root = Path(tmp)
        write_demo_plate(root / "plate.ome.zarr", rows=args.rows, columns=args.columns,
                         fields=args.fields, shape=(args.size, args.size), clean=False)
        position_set = dataset_positions("bench", {"plate": str(root / "plate.ome.zarr")})
        image_shape = write_side_by_side(position_set.positions, args.rows,
                                         args.columns * args.fields, root / "image.ome.zarr")
        write_stats(compute_dataset_stats(str(root / "image.ome.zarr"), None,
                                          section_settings("normalize", {}), "bench"),
                    root / "stats.json")
        checkpoint = write_checkpoint(root / "model.pt", str(root / "image.ome.zarr"),
                                      str(root / "stats.json"))
        settings = section_settings("predict", {"device": "cpu"})

        def image() -> None:
            predict_to_ome_zarr(checkpoint, str(root / "image.ome.zarr"), str(root / "stats.json"),
                                None, settings, str(root / "image_out.ome.zarr"), "bench",
                                "bench", args.threads)

        def plate() -> None:
            shutil.rmtree(root / "plate_out", ignore_errors=True)
            predict_positions(checkpoint, position_set, None, str(root / "stats.json"), None,
                              settings, "bench", "bench", root / "plate_out", args.threads,
                              root / "batch.json")

        seconds = {"image": [], "plate": []}
        for _ in range(args.repeats):
            for name, run in (("image", image), ("plate", plate)):
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    count = len(position_set.positions)
    image_s, plate_s = min(seconds["image"]), min(seconds["plate"])
    print(f"positions: {count}")
    print(f"field_shape: {[args.size, args.size]}")
    print(f"image_shape: {list(image_shape)}")
    print(f"image_seconds: {image_s:.3f}")
    print(f"plate_seconds: {plate_s:.3f}")
    print(f"plate_vs_image_ratio: {image_s / plate_s:.3f}")
    print(f"per_position_overhead_ms: {1000 * (plate_s - image_s) / count:.1f}")


if __name__ == "__main__":
    main()
