"""Tiled prediction (unetflow.predict) against a pure forward pass and MONAI, and its memory.

Setup: a U-Net of depth 4, base 32 (7.8 M parameters, as in FACTS.md), random weights, 1
input and 1 output channel (regression), on a SIZE x SIZE synthetic nuclei image (a 1024^2
`synthesize_nuclei` scene tiled, uint16, chunks 1024, NGFF 0.5); unetflow tiles of TILE px
(default 1024) with the model's exact halo (exact_halo: 96), so each forward sees TILE + 192.
Everything runs on the CPU with the same two threads (unetflow's defaults: 2 dask workers x 1
torch thread). Each throughput timing is the best of --repeats (default 2) runs, the runs of
the contenders interleaved.

Ratios (higher is better):
- vs_pure_forward_ratio: unetflow zarr-to-zarr Mpx/s (output pixels / wall time of
  `predict_to_ome_zarr`: read, normalize, tile, forward, write the raw store, gather with a
  3-level pyramid and provenance) divided by the Mpx/s of a pure in-memory forward over the
  same tiles including their halo (numpy arrays prepared beforehand, same 2 workers x 1 torch
  thread, the same network and call unetflow runs: `prepare_for_inference`, then
  `forward_core`, which skips the decoder's work in the halo). Goal >= 0.9: the pipeline
  costs almost nothing beyond the network.
- core_vs_full_forward_ratio: seconds of plain forward passes over those tiles (output
  cropped afterwards) divided by seconds of `forward_core` over them: what skipping the
  decoder's halo saves.
- vs_monai_ratio: unetflow Mpx/s divided by the Mpx/s of output of MONAI
  `sliding_window_inference` (roi 512, overlap 0.25, gaussian blending, sw_batch_size 1,
  torch with 2 threads, image in memory), on the same image and the same model as a MONAI
  user runs it: the checkpoint's network loaded in eval mode. Goal >= 1.2 while staying
  exact; monai_max_abs_diff_vs_exact shows that MONAI's blended output is not the
  whole-image pass (unetflow's crop output is: tests/test_predict.py proves it).
- vs_monai_same_network_ratio: the same, but MONAI is handed the network unetflow runs
  (`prepare_for_inference`: batch norms folded, channels-last), so that the ratio isolates
  the tiling (exact halo against 25% overlap plus blending) from the faster network.
- workers_2x1_vs_1x2_ratio: pure forward Mpx/s with 2 workers x 1 torch thread divided by 1
  worker x 2 torch threads (two 512 tiles with halo): the measurement behind the defaults.
- rss_<task>_<large>_vs_2048_ratio: peak RSS of predicting a large image (16384^2; 8192^2
  for boundaries, RSS_LARGE) divided by that of a 2048^2 one (tiles RSS_TILE, default
  512), each prediction in a fresh subprocess started before the throughput part
  allocates anything. The peak is the child's VmHWM; ru_maxrss
  (resource.getrusage) is printed beside it, as it also counts the parent's memory at the
  fork. A cheap U-Net (depth 2, base 2, no norm) makes 268 megapixels fit in the time; the
  memory path (units, stores, pyramid, labels) is the same. For segmentation its class-1
  bias is set so that 30% of pixels are foreground (many objects to label). The boundaries
  task (rss_boundaries_*) is a segmentation model of 3 classes whose checkpoint says
  model_settings target: boundaries, so its labels are seeds grown by the watershed
  (unetflow.watershed); its weights are set (boundary_model, not random) so that about 20%
  of pixels are interior and 12% boundary, in blobs and rims. Its large image is 8192^2
  (16x the pixels) to keep the whole bench under 10 minutes on 2 cores: the watershed's
  per-clump growth made 16384^2 take 200 s (measured once there: 441.7 -> 488.7 MB, ratio
  1.106, 147,280 objects). Goal <= 1.25.

On CUDA (bench/predict_gpu_check.sh): --device cuda --amp both --batch-size N runs the
throughput part with AMP off and on (bf16 where supported); the pure forward then moves
batches of tiles host -> GPU -> host, MONAI runs on the GPU with sw_batch_size N.

Run: .venv/bin/python bench/predict.py [--size 2048] [--tile 1024] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as da
import numpy as np
import torch
from torch import nn

from unetflow.config import section_settings
from unetflow.demo import synthesize_nuclei
from unetflow.model.checkpoint import new_checkpoint
from unetflow.model.checkpoint import save_checkpoint as save_checkpoint_file
from unetflow.model.inference import prepare_for_inference
from unetflow.model.unet import UNet, exact_halo
from unetflow.normalize import compute_dataset_stats, normalize_array, read_stats, write_stats
from unetflow.ome import open_image, write_image
from unetflow.predict import predict_to_ome_zarr
from unetflow.tiling import reflect_indices

STATS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 4096, "mask": None}
# the schema's predict defaults, except: outputs in normalized units (the model is random, so
# mapping back to input units means nothing) and the device chosen on the command line
SETTINGS = section_settings("predict", {"output_units": "normalized"})
THREADS = 2
MONAI_ROI = 512  # sliding_window_inference's roi, as the issue fixes it


def write_source(root: Path, size: int, name: str = "image") -> tuple[str, str]:
    """A tiled nuclei scene as uint16 NGFF 0.5 (written chunk by chunk) and its statistics."""
    path, stats = root / f"{name}.ome.zarr", root / f"{name}.json"
    if path.exists() and stats.exists():
        return str(path), str(stats)
    scene = synthesize_nuclei((1024, 1024), seed=7).noisy
    scene = np.clip(scene * 100 + 100, 0, 65535).astype(np.uint16)
    reps = -(-size // 1024)
    tiled = da.tile(da.from_array(scene, chunks=1024), (reps, reps))[:size, :size]
    write_image(path, tiled[None], ["c", "y", "x"], chunks=(1, 1024, 1024))
    write_stats(compute_dataset_stats(str(path), None, STATS, name), stats)
    return str(path), str(stats)


def build_model(depth: int, base: int, norm: str, channels_out: int = 1, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(2, 1, channels_out, depth=depth, base_features=base, norm=norm).eval()


def save_checkpoint(model: UNet, path: Path, task: str,
                    model_settings: dict | None = None) -> str:
    """A checkpoint as the trainer writes it; `model_settings` (the model section: target)
    stored beside the weights when given."""
    normalization = {"method": "percentile", "clip": False, "datasets": {}}
    extra = {"model_settings": model_settings} if model_settings else {}
    save_checkpoint_file(path, new_checkpoint(model, task, normalization, **extra))
    return str(path)


def tile_inputs(x: np.ndarray, tile: int, halo: int) -> list[np.ndarray]:
    """The tiles unetflow feeds the model: each tile with its halo, reflection outside."""
    size_y, size_x = x.shape[1:]
    tiles = []
    for y0 in range(0, size_y, tile):
        for x0 in range(0, size_x, tile):
            iy = reflect_indices(y0 - halo, min(y0 + tile, size_y) + halo, size_y)
            ix = reflect_indices(x0 - halo, min(x0 + tile, size_x) + halo, size_x)
            tiles.append(np.ascontiguousarray(x[:, iy][:, :, ix][None]))
    return tiles


def pure_forward_seconds(model: UNet, tiles: list[np.ndarray], workers: int, threads: int,
                         device: torch.device | None = None, batch_size: int = 1,
                         amp_dtype: torch.dtype | None = None, halo: int = 0) -> float:
    """Wall time of the forward passes alone, `workers` tiles at once (CPU). With `halo`,
    the cores only (`forward_core`, what unetflow's crop blending runs).

    On CUDA: batches of `batch_size` equal-shaped tiles, copied host -> GPU -> host (pinned
    memory), one after another: the ceiling for a pipeline that reads from and writes to
    host memory.
    """
    torch.set_num_threads(threads)
    if device is not None and device.type == "cuda":
        return _cuda_forward_seconds(model, tiles, device, batch_size, amp_dtype, halo)

    def run(tile: np.ndarray) -> None:
        with torch.inference_mode():
            x = torch.from_numpy(tile)
            model.forward_core(x, halo) if halo else model(x)

    run(tiles[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, tiles))
    return time.perf_counter() - start


def _cuda_forward_seconds(model: UNet, tiles: list[np.ndarray], device: torch.device,
                          batch_size: int, amp_dtype: torch.dtype | None, halo: int) -> float:
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for tile in tiles:
        by_shape.setdefault(tile.shape, []).append(tile)
    batches = [np.concatenate(group[i:i + batch_size])
               for group in by_shape.values() for i in range(0, len(group), batch_size)]

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).pin_memory().to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            y = model.forward_core(x, halo) if halo else model(x)
            return y.float().cpu().numpy()

    run(batches[0])  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def monai_seconds(model: UNet, x: np.ndarray, tile: int, device: torch.device,
                  batch_size: int, amp_dtype: torch.dtype | None,
                  threads: int) -> tuple[float, np.ndarray]:
    from monai.inferers import sliding_window_inference  # main() made sure it is there
    torch.set_num_threads(threads)
    inputs = torch.from_numpy(x[None]).to(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
        y = sliding_window_inference(inputs, roi_size=(tile, tile), sw_batch_size=batch_size,
                                     predictor=model, overlap=0.25, mode="gaussian")
    y = y.float().cpu()
    return time.perf_counter() - start, y[0].numpy()


def throughput(root: Path, size: int, tile: int, device: torch.device, amp: bool,
               batch_size: int, threads: int, repeats: int) -> dict[str, float]:
    """Pure forward, unetflow and MONAI on the same image, model and tiles, side by side."""
    image, stats = write_source(root, size)
    model = build_model(4, 32, "batch").to(device)
    halo = exact_halo(model)
    ckpt = save_checkpoint(model, root / "model.pt", "regression")
    data = np.asarray(open_image(image).data.compute(), dtype=np.float32)
    x = normalize_array(data, read_stats(stats), "percentile", False)
    tiles = tile_inputs(x, tile, halo)
    megapixels = size * size / 1e6
    figures_setup = {"tile": tile, "monai_roi": MONAI_ROI}
    amp_dtype = None
    if amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    figures: dict[str, float] = {"image_megapixels": megapixels, "tiles": len(tiles),
                                 "halo": halo, **figures_setup}

    network = prepare_for_inference(model, device)  # what unetflow's TileRunner runs
    out = root / "pred.ome.zarr"
    settings = {**SETTINGS, "tile_shape": [tile, tile], "device": device.type, "amp": amp,
                "batch_size": batch_size}

    def unetflow_seconds() -> float:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        predict_to_ome_zarr(ckpt, image, stats, None, settings, str(out), "bench", "image",
                            threads=threads)
        return time.perf_counter() - start

    def monai(net: UNet) -> tuple[float | None, np.ndarray | None]:
        return monai_seconds(net, x, MONAI_ROI, device, batch_size, amp_dtype, threads)

    runs: dict[str, list[float]] = {}
    blended = None
    for _ in range(repeats):  # interleaved, so that a noisy spell hits every contender
        for name, run in (
                ("pure", lambda: pure_forward_seconds(network, tiles, threads, 1, device,
                                                      batch_size, amp_dtype, halo)),
                ("full", lambda: pure_forward_seconds(network, tiles, threads, 1, device,
                                                      batch_size, amp_dtype)),
                ("ours", unetflow_seconds)):
            runs.setdefault(name, []).append(run())
        for name, net in (("monai", model), ("monai_same", network)):
            seconds, y = monai(net)
            runs.setdefault(name, []).append(seconds)
            blended = y if blended is None and name == "monai" else blended
    best = {name: min(times) for name, times in runs.items()}
    pure, full, ours = best["pure"], best["full"], best["ours"]
    figures["repeats"] = repeats
    figures["pure_forward_mpx_s"] = megapixels / pure
    figures["unetflow_mpx_s"] = megapixels / ours
    figures["vs_pure_forward_ratio"] = pure / ours
    figures["full_forward_mpx_s"] = megapixels / full
    figures["core_vs_full_forward_ratio"] = full / pure
    exact = np.asarray(open_image(out).data.compute())
    exact = exact if exact.ndim == 3 else exact[None]
    figures["monai_mpx_s"] = megapixels / best["monai"]
    figures["vs_monai_ratio"] = best["monai"] / ours
    figures["monai_max_abs_diff_vs_exact"] = float(np.abs(blended - exact).max())
    figures["exact_output_std"] = float(exact.std())
    figures["monai_same_network_mpx_s"] = megapixels / best["monai_same"]
    figures["vs_monai_same_network_ratio"] = best["monai_same"] / ours
    shutil.rmtree(out, ignore_errors=True)

    if device.type == "cpu":  # two 512 tiles with halo: enough to compare thread layouts
        subset = tile_inputs(x[:, :512, :1024], 512, halo)
        figures["workers_2x1_vs_1x2_ratio"] = (pure_forward_seconds(network, subset, 1, 2)
                                               / pure_forward_seconds(network, subset, 2, 1))
    return figures


def rss_child(args: argparse.Namespace) -> None:
    """Predict one prepared image in this fresh process and print the peak RSS (MB)."""
    settings = {**SETTINGS, "tile_shape": [args.tile, args.tile], "device": "cpu"}
    start = time.perf_counter()
    summary = predict_to_ome_zarr(args.checkpoint, args.image, args.stats, None, settings,
                                  args.output, "bench", "image", threads=THREADS)
    seconds = time.perf_counter() - start
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb() or maxrss_mb, "ru_maxrss_mb": maxrss_mb,
                      "seconds": seconds, "labels": summary.get("labels")}))


def _vm_hwm_mb() -> float | None:
    """This process's own peak RSS (Linux VmHWM). ru_maxrss of a child started by fork and
    exec also counts the parent's memory at the fork, so it is reported beside it only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _sample(image: str, stats: str) -> torch.Tensor:
    data = np.asarray(open_image(image).data[:, :1024, :1024].compute(), dtype=np.float32)
    return torch.from_numpy(normalize_array(data, read_stats(stats), "percentile", False)[None])


def segmenting_model(model: UNet, image: str, stats: str, foreground: float = 0.3) -> UNet:
    """Shift the class-1 bias of a random 2-class model so that `foreground` of a sample is
    foreground: its output then has objects, and the labelling has real work to do."""
    with torch.inference_mode():
        logits = model(_sample(image, stats))[0]
        margin = (logits[1] - logits[0]).flatten()
        model.head.bias[1] -= torch.quantile(margin[::16], 1 - foreground)
    return model


def boundary_model(model: UNet, image: str, stats: str, interior: float = 0.2,
                   boundary: float = 0.12, margin: float = 3.0) -> UNet:
    """Set the weights of a 3-class model (background, interior, boundary) so that the
    brightest `interior` of a sample's pixels are interior, the next `boundary` boundary and
    the rest background, after a blur: nuclei centres become seeds and their rims what the
    watershed grows over, as a trained model's maps look.

    A random network's output has no such structure: its logits are a checkerboard of the
    transposed convolutions (correlation with the image 1e-5; the top quarter of a 1024^2
    sample forms some 250,000 objects of one pixel), so every seed would be dropped and
    nothing grown. Here the first channel runs through the full-resolution convolutions as a 3x3
    box filter (four in all), everything else is zero, and the head turns that blurred
    image g into logits: background -k(z - z1), interior k(z - z2), boundary 0, with z = g
    standardized, z1 < z2 its quantiles, and k putting the middle of the boundary band
    `margin` logits from either neighbour.
    """
    convs = [m for m in (*model.encoders[0], *model.decoders[0]) if isinstance(m, nn.Conv2d)]
    skip = model.decoders[0][0].in_channels // 2  # the decoder reads [upsampled, skip]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for conv, channel in zip(convs, (0, 0, skip, 0), strict=True):
            conv.weight[0, channel] = 1 / 9
        with torch.inference_mode():
            head_input = {}
            hook = model.head.register_forward_hook(
                lambda module, args, out: head_input.setdefault("g", args[0][0, 0]))
            model(_sample(image, stats))
            hook.remove()
        g = head_input["g"]
        mean, std = float(g.mean()), float(g.std())
        z = ((g - mean) / std).flatten()[::16]
        z1, z2 = (float(torch.quantile(z, q)) for q in (1 - interior - boundary, 1 - interior))
        k = 2 * margin / max(z2 - z1, 1e-6)
        for label, (slope, offset) in enumerate(((-k, k * z1), (k, -k * z2), (0.0, 0.0))):
            model.head.weight[label, 0] = slope / std  # logit = slope * z + offset
            model.head.bias[label] = offset - slope * mean / std
    return model


# the RSS tasks: checkpoint task, output classes, what makes the model's output segment
# something, and the model_settings stored in the checkpoint
RSS_TASKS = {
    "regression": ("regression", 1, None, None),
    "segmentation": ("segmentation", 2, segmenting_model, None),
    "boundaries": ("segmentation", 3, boundary_model,
                   {"target": "boundaries", "num_classes": 3, "boundary_width": 2}),
}


def peak_rss(root: Path, size: int, tile: int, task: str) -> dict[str, float]:
    image, stats = write_source(root, size, f"rss{size}")
    kind, classes, segmenting, model_settings = RSS_TASKS[task]
    model = build_model(2, 2, "none", classes)
    if segmenting:
        model = segmenting(model, *write_source(root, 2048, "rss2048"))
    ckpt = save_checkpoint(model, root / f"rss_{task}.pt", kind, model_settings)
    cmd = [sys.executable, __file__, "--rss-child", "--task", task, "--checkpoint", ckpt,
           "--image", image, "--stats", stats, "--tile", str(tile),
           "--output", str(root / f"rss_{task}_{size}.ome.zarr")]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# the large image of each RSS task (default 16384^2): see the module docstring
RSS_LARGE = {"boundaries": 8192}


def rss_figures(root: Path, tile: int, tasks: list[str]) -> dict[str, float]:
    """Peak RSS of a large image (RSS_LARGE) against 2048^2, per task, each in a fresh
    subprocess."""
    figures: dict[str, float] = {}
    for task in tasks:
        big = RSS_LARGE.get(task, 16384)
        small = peak_rss(root, 2048, tile, task)
        large = peak_rss(root, big, tile, task)
        figures[f"rss_{task}_2048_mb"] = small["peak_rss_mb"]
        figures[f"rss_{task}_{big}_mb"] = large["peak_rss_mb"]
        figures[f"rss_{task}_{big}_s"] = large["seconds"]
        figures[f"rss_{task}_{big}_ru_maxrss_mb"] = large["ru_maxrss_mb"]
        if large.get("labels") is not None:
            figures[f"rss_{task}_{big}_objects"] = large["labels"]
        figures[f"rss_{task}_{big}_vs_2048_ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
        for size in (2048, big):  # free the disk between tasks
            shutil.rmtree(root / f"rss_{task}_{size}.ome.zarr", ignore_errors=True)
    return figures


def require_monai() -> None:
    """Stop before any work when MONAI is missing: without it the run would end without its
    vs_monai figures, the headline comparison, and say nothing."""
    try:
        from monai.inferers import sliding_window_inference  # noqa: F401
    except ImportError as error:
        print(f"bench/predict.py: MONAI is not installed ({error}); run 'make install-bench' "
              "(or pip install -c envs/constraints.txt -e '.[bench]')", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--rss-tile", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["off", "on", "both"], default="off",
                        help="CUDA autocast (bf16 where supported, else fp16)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--repeats", type=int, default=2,
                        help="throughput timings are the best of this many interleaved runs")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-tasks", default=",".join(RSS_TASKS))
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    for name in ("task", "checkpoint", "image", "stats", "output"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    require_monai()  # not in the child above: importing it would add to the peak RSS measured
    device = torch.device(args.device)
    figures: dict[str, float | str] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        root = Path(tmp)
        if not args.skip_rss:  # first, while this parent process is still small
            figures.update(rss_figures(root, args.rss_tile, args.rss_tasks.split(",")))
        amps = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
        for amp in amps:
            start = time.perf_counter()
            prefix = ("amp_" if amp else "fp32_") if len(amps) > 1 else ""
            part = throughput(root, args.size, args.tile, device, amp, args.batch_size,
                              args.threads, args.repeats)
            figures.update({f"{prefix}{k}": v for k, v in part.items()})
            figures[f"{prefix}throughput_part_s"] = time.perf_counter() - start
    ordered = sorted(figures.items(), key=lambda item: item[0].endswith("_ratio"))
    for name, value in ordered:  # the headline ratios last
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
