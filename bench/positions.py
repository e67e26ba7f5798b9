"""What reading a plate's positions costs: `plate_positions` and `check_positions` on a
384-well x 9-field plate (3,456 positions) of tiny images, printed as `name: value` (median
of 3 runs, seconds per 1,000 positions returned; check_positions includes plate_positions).

Planning (`snakemake -n`) must stay under 20 s per 1,000 positions in all, so these two,
which it calls once per dataset, must cost a small part of that. The plate is written fast:
ome-zarr-py writes the plate and well metadata, and the one 32x32 field of a 1-well demo
plate (two levels, with labels/nuclei) is copied to every field; timing reads metadata only.

    python bench/positions.py [--ngff 0.5|0.4] [--rows 16] [--columns 24] [--fields 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import string
import tempfile
import time
from pathlib import Path

import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_plate_metadata, write_well_metadata

from unetflow.ome import open_image
from unetflow.plates import check_positions, plate_positions, write_demo_plate


def write_plate(path: Path, rows: int, columns: int, fields: int, ngff: str) -> int:
    """A plate whose fields are copies of the field of a 1-well demo plate."""
    fmt = FormatV04() if ngff == "0.4" else FormatV05()
    demo = path.parent / "demo.ome.zarr"
    write_demo_plate(demo, rows=1, columns=1, fields=1, shape=(32, 32), ngff=ngff, clean=False)
    template = demo / "A" / "1" / "0"
    row_names = list(string.ascii_uppercase[:rows])
    column_names = [str(c + 1) for c in range(columns)]
    wells = [f"{r}/{c}" for r in row_names for c in column_names]
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if ngff == "0.4" else 3)
    write_plate_metadata(root, row_names, column_names, wells, fmt=fmt, field_count=fields)
    for well in wells:
        write_well_metadata(root.require_group(well), [str(f) for f in range(fields)], fmt=fmt)
        for field in range(fields):
            shutil.copytree(template, path / well / str(field))
    return len(wells) * fields


def per_thousand(seconds: float, count: int) -> str:
    return f"{1000 * seconds / count:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngff", choices=["0.5", "0.4"], default="0.5")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--columns", type=int, default=24)
    parser.add_argument("--fields", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="unetflow-positions-") as tmp:
        path = Path(tmp) / "plate.ome.zarr"
        start = time.perf_counter()
        count = write_plate(path, args.rows, args.columns, args.fields, args.ngff)
        print(f"ngff: {args.ngff}")
        print(f"positions: {count}")
        print(f"write_s: {time.perf_counter() - start:.1f}")
        print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
        selection = [f"{r}{c + 1:02d}" for r in string.ascii_uppercase[:args.rows]
                     for c in range(0, args.columns, 2)]
        for name, call in (
            ("plate_positions", lambda: plate_positions(path)),
            ("plate_positions_half_the_wells_2_fields",
             lambda: plate_positions(path, wells=selection, fields=[0, 1])),
            ("check_positions", lambda: check_positions(plate_positions(path))),
            ("check_positions_labels",
             lambda: check_positions(plate_positions(path), labels="nuclei")),
            ("open_image_every_position",  # what check_positions would cost through ome
             lambda: [open_image(p.image) for p in plate_positions(path)]),
        ):
            seconds, n = [], count
            for _ in range(3):
                start = time.perf_counter()
                result = call()
                seconds.append(time.perf_counter() - start)
                n = len(result) if result is not None else count
            print(f"{name}_s_per_1000_positions: {per_thousand(statistics.median(seconds), n)}")


if __name__ == "__main__":
    main()
