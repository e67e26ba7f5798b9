"""Tiled prediction over OME-Zarr with dask: chunk-aligned tiles, each read with a halo.

A U-Net with pooling is shift-equivariant only for shifts that are multiples of 2**depth, so
tile origins (chunk boundaries) and the halo both sit on that grid; with a halo at least the
receptive-field radius, `crop` output equals one whole-image pass over the reflect-padded image.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr

import unetflow
from unetflow.model.unet import UNet, halo_for
from unetflow.normalize import denormalize_array, normalize_array, read_stats
from unetflow.ome import channel_first, open_image, write_image, write_label_image
from unetflow.train import choose_device, load_checkpoint

__all__ = ["load_model", "default_halo", "predict_array", "predict_to_ome_zarr", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(checkpoint: dict[str, Any], device: torch.device) -> UNet:
    model = UNet(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["model_state"])
    return model.to(device).eval()


def default_halo(model: UNet) -> int:
    """The receptive-field radius rounded up to the 2**depth grid."""
    return halo_for(model)


def _run_model(block: np.ndarray, model: UNet, spatial_dims: int, device: torch.device,
               amp: bool, softmax: bool) -> np.ndarray:
    """Forward one tile (C, *spatial); extra leading spatial axes (z for a 2D model) are
    run slice by slice as a batch."""
    extra = block.ndim - 1 - spatial_dims
    x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    if extra:  # (C, Z, Y, X) with a 2D model -> (Z, C, Y, X)
        x = x.movedim(1, 0)
    else:
        x = x[None]
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    with torch.inference_mode(), ctx:
        y = model(x.to(device)).float()
        if softmax:
            y = torch.softmax(y, dim=1)
    y = y.cpu()
    y = y.movedim(0, 1) if extra else y[0]
    return y.numpy()


def predict_array(model: UNet, data: da.Array, halo: int, tile_shape: tuple[int, ...],
                  device: torch.device, amp: bool = False, softmax: bool = False) -> da.Array:
    """Lazy model output (K, *spatial) for normalized `data` (C, *spatial).

    The spatial axes the model sees are chunked to `tile_shape` and overlapped by `halo`
    with reflection at the image border; other axes (z for a 2D model) get no overlap.
    """
    dims = model.config()["spatial_dims"]
    n_extra = data.ndim - 1 - dims
    chunks = (data.shape[0],) + tuple(1 for _ in range(n_extra)) + tuple(tile_shape)
    data = data.rechunk(chunks)
    depth = {0: 0, **{1 + i: 0 for i in range(n_extra)},
             **{1 + n_extra + i: halo for i in range(dims)}}
    out_channels = model.config()["out_channels"]
    padded = da.overlap.overlap(data, depth=depth, boundary={k: ("reflect" if v else "none")
                                                             for k, v in depth.items()})
    out = padded.map_blocks(_run_model, model=model, spatial_dims=dims, device=device, amp=amp,
                            softmax=softmax, dtype=np.float32,
                            chunks=((out_channels,),) + padded.chunks[1:],
                            meta=np.empty((0,) * data.ndim, dtype=np.float32))
    return da.overlap.trim_internal(out, depth, boundary={k: ("reflect" if v else "none")
                                                          for k, v in depth.items()})


def _instances(foreground: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, _count = ndimage.label(foreground)
    return labels.astype(np.uint32)


def _provenance(model_name: str, dataset: str, checkpoint_path: str, checkpoint: dict,
                settings: dict, stats: dict, halo: int) -> dict[str, Any]:
    return {"model": model_name, "dataset": dataset, "checkpoint": str(checkpoint_path),
            "checkpoint_sha256": file_sha256(checkpoint_path), "task": checkpoint["task"],
            "step": checkpoint["step"], "predict": settings, "halo": halo,
            "normalize": checkpoint["normalize"], "normalization": stats,
            "model_config": checkpoint["model_config"], "unetflow_version": unetflow.__version__}


def predict_to_ome_zarr(checkpoint_path: str, image_path: str, stats_path: str,
                        channels: list | None, settings: dict[str, Any], output: str,
                        model_name: str, dataset: str, threads: int = 1) -> None:
    """Predict one dataset and write an NGFF 0.5 store with provenance, atomically."""
    checkpoint = load_checkpoint(checkpoint_path)
    device = choose_device(settings["device"])
    workers = settings.get("dask_workers") or max(1, threads)
    torch.set_num_threads(settings.get("threads") or max(1, threads // workers))
    model = load_model(checkpoint, device)
    halo = settings["halo"] if settings["halo"] is not None else default_halo(model)
    image = open_image(image_path, level=settings["level"])
    stats = read_stats(stats_path)
    norm = checkpoint["normalize"]
    data = normalize_array(channel_first(image, channels), stats, norm["method"], norm["clip"])
    segmentation = checkpoint["task"] == "segmentation"
    lazy = predict_array(model, data, halo, tuple(settings["tile_shape"]), device,
                         settings["amp"], softmax=segmentation)
    out_path = Path(output)
    scratch = out_path.with_name(out_path.name + ".raw.zarr")
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        with dask.config.set(scheduler="threads", num_workers=workers):
            lazy.to_zarr(str(scratch), overwrite=True)
        _write_output(da.from_zarr(str(scratch)), image, stats, norm, settings, out_path,
                      _provenance(model_name, dataset, checkpoint_path, checkpoint, settings,
                                  stats, halo), segmentation)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_output(raw: da.Array, image, stats: dict, norm: dict, settings: dict,
                  out_path: Path, provenance: dict, segmentation: bool) -> None:
    axes = ["c", *image.spatial_axes[-(raw.ndim - 1):]]
    spatial_scale = image.spatial_scale()
    scale = {"c": 1.0, **{a: spatial_scale[a] for a in axes[1:]}}
    chunks = tuple(settings["chunks"]) if settings.get("chunks") else None
    if segmentation:
        _write_segmentation(raw, out_path, axes, scale, image.units, chunks, settings, provenance)
    else:
        if settings["output_units"] == "input":
            raw = denormalize_array(raw, stats, norm["method"])
        write_image(out_path, raw.astype(np.float32), axes, scale=scale, units=image.units,
                    pyramid_levels=settings["pyramid_levels"], chunks=chunks, attrs=provenance)


def _write_segmentation(probabilities: da.Array, out_path: Path, axes: list[str],
                        scale: dict[str, float], units: dict[str, str],
                        chunks: tuple[int, ...] | None, settings: dict[str, Any],
                        provenance: dict[str, Any]) -> None:
    classes = probabilities.argmax(axis=0).astype(np.uint32)
    if settings["instances"]:
        labels = _instances(classes.compute() > 0)
    else:
        labels = classes.compute()
    root = probabilities if settings["probabilities"] else da.from_array(labels[None])
    tmp = out_path.with_name(out_path.name + ".labels.tmp")
    write_image(tmp, root, axes, scale=scale, units=units,
                pyramid_levels=settings["pyramid_levels"], chunks=chunks, attrs=provenance)
    write_label_image(tmp, "prediction", labels, axes[1:],
                      scale={a: scale[a] for a in axes[1:]}, units=units,
                      chunks=chunks[1:] if chunks else None,
                      pyramid_levels=settings["pyramid_levels"])
    zarr.open_group(str(tmp), mode="r+").attrs["unetflow"] = provenance
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)
