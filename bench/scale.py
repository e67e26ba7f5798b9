"""Does every stage of the workflow hold its memory flat as images grow? The whole workflow on
a small and a big generated image, each job's peak RSS and wall time side by side.

Setup: per dimensionality a small and a big image, 16x apart in pixels: 2D 4096^2 and
16384^2, 3D 64x128x128 and 256x256x256 (z, y, x). The small ones already hold several
prediction tiles and chunks, so that what a stage keeps per tile or chunk shows at both
sizes and the ratio measures what grows with the image. Each image is generated out of core:
tiles of synthetic nuclei (`unetflow.demo.synthesize_nuclei`, a pool of 4 seeds, each tile
flipped or transposed by its position; 1024^2 in 2D, 32x128x128 in 3D) written chunk by chunk
(`unetflow.ome.write_image` of a dask array, chunks = tiles) into three NGFF 0.5 stores: the
noisy image (float32), its instance labels (uint32, ids unique across tiles) and the clean
image. A tiny model (depth 2, 2 base features, 50 training steps on small patches) trains,
predicts (tiles 1024^2 / 32x128x128, 2 pyramid levels) and is evaluated on that same image:
by default segmentation in 2D (evaluation: instance matching, Otsu baseline) and regression
(denoising) in 3D (evaluation: SSIM, tuned Gaussian baseline); `--tasks
segmentation,regression` runs both in both, which about doubles the time. Each size runs the
whole workflow of this checkout (its Snakefile and its `src/` first on PYTHONPATH) with
`snakemake --cores 2 --keep-going` in a fresh working directory.

Every successful `unetflow` command ends its log with `unetflow <stage>: peak RSS <N> MB[
(largest child process <M> MB)], <S> s` (cli.peak_memory_line). Per job: RSS = N + M (what
the job's `mem_mb` must cover), time = S (from the command's start, less Python's start-up).
Per rule: the largest RSS over its jobs and the sum of their times. A job whose log lacks
that line (killed by the kernel, exit 137; failed; or never started because an input failed)
is listed loudly and counts as missing, never as 0.

Ratios, per dimensionality and rule (`<dim>_<rule>_rss_ratio`, `<dim>_<rule>_time_ratio`):
- rss_ratio = the rule's peak RSS on the big image / its peak RSS on the small image.
  Goal <= 1.5 for 16x the pixels: memory set by chunk sizes and settings, not by the image.
- time_ratio = the rule's summed wall time on the big image / on the small image.
  Goal <= 20 for 16x the pixels: at most about linear. Stages whose work does not grow
  (train, summarize) sit near 1; their ratios are noise.
- max_rss_ratio, max_time_ratio: the largest over all rules and dimensionalities ("missing"
  when a rule has no figure: then `max_*_ratio_of_measured_rules` follows).
<dim>_small_s, <dim>_big_s: seconds per size (data and workflow); total_s: the whole run.
Times depend on what else runs on the machine (the load average is printed per size).

Run (estimated 9 minutes on 2 idle cores, 6 of them the 16384^2 image, whose evaluate and
montage were extrapolated linearly from 2048^2 and 8192^2 runs; about 3 GB of disk):
    .venv/bin/python bench/scale.py [--sizes 1024,4096] [--sizes 64x128x128,256x256x256]
        [--tasks segmentation,regression] [--keep] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import yaml

from unetflow.demo import synthesize_nuclei
from unetflow.ome import write_image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

DEFAULT_SIZES = ["4096,16384", "64x128x128,256x256x256"]
POOL_TILE = {2: (1024, 1024), 3: (32, 128, 128)}  # one generated scene; also the chunk shape
POOL_SEEDS = 4  # distinct scenes; with 8 (2D) or 4 (3D) orientations each
PIXEL_SIZE = {"z": 1.0, "y": 0.325, "x": 0.325}  # micrometer, as the demo data
PEAK_RE = re.compile(r"^unetflow (?P<stage>[\w -]+): peak RSS (?P<own>\d+) MB"
                     r"(?: \(largest child process (?P<child>\d+) MB\))?, (?P<s>[\d.]+) s$")
# task -> (model and dataset name, target store, model overrides)
TASKS = {"segmentation": ("seg", "labels", {}),
         "regression": ("dn", "clean", {"train": {"loss": "mse"}, "model": {"residual": True}})}
# Both tasks in both pairs would take about twice the time (see the docstring).
DEFAULT_TASKS = {2: ["segmentation"], 3: ["regression"]}
# Rules in workflow order (rules not listed here come after them, by name).
RULE_ORDER = ["normalize", "extract_patches", "train", "tune_baseline", "predict_create",
              "predict_shard", "predict", "evaluate", "montage", "summarize", "compare"]


# --- generated data, written block by block ---------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """One generated tile: noisy image, instance labels, clean image."""

    image: np.ndarray
    labels: np.ndarray
    clean: np.ndarray


def scene_pool(tile: tuple[int, ...]) -> list[Scene]:
    """POOL_SEEDS generated tiles (a few MB each), the material every image is tiled from."""
    pool = []
    for seed in range(POOL_SEEDS):
        drawn = synthesize_nuclei(tile, seed=1000 + seed)
        pool.append(Scene(drawn.noisy, drawn.labels.astype(np.uint32), drawn.clean))
    return pool


def orient(array: np.ndarray, turn: int) -> np.ndarray:
    """One of 8 flips/transposes of the last two axes (4 flips where y and x differ)."""
    if turn & 4 and array.shape[-1] == array.shape[-2]:
        array = np.swapaxes(array, -1, -2)
    if turn & 2:
        array = array[..., ::-1, :]
    if turn & 1:
        array = array[..., ::-1]
    return np.ascontiguousarray(array)


def tiled(pool: list[Scene], kind: str, shape: tuple[int, ...]) -> da.Array:
    """A (1, *shape) dask array of pool tiles; block b is pool[b % POOL_SEEDS] turned by b
    (its labels shifted by b times the largest pool label, so ids are unique)."""
    tile = pool[0].image.shape
    grid = [s // t for s, t in zip(shape, tile, strict=True)]
    turns = 8 if len(tile) == 2 and tile[0] == tile[1] else 4
    stride = max(int(s.labels.max()) for s in pool) + 1
    if int(np.prod(grid)) * stride >= np.iinfo(np.uint32).max:
        raise SystemExit(f"bench/scale.py: {shape} holds too many objects for uint32 labels")
    dtype = np.uint32 if kind == "labels" else np.float32

    def block(block_id: tuple[int, ...]) -> np.ndarray:
        b = int(np.ravel_multi_index(block_id[1:], grid))
        array = orient(getattr(pool[b % POOL_SEEDS], kind), (b // POOL_SEEDS) % turns)
        if kind == "labels":
            array = np.where(array > 0, array + np.uint32(b * stride), np.uint32(0))
        return array[None].astype(dtype, copy=False)

    return da.map_blocks(block, chunks=((1,), *[(t,) * g for t, g in zip(tile, grid,
                                                                          strict=True)]),
                         dtype=dtype, meta=np.empty((0,) * (len(tile) + 1), dtype))


def write_data(root: Path, shape: tuple[int, ...]) -> dict[str, str]:
    """image, labels and clean stores of `shape`, written chunk by chunk (2 threads)."""
    tile = POOL_TILE[len(shape)]
    tile = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))
    if any(s % t for s, t in zip(shape, tile, strict=True)):
        raise SystemExit(f"bench/scale.py: size {shape} is not a multiple of the tile {tile}")
    pool = scene_pool(tile)
    spatial = ["z", "y", "x"][-len(shape):]
    paths = {}
    for kind in ("image", "labels", "clean"):
        paths[kind] = str(root / f"{kind}.ome.zarr")
        with dask.config.set(scheduler="threads", num_workers=2):
            write_image(paths[kind], tiled(pool, kind, shape), ["c", *spatial],
                        scale={"c": 1.0, **{a: PIXEL_SIZE[a] for a in spatial}},
                        units={a: "micrometer" for a in spatial}, chunks=(1, *tile),
                        channel_names=["nuclei"], attrs={"bench": {"kind": kind}})
    return paths


# --- the workflow ----------------------------------------------------------------------------
def bench_config(paths: dict[str, str], ndim: int, tasks: list[str], steps: int) -> dict:
    """One model per task, trained, predicted and evaluated on the one generated image (not
    held out: what is measured is the cost of each stage, not the models' quality)."""
    patch = [32, 32] if ndim == 2 else [16, 32, 32]
    tile = [1024, 1024] if ndim == 2 else [32, 128, 128]
    datasets, models = {}, {}
    for task in tasks:
        name, target, overrides = TASKS[task]
        datasets[name] = {"image": paths["image"], "target": paths[target]}
        models[name] = {"task": task, "train_on": [name], "predict_on": [name], **overrides}
    return {
        "datasets": datasets,
        "models": models,
        "patches": {"shape": patch, "per_dataset": 64},
        "model": {"spatial_dims": ndim, "depth": 2, "base_features": 2},
        "train": {"steps": steps, "validate_every": max(1, steps // 2), "batch_size": 8,
                  "warmup_steps": 1},
        "predict": {"tile_shape": tile, "pyramid_levels": 2,
                    **({} if ndim == 2 else {"chunks": [16, 64, 64]})},
        # 3D: blocks of 4 chunks, so that the small stack too is several blocks (with the
        # default 1024^2-pixel blocks it would be one, and the ratio would compare one
        # block with two in flight rather than the stage's memory at two image sizes).
        "evaluate": {"tuning_crop_size": 128 if ndim == 2 else 32,
                     **({} if ndim == 2 else {"block_pixels": 4 * 16 * 64 * 64})},
    }


def run_workflow(workdir: Path, config: dict) -> tuple[int, float, str]:
    """`snakemake --cores 2` of this checkout in `workdir`: exit status, seconds, its output."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pythonpath = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH"))
                                 if p)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": pythonpath}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", "none", "--cores", "2", "--configfile", "config.yaml",
           "--keep-going"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    (workdir / "snakemake.out").write_text(output)
    return done.returncode, time.perf_counter() - start, output


# --- job costs from the logs -----------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One job: its rule, log, and (when its log ends with a peak line) RSS MB and seconds."""

    rule: str
    log: str
    rss_mb: float | None
    seconds: float | None


def planned_logs(output: str) -> dict[str, str]:
    """log path -> rule of every job Snakemake's output announces (`rule X:` ... `log: L`)."""
    logs, rule = {}, None
    for line in output.splitlines():
        text = line.strip()
        match = re.match(r"^(?:local)?rule (\w+):$", text)
        if match:
            rule = match.group(1)
        elif rule and text.startswith("log:"):
            logs[text.removeprefix("log:").strip().split(" (check")[0]] = rule
    return logs


def peak_line(path: Path) -> tuple[float, float] | None:
    """(RSS MB of the process plus its largest child, seconds) from a job log, or None."""
    if not path.is_file():
        return None
    lines = path.read_text(errors="replace").strip().splitlines()
    match = PEAK_RE.match(lines[-1]) if lines else None
    if not match:
        return None
    return int(match["own"]) + int(match["child"] or 0), float(match["s"])


def planned_counts(output: str) -> dict[str, int]:
    """rule -> jobs, from the `Job stats:` table Snakemake prints before it runs any."""
    counts: dict[str, int] = {}
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def job_costs(workdir: Path, output: str) -> list[Job]:
    """Every job of the run: those Snakemake started (their logs), and one entry `(not run)`
    for each planned job that never started (an input failed)."""
    logs = planned_logs(output)
    for path in sorted((workdir / "logs").rglob("*.log")):
        relative = path.relative_to(workdir).as_posix()
        parts = path.relative_to(workdir / "logs").parts
        logs.setdefault(relative, parts[0] if len(parts) > 1 else path.stem)
    jobs = [Job(rule, log, *(peak_line(workdir / log) or (None, None)))
            for log, rule in sorted(logs.items())]
    for rule, count in planned_counts(output).items():
        started = sum(j.rule == rule for j in jobs)
        if rule != "all":  # the target rule runs nothing and has no log
            jobs += [Job(rule, "(not run)", None, None)] * max(0, count - started)
    return jobs


def per_rule(jobs: list[Job]) -> dict[str, tuple[float | None, float | None]]:
    """rule -> (largest RSS over its jobs, summed seconds); None when any job lacks its line."""
    rules: dict[str, tuple[float | None, float | None]] = {}
    for rule in {j.rule for j in jobs}:
        mine = [j for j in jobs if j.rule == rule]
        if any(j.rss_mb is None for j in mine):
            rules[rule] = (None, None)
        else:
            rules[rule] = (max(j.rss_mb for j in mine), sum(j.seconds for j in mine))
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    return dict(sorted(rules.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def failure_lines(output: str) -> list[str]:
    """Snakemake's own words on failed jobs (`Error in rule`, exit status lines)."""
    keep = ("Error in rule", "exit status", "Killed", "MissingOutputException")
    return [line.strip() for line in output.splitlines() if any(k in line for k in keep)]


# --- one size, one pair ----------------------------------------------------------------------
def measure(shape: tuple[int, ...], tasks: list[str], base: Path, steps: int,
            keep: bool) -> dict:
    """Generate, run the workflow, read the logs: per rule (RSS, seconds), and the jobs."""
    name = "x".join(map(str, shape))
    workdir = Path(tempfile.mkdtemp(prefix=f"scale_{name}_", dir=base))
    start = time.perf_counter()
    paths = write_data(workdir / "data", shape)
    generate_s = time.perf_counter() - start
    rc, workflow_s, output = run_workflow(workdir, bench_config(paths, len(shape), tasks, steps))
    jobs = job_costs(workdir, output)
    missing = [j for j in jobs if j.rss_mb is None]
    print(f"# {name} ({', '.join(tasks)}): data {generate_s:.0f} s, snakemake "
          f"{workflow_s:.0f} s (exit {rc}), {len(jobs)} jobs, load average "
          f"{os.getloadavg()[1]:.2f} over the last 5 minutes", flush=True)
    if rc or missing:
        print(f"!!! {name}: snakemake exit status {rc}; jobs with no peak line "
              f"(killed, failed or not run): {len(missing)}", flush=True)
        for job in missing:
            print(f"!!!   {job.rule}: {job.log}", flush=True)
        for line in failure_lines(output)[:20]:
            print(f"!!!   snakemake: {line}", flush=True)
        print(f"!!!   snakemake's output: {workdir / 'snakemake.out'}", flush=True)
    if keep or rc or missing:
        print(f"# kept {workdir}", flush=True)
    else:
        shutil.rmtree(workdir)
    return {"rules": per_rule(jobs), "missing": len(missing), "generate_s": generate_s,
            "workflow_s": workflow_s}


def ratio(big: float | None, small: float | None) -> float | None:
    return None if big is None or not small else big / small


def cell(value: float | None, digits: int = 0) -> str:
    return "missing" if value is None else f"{value:.{digits}f}"


def compare(dim: str, small: dict, big: dict, labels: tuple[str, str]) -> dict[str, float]:
    """Print the table of one pair of sizes; return its `<dim>_<rule>_*_ratio` figures."""
    header = ["rule", f"RSS MB {labels[0]}", f"RSS MB {labels[1]}", "ratio",
              f"s {labels[0]}", f"s {labels[1]}", "ratio"]
    rows, figures = [header], {}
    for rule in per_rule_union(small["rules"], big["rules"]):
        rss_s, t_s = small["rules"].get(rule, (None, None))
        rss_b, t_b = big["rules"].get(rule, (None, None))
        rss_r, t_r = ratio(rss_b, rss_s), ratio(t_b, t_s)
        figures[f"{dim}_{rule}_rss_ratio"] = rss_r
        figures[f"{dim}_{rule}_time_ratio"] = t_r
        rows.append([rule, cell(rss_s), cell(rss_b), cell(rss_r, 2), cell(t_s, 1),
                     cell(t_b, 1), cell(t_r, 2)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"\n{dim}: {labels[0]} -> {labels[1]}")
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return figures


def per_rule_union(small: dict, big: dict) -> list[str]:
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    return sorted(set(small) | set(big), key=lambda r: (order.get(r, len(order)), r))


def parse_pair(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'4096,16384' (square 2D edges) or '32x256x256,128x512x512' -> two shapes."""
    sizes = [tuple(int(e) for e in s.split("x")) for s in text.split(",")]
    sizes = [s * 2 if len(s) == 1 else s for s in sizes]
    if len(sizes) != 2 or len(sizes[0]) != len(sizes[1]) or len(sizes[0]) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give two sizes, e.g. 4096,16384 or "
                                         f"32x256x256,128x512x512")
    if min(min(s) for s in sizes) < 32:  # synthesize_nuclei's smallest edge
        raise argparse.ArgumentTypeError(f"{text!r}: every edge must be at least 32")
    return sizes[0], sizes[1]


def parse_tasks(text: str) -> list[str]:
    tasks = text.split(",")
    if not tasks or any(t not in TASKS for t in tasks):
        raise argparse.ArgumentTypeError(f"{text!r}: give tasks among {', '.join(TASKS)}")
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_pair, action="append",
                        help="a small and a big size, e.g. 1024,4096 or 16x128x128,32x256x512 "
                             f"(repeatable; default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--tasks", type=parse_tasks, default=None,
                        help="segmentation,regression: these tasks in every pair (default: "
                             "segmentation in 2D, regression in 3D)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of each model")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the working directories go (default: the system's tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the working directories")
    args = parser.parse_args()
    start = time.perf_counter()
    pairs = args.sizes or [parse_pair(s) for s in DEFAULT_SIZES]
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    missing = 0
    for small_shape, big_shape in pairs:
        dim = f"{len(small_shape)}d"
        tasks = args.tasks or DEFAULT_TASKS[len(small_shape)]
        small = measure(small_shape, tasks, base, args.steps, args.keep)
        big = measure(big_shape, tasks, base, args.steps, args.keep)
        missing += small["missing"] + big["missing"]
        labels = ("x".join(map(str, small_shape)), "x".join(map(str, big_shape)))
        figures.update(compare(dim, small, big, labels))
        for size, run in (("small", small), ("big", big)):
            seconds[f"{dim}_{size}_s"] = run["generate_s"] + run["workflow_s"]
    report(figures, seconds, missing, time.perf_counter() - start)


def report(figures: dict[str, float | None], seconds: dict[str, float], missing: int,
           total_s: float) -> None:
    """The `name: value` lines: per rule ratios, the largest, the misses, the times."""
    print()
    for name, value in figures.items():
        print(f"{name}: {cell(value, 3)}")
    for kind in ("rss", "time"):  # "missing" when a rule has no figure: the goal is unproven
        values = [v for k, v in figures.items() if k.endswith(f"_{kind}_ratio")]
        measured = [v for v in values if v is not None]
        print(f"max_{kind}_ratio: {cell(max(values) if measured == values else None, 3)}")
        if measured != values:
            print(f"max_{kind}_ratio_of_measured_rules: {cell(max(measured, default=None), 3)}")
    print(f"jobs_without_peak_line: {missing}")
    for name, value in seconds.items():  # per size: generating the data and the workflow
        print(f"{name}: {value:.0f}")
    print(f"total_s: {total_s:.0f}")
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
