"""The error that sampling positions makes in dataset-level statistics, on the demo plate.

Writes a demo plate (`plates.write_demo_plate`, default 4 rows x 6 columns x 2 fields = 48
positions) and computes its dataset-level statistics (`normalize.compute_positions_stats`)
from all positions (exact up to one histogram bin) and from `sample_positions` of them,
spread evenly over the plate order. Printed as `name: value`, per sample size: the sampled
percentiles and mean, their error against all positions (absolute, relative to the value,
and relative to the percentile range, which is what a normalized intensity moves by), and
the standard error that sampling m of N positions predicts for the high percentile, from
the spread of the positions' own percentiles: sd * sqrt((1 - m / N) / m).

Accuracy only (no timing), so it needs no quiet machine.

    python bench/normalize_positions.py [--rows 4] [--columns 6] [--fields 2] [--size 64]
        [--samples 4 8 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from unetflow.normalize import compute_positions_stats
from unetflow.plates import dataset_positions, write_demo_plate

SETTINGS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 4096, "mask": None}


def _figures(stats: dict) -> tuple[float, float, float]:
    channel = stats["channels"][0]
    low, high = channel["percentiles"].values()
    return low, high, channel["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--fields", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="fields are size x size")
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plate.ome.zarr"
        write_demo_plate(path, rows=args.rows, columns=args.columns, fields=args.fields,
                         shape=(args.size, args.size), seed=args.seed, clean=False)
        positions = dataset_positions("demo", {"plate": str(path)})
        total = len(positions.positions)
        exact = _figures(compute_positions_stats(positions, None,
                                                 {**SETTINGS, "sample_positions": None}))
        own = compute_positions_stats(positions, None, SETTINGS, per="position")
        highs = [list(p["channels"][0]["percentiles"].values())[1]
                 for p in own["positions"].values()]
        print(f"positions: {total}")
        print(f"all: p1 {exact[0]:.4g}, p99.8 {exact[1]:.4g}, mean {exact[2]:.4g}")
        print(f"per-position p99.8 sd: {np.std(highs, ddof=1):.4g}")
        spread = exact[1] - exact[0]
        for m in args.samples:
            got = _figures(compute_positions_stats(positions, None,
                                                   {**SETTINGS, "sample_positions": m}))
            error = [g - e for g, e in zip(got, exact, strict=True)]
            predicted = np.std(highs, ddof=1) * np.sqrt(max(0.0, 1 - m / total) / m)
            print(f"sample {m}: p1 {got[0]:.4g} ({error[0]:+.3g}, "
                  f"{abs(error[0]) / spread:.2%} of range), p99.8 {got[1]:.4g} "
                  f"({error[1]:+.3g}, {abs(error[1] / exact[1]):.2%} of value, "
                  f"{abs(error[1]) / spread:.2%} of range), mean {got[2]:.4g} "
                  f"({abs(error[2] / exact[2]):.2%}); predicted p99.8 standard error "
                  f"{predicted:.3g}")


if __name__ == "__main__":
    main()
