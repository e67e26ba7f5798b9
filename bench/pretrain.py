"""Learning from little data, on the demo's synthetic nuclei, measured side by side in one run.

The data: a training scene (1024 x 1024) and a held-out scene (512 x 512) of the demo's kind
(unetflow.demo.synthesize_nuclei: noisy recording, clean scene, instance labels), written
as OME-Zarr and put through the workflow's own stages in process: normalization
statistics, patch extraction (64 x 64 patches), the Trainer (the demo's model: depth 3,
base 16, batch 8, learning rate 0.002), and a whole-image forward pass on the held-out
scene (512 x 512 fits the receptive field's grid). Scores are those of `unetflow.metrics`
on the held-out scene, in normalized units (the training statistics):

  augment_rich_vs_basic_iou_ratio   foreground IoU of a segmentation model trained on a small
                                    crop (256 x 512) with the rich augmentations
                                    (unetflow.augment.RICH_AUGMENT, nnU-Net's probabilities)
                                    / the same with today's (flips, rot90, intensity), equal
                                    steps.
  augment_rich_vs_basic_psnr_db     PSNR (dB) of a supervised denoiser on the same crop with
                                    the rich set minus with today's set, equal steps.
  n2v_psnr_db, input_psnr_db, gaussian_psnr_db, tv_psnr_db, nlm_psnr_db
                                    PSNR of a model.target n2v denoiser trained on the noisy
                                    training scene alone (its clean scene never read; 5% of
                                    the pixels masked, learning rate 0.004), of the
                                    noisy input, and of the Gaussian, total-variation and
                                    non-local-means baselines tuned on crops of the training
                                    scene against its clean version (as rule tune_baseline).
  n2v_vs_gaussian_db                n2v PSNR minus the tuned Gaussian's (goal > 0).
  n2v_vs_best_classical_db          n2v PSNR minus the best of Gaussian, TV and NLM.
  finetune_vs_scratch_iou_ratio     foreground IoU of a segmentation model trained on 32
                                    labelled patches starting from the n2v model's encoder
                                    (train.init_encoder_only) / the same model from scratch,
                                    equal steps, each the mean over 3 seeds (patch sampling
                                    and initialisation).

Usage: .venv/bin/python bench/pretrain.py [--steps-scale 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetflow.augment import RICH_AUGMENT
from unetflow.config import model_section, section_settings, validate_config
from unetflow.demo import synthesize_nuclei
from unetflow.evaluate import tuning_crops
from unetflow.metrics import (
    gaussian_smooth,
    nlm_denoise,
    noise_sd,
    psnr,
    tune_candidates,
    tv_denoise,
)
from unetflow.model.checkpoint import save_checkpoint
from unetflow.normalize import compute_dataset_stats, normalize_array, write_stats
from unetflow.ome import write_image
from unetflow.patches import DatasetInput, extract_patches
from unetflow.train import Trainer

PATCH = 64
CROP = (slice(0, 256), slice(0, 512))  # the small training set of the augmentation runs
STATS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 4096, "mask": None}
NORMALIZE = {"method": "percentile", "clip": False}
FEW_LABELS = 32
# Noise2Void as the demo trains it (config/pretrain.yaml): 5% of the pixels masked, not the
# published 0.2%, and a rate of 0.004, so that it learns within a CPU minute (on this data,
# 600 steps: 0.2% at 0.002 reached 32.5 dB, 5% at 0.002 33.4 dB, 5% at 0.004 34.1 dB)
N2V_FRACTION, N2V_RATE = 0.05, 0.004
SEEDS = (0, 1, 2)


def write_scene(root: Path, name: str, scene, box=(slice(None), slice(None))) -> dict[str, str]:
    """The noisy image, clean image and labels of `scene` (cut to `box`) as OME-Zarr."""
    paths = {}
    for kind, data in (("image", scene.noisy), ("clean", scene.clean), ("labels", scene.labels)):
        paths[kind] = str(root / f"{name}_{kind}.ome.zarr")
        write_image(paths[kind], np.asarray(data[box])[None], ["c", "y", "x"],
                    chunks=(1, 256, 256))
    stats = compute_dataset_stats(paths["image"], None, STATS, name)
    paths["stats"] = str(root / f"{name}.json")
    write_stats(stats, paths["stats"])
    return paths


def sections(task: str, steps: int, threads: int, model: dict | None = None,
             **train: Any) -> tuple[dict, dict]:
    config = validate_config({
        "datasets": {"d": {"image": "i", "target": "t"}},
        "models": {"m": {"task": task, "train_on": ["d"]}},
        "patches": {"shape": [PATCH, PATCH]}, "predict": {"tile_shape": [PATCH, PATCH]},
        "model": {"depth": 3, "base_features": 16, **(model or {})},
        "train": {"batch_size": 8, "steps": steps, "learning_rate": 0.002,
                  "validate_every": max(steps // 4, 1), "device": "cpu",
                  "threads": threads, **train}})
    return model_section(config, "m", "model"), model_section(config, "m", "train")


def extract(root: Path, name: str, scene: dict[str, str], task: str, per_dataset: int,
            seed: int = 0, target: dict | None = None) -> str:
    store = root / f"{name}.zarr"
    label = scene["labels"] if task == "segmentation" else scene["clean"]
    ds = DatasetInput(name, scene["image"], None if target else label, scene["stats"])
    settings = {"shape": [PATCH, PATCH], "per_dataset": per_dataset, "per_megapixel": None,
                "foreground_fraction": 0.33, "min_foreground": 0.0, "max_attempts": 50,
                "validation": "block", "validation_fraction": 0.2,
                "validation_datasets": [], "seed": seed}
    extract_patches([ds], task, settings, NORMALIZE, 2, None, store, root / f"{name}.tsv",
                    target=target)
    return str(store)


def train(root: Path, name: str, store: str, task: str, model: dict, settings: dict) -> Trainer:
    trainer = Trainer(store, str(root / name), task, model, settings,
                      threads=settings["threads"])
    trainer.run(progress=False)
    trainer.model.eval()
    return trainer


def normalized(path: str, stats_path: str) -> np.ndarray:
    """An image (1, Y, X) normalized with a dataset's statistics, as prediction does."""
    import json

    from unetflow.ome import open_image

    stats = json.loads(Path(stats_path).read_text())
    return np.asarray(normalize_array(np.asarray(open_image(path).data, np.float32)[:1],
                                      stats, **NORMALIZE))


@torch.no_grad()
def forward(trainer: Trainer, image: np.ndarray) -> np.ndarray:
    return trainer.model(torch.from_numpy(image[None]))[0].numpy()


def foreground_iou(trainer: Trainer, image: np.ndarray, labels: np.ndarray) -> float:
    predicted, truth = forward(trainer, image).argmax(0) > 0, labels > 0
    return float((predicted & truth).sum() / max((predicted | truth).sum(), 1))


def held_out_psnr(prediction: np.ndarray, clean: np.ndarray) -> float:
    return psnr(prediction, clean, float(clean.max() - clean.min()))


def tuned_baselines(train_scene: dict[str, str], test_image: np.ndarray,
                    test_clean: np.ndarray) -> dict[str, float]:
    """PSNR of the Gaussian, TV and NLM baselines on the held-out scene, each tuned as rule
    tune_baseline tunes it (the evaluate section's candidates and crops, least MSE to the
    clean version) on the training scene, in normalized units (the baselines are
    equivariant to the affine normalization: TV's weight and NLM's h are multiples of the
    noise sd estimated on the crops)."""
    settings = section_settings("evaluate", {})
    image = normalized(train_scene["image"], train_scene["stats"])
    clean = normalized(train_scene["clean"], train_scene["stats"])
    pairs = [(image[(slice(None), *box)], clean[(slice(None), *box)])
             for box in tuning_crops(image.shape[1:], settings["tuning_crop_size"],
                                     settings["tuning_crops"])]
    noise = [noise_sd([crop[0] for crop, _ in pairs])]
    denoisers = {"gaussian": (settings["gaussian_sigmas"], lambda x, v: gaussian_smooth(x, v)),
                 "tv": (settings["tv_weights"], lambda x, v: tv_denoise(x, v, noise)),
                 "nlm": (settings["nlm_strengths"], lambda x, v: nlm_denoise(x, v, noise))}
    found = {}
    for name, (candidates, denoise) in denoisers.items():
        best, _ = tune_candidates(pairs, candidates, denoise)
        found[name] = held_out_psnr(denoise(test_image, best), test_clean)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: max(int(n * args.steps_scale), 4)
             for name, n in (("augment", 400), ("n2v", 600), ("few", 200))}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_scene_data = synthesize_nuclei((1024, 1024), seed=42)
        test_scene_data = synthesize_nuclei((512, 512), seed=43)
        full = write_scene(root, "train", train_scene_data)
        crop = write_scene(root, "crop", train_scene_data, CROP)
        test = write_scene(root, "test", test_scene_data)
        test_image = normalized(test["image"], full["stats"])
        test_clean = normalized(test["clean"], full["stats"])
        test_labels = np.asarray(test_scene_data.labels)
        # the crop's patches are normalized with its own statistics; score it with them
        crop_image = normalized(test["image"], crop["stats"])
        crop_clean = normalized(test["clean"], crop["stats"])

        # 1. today's augmentations against the rich set, on a small crop, equal steps
        results: dict[str, float] = {}
        for task in ("segmentation", "regression"):
            store = extract(root, f"crop_{task}", crop, task, 128)
            for kind in ("basic", "rich"):
                augment = {} if kind == "basic" else RICH_AUGMENT
                model, settings = sections(task, steps["augment"], args.threads,
                                           augment=augment)
                trainer = train(root, f"{task}_{kind}", store, task, model, settings)
                if task == "segmentation":
                    results[f"seg_{kind}"] = foreground_iou(trainer, crop_image, test_labels)
                else:
                    results[f"dn_{kind}"] = held_out_psnr(forward(trainer, crop_image),
                                                          crop_clean)
            print(f"augmentations ({task}) done at {time.perf_counter() - started:.0f} s",
                  flush=True)

        # 2. Noise2Void on the noisy training scene alone
        n2v_store = extract(root, "n2v", full, "regression", 400, target={"target": "n2v"})
        model, settings = sections("regression", steps["n2v"], args.threads,
                                   model={"target": "n2v"}, learning_rate=N2V_RATE,
                                   blind_spot={"fraction": N2V_FRACTION})
        n2v = train(root, "n2v", n2v_store, "regression", model, settings)
        n2v_checkpoint = str(root / "n2v.pt")
        save_checkpoint(n2v_checkpoint, n2v.payload())
        n2v_psnr = held_out_psnr(forward(n2v, test_image), test_clean)
        baselines = tuned_baselines(full, test_image, test_clean)
        print(f"n2v done at {time.perf_counter() - started:.0f} s", flush=True)

        # 3. few labels: fine-tuned from the n2v encoder against from scratch, 3 seeds
        ious: dict[str, list[float]] = {"finetuned": [], "scratch": []}
        for seed in SEEDS:
            store = extract(root, f"few_{seed}", full, "segmentation", FEW_LABELS, seed=seed)
            for kind in ious:
                start = {"init_from": n2v_checkpoint, "init_encoder_only": True} \
                    if kind == "finetuned" else {}
                model, settings = sections("segmentation", steps["few"], args.threads,
                                           seed=seed, **start)
                trainer = train(root, f"few_{kind}_{seed}", store, "segmentation", model,
                                settings)
                ious[kind].append(foreground_iou(trainer, test_image, test_labels))
        print(f"few labels done at {time.perf_counter() - started:.0f} s", flush=True)

    print(f"seg_iou_basic: {results['seg_basic']:.4f}")
    print(f"seg_iou_rich: {results['seg_rich']:.4f}")
    print(f"denoise_psnr_basic_db: {results['dn_basic']:.2f}")
    print(f"denoise_psnr_rich_db: {results['dn_rich']:.2f}")
    for kind in ious:
        print(f"few_labels_iou_{kind}: {np.mean(ious[kind]):.4f} "
              f"(seeds: {', '.join(f'{v:.4f}' for v in ious[kind])})")
    print(f"input_psnr_db: {held_out_psnr(test_image, test_clean):.2f}")
    for name, value in baselines.items():
        print(f"{name}_psnr_db: {value:.2f}")
    print(f"n2v_psnr_db: {n2v_psnr:.2f}")
    print(f"runtime_s: {time.perf_counter() - started:.0f}")
    print(f"augment_rich_vs_basic_iou_ratio: {results['seg_rich'] / results['seg_basic']:.3f}")
    print(f"augment_rich_vs_basic_psnr_db: {results['dn_rich'] - results['dn_basic']:.2f}")
    print(f"n2v_vs_gaussian_db: {n2v_psnr - baselines['gaussian']:.2f}")
    print(f"n2v_vs_best_classical_db: {n2v_psnr - max(baselines.values()):.2f}")
    print(f"finetune_vs_scratch_iou_ratio: "
          f"{np.mean(ious['finetuned']) / np.mean(ious['scratch']):.3f}")


if __name__ == "__main__":
    main()
