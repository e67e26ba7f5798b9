"""What a plate costs the workflow: planning a 384-well x 9-field plate, and predicting many
small fields against the same pixels as one image. Prints `name: value` lines.

Planning: `snakemake -n` (the whole DAG: parsing, reading and checking the plate's 3,456
positions, jobs) on a generated plate of tiny fields (metadata is all planning reads; the
fields are copies of one 32x32 field, as in bench/positions.py), with one segmentation
model that trains on 4 wells and predicts the whole plate. Printed: seconds per 1,000
positions (best of --repeats) and the number of prediction jobs (goal: under 20 s per 1,000
positions, and at most one prediction job per 100 positions).

Throughput (bench/plate_throughput.py): `plate_vs_image_ratio` = seconds to predict the same
pixels as one image / seconds to predict them as a plate of small fields in one batch job
(goal >= 0.8: the per-position overhead costs at most 20%).

    .venv/bin/python bench/plate.py [--rows 16 --columns 24 --fields 9] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from positions import write_plate  # noqa: E402  (bench/positions.py)

REPO = Path(__file__).resolve().parents[1]


def plate_config(plate: Path, train_wells: list[str]) -> dict:
    return {
        "datasets": {
            "screen": {"plate": str(plate), "labels": "nuclei"},
            "screen_train": {"plate": str(plate), "labels": "nuclei", "wells": train_wells},
        },
        "models": {"seg": {"task": "segmentation", "train_on": ["screen_train"],
                           "predict_on": ["screen"]}},
        "patches": {"shape": [16, 16], "validation": "well"},
        "model": {"depth": 2, "base_features": 4},
        "predict": {"tile_shape": [32, 32]},
    }


def plan(workdir: Path, config: Path) -> tuple[float, dict[str, int]]:
    """Seconds of `snakemake -n` and its job counts by rule."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--snakefile",
         str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(config),
         "--quiet", "rules"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"snakemake -n failed:\n{done.stderr[-3000:]}")
    counts = {m.group(1): int(m.group(2))
              for m in re.finditer(r"^(\w+)\s+(\d+)$", done.stdout + done.stderr, re.M)}
    return seconds, counts


def planning(rows: int, columns: int, fields: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="unetflow-plate-") as tmp:
        tmp = Path(tmp)
        plate = tmp / "plate.ome.zarr"
        start = time.perf_counter()
        count = write_plate(plate, rows, columns, fields, "0.5")
        print(f"plate_positions: {count}")
        print(f"plate_write_s: {time.perf_counter() - start:.1f}")
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump(plate_config(plate, ["A01", "A02", "B01", "B02"])))
        best, counts = min(plan(tmp, config) for _ in range(repeats))
        print(f"plan_jobs_total: {counts.get('total', 0)}")
        print(f"plan_predict_jobs: {counts.get('predict_positions', 0)}")
        print(f"plan_evaluate_jobs: {counts.get('evaluate_positions', 0)}")
        print(f"plan_s: {best:.1f}")
        print(f"plan_s_per_1000_positions: {1000 * best / count:.2f}")
        jobs = max(1, counts.get("predict_positions", 0))
        print(f"positions_per_predict_job: {count / jobs:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--columns", type=int, default=24)
    parser.add_argument("--fields", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    planning(args.rows, args.columns, args.fields, args.repeats)
    if not args.skip_throughput:
        from plate_throughput import main as throughput  # bench/plate_throughput.py

        throughput(["--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
