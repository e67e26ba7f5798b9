"""A trained model as a bioimage.io package (model spec 0.5), built with bioimageio.spec.

The package runs in the tools of the BioImage Model Zoo (ilastik, deepImageJ, Fiji, napari,
bioimageio.core) without unetflow's pipeline around it, so what the pipeline does around
the network is described in the package's own terms:

- Weights: ``pytorch_state_dict`` (the architecture is `unetflow.model.unet.UNet`, its
  kwargs the checkpoint's ``model_config``: needs unetflow installed) and ``torchscript``
  (a trace of the same network: needs PyTorch alone).
- Preprocessing: the cast to float32 and unetflow's normalization as a *fixed* linear
  scaling per channel (then clipping, where configured), with the statistics of one dataset
  baked in: the model's first ``train_on`` dataset. unetflow itself normalizes each dataset
  with its own statistics; a package cannot, so its README says which statistics it holds.
- Postprocessing: softmax over the classes (segmentation, as prediction does); for
  regression with ``predict.output_units: input``, the inverse scaling back to the input's
  intensity units.
- Axes: batch, channel (the dataset's channel names), then y, x (z, y, x in 3D) of sizes
  ``min + n * 2**depth`` with ``min`` above twice the halo; the output's halo is the one
  prediction uses (``predict.halo``, by default the model's exact halo): inside it, a window
  gives what one whole-image pass gives.
- Test tensors: a crop of the first ``predict_on`` dataset (held out) and unetflow's own
  output for it (normalize_array, then predict_array over the crop as one tile), so that
  `bioimageio.core.test_model` checks the package against unetflow, not against itself.

bioimageio.spec and bioimageio.core are an optional extra (``unetflow[bioimageio]``):
they are imported only here, inside the functions that need them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import unetflow
from unetflow import notices
from unetflow.files import atomic_path, file_sha256
from unetflow.model.checkpoint import build_model, load_checkpoint
from unetflow.model.unet import UNet
from unetflow.normalize import channel_scaling, clip_range, denormalize_array, normalize_array
from unetflow.ome import channel_first_axes, open_image

__all__ = [
    "ARCHITECTURE",
    "CONFIG_FORMAT",
    "TracedUNet",
    "baked_statistics",
    "crop_slices",
    "export_package",
    "input_size",
    "preprocessing",
    "unetflow_prediction",
]

ARCHITECTURE = {"import_from": "unetflow.model.unet", "callable": "UNet"}
CONFIG_FORMAT = "unetflow-bioimageio-1"  # what config.unetflow of a package holds
CROP_TARGET = 128  # px per axis of the test crop, when the image and the input sizes allow
INPUT_ID, OUTPUT_ID = "input", "output"
# the dtypes a bioimage.io tensor may declare; other images are given as float32
TENSOR_DTYPES = ("float32", "float64", "uint8", "int8", "uint16", "int16", "uint32", "int32",
                 "uint64", "int64")
# the architecture's paper: cited when export.cite is empty
UNET_CITATION = {"text": "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for "
                         "Biomedical Image Segmentation. MICCAI 2015.",
                 "doi": "10.1007/978-3-319-24574-4_28"}
PLACEHOLDER_AUTHOR = {"name": "unknown (set export.authors)"}


# --- statistics -----------------------------------------------------------------------------
def baked_statistics(checkpoint: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The statistics of `dataset` the checkpoint was trained with: what the package's
    preprocessing bakes in. Per-position statistics cannot be baked in: refused."""
    known = checkpoint["normalization"]["datasets"]
    if dataset not in known:
        raise ValueError(f"--stats-dataset {dataset}: the checkpoint holds the statistics of "
                         f"{sorted(known)}, not of {dataset!r}; give the model's first "
                         f"train_on dataset")
    stats = known[dataset]
    if stats.get("per_position"):
        raise ValueError(f"datasets.{dataset}.normalize: 'position' gives every position its "
                         f"own statistics, but a bioimage.io package bakes in one set; "
                         f"normalize '{dataset}' as a whole (normalize: dataset) to export")
    return stats


# --- axes and the test crop ----------------------------------------------------------------
def input_size(model: UNet, halo: int) -> tuple[int, int]:
    """(min, step) of the package's space axes: multiples of 2**depth (where the network is
    exact, and what the traced network needs), above twice the halo (the spec: a tile must
    keep a core), and at least two multiples (norms need more than one bottleneck value)."""
    step = model.size_multiple
    return step * max(2, 2 * halo // step + 1), step


def crop_slices(shape: tuple[int, ...], size: tuple[int, int], where: str,
                target: int = CROP_TARGET) -> tuple[slice, ...]:
    """A centred crop of `shape` (the model's axes) whose sizes the package accepts: about
    `target` px per axis (at least min, on the step grid), its origin on the 2**depth grid.
    `where` names the image in the error raised when an axis is too short."""
    low, step = size
    slices = []
    for axis, extent in enumerate(shape):
        if extent < low:
            raise ValueError(f"{where}: axis {axis - len(shape)} has {extent} px, but the "
                             f"package's smallest input is {low} px (2**depth above twice "
                             f"the halo); export with a larger predict_on image")
        length = low + (min(max(target, low), extent) - low) // step * step
        start = (extent - length) // 2 // step * step
        slices.append(slice(start, start + length))
    return tuple(slices)


def _crop(image_path: str, channels: list | None, dims: int,
          size: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """The test crop (C, *model axes) of an image, at the middle of the axes the model does
    not see (t; z for a 2D model), and where it lies."""
    data, axes = channel_first_axes(open_image(image_path), channels)
    model_axes = axes[-dims:]
    if any(a not in ("z", "y", "x") for a in model_axes):
        raise ValueError(f"{image_path}: axes {axes[1:]} lack the {dims} spatial axes the "
                         f"model sees last")
    extra = [slice(n // 2, n // 2 + 1) for n in data.shape[1:-dims]]
    spatial = crop_slices(tuple(data.shape[-dims:]), size, image_path)
    crop = np.asarray(data[(slice(None), *extra, *spatial)])
    crop = crop.reshape(crop.shape[0], *crop.shape[-dims:])
    where = {"image": image_path, "axes": model_axes,
             "origin": [s.start for s in spatial], "shape": list(crop.shape[1:]),
             "other_axes": {a: s.start for a, s in zip(axes[1:-dims], extra, strict=True)}}
    return crop, where


# --- unetflow's output for the crop --------------------------------------------------------
def denormalizes(task: str, output_units: str, out_channels: int, stats: dict[str, Any]) -> bool:
    """Whether prediction maps this model's output back to input units (write_regression)."""
    if task != "regression" or output_units != "input":
        return False
    if out_channels != len(stats["channels"]):
        raise ValueError(f"predict.output_units is 'input' but the model has {out_channels} "
                         f"output channels and the statistics {len(stats['channels'])}; use "
                         f"output_units: normalized")
    return True


def unetflow_prediction(model: UNet, crop: np.ndarray, stats: dict[str, Any],
                        normalization: dict[str, Any], task: str,
                        to_input_units: bool) -> np.ndarray:
    """unetflow's output (K, *spatial) for a raw crop (C, *spatial): normalized with
    `stats`, through predict_array with the crop as one tile, softmax for segmentation,
    mapped back to input units when prediction does so.

    The tile has no halo: the output is the network's over exactly this crop (zero padding
    inside the network at the crop's edges), which is what a consumer of the package runs.
    """
    from unetflow.predict import predict_array

    x = normalize_array(crop, stats, normalization["method"], normalization["clip"])
    settings = {"tile_shape": list(crop.shape[1:]), "halo": 0, "blending": "crop",
                "amp": False, "batch_size": 1}
    with warnings.catch_warnings():  # "halo 0 is below the exact halo": meant here
        warnings.simplefilter("ignore")
        y = np.asarray(predict_array(model, x, settings, softmax=task == "segmentation"))
    if to_input_units:
        y = denormalize_array(y, stats, normalization["method"])
    return y.astype(np.float32)


# --- weights ---------------------------------------------------------------------------------
class TracedUNet(nn.Module):
    """UNet.forward for inputs whose sizes are multiples of 2**depth, which the package's
    axes guarantee: without forward's padding and cropping, whose sizes a trace would freeze
    to those of the example, so that the trace holds for every such size."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet
        self.residual = bool(unet.config()["residual"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unet._forward_aligned(x)
        return y + x if self.residual else y


def torchscript_weights(model: UNet, example: np.ndarray, path: Path) -> None:
    """Trace the network on `example` (N, C, *spatial), check the trace against the network
    on it and on a larger input, and save it."""
    traced_from = TracedUNet(model).eval()
    x = torch.from_numpy(example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch 2.13
        traced = torch.jit.trace(traced_from, x)
        step = model.size_multiple
        for probe in (x, torch.nn.functional.pad(x, [0, step] * model.spatial_dims)):
            if not torch.allclose(traced(probe), model(probe), rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"the traced network differs from the network on input of "
                                   f"shape {tuple(probe.shape)}")
    traced.save(str(path))


# --- documentation and cover -----------------------------------------------------------------
def _display(values: np.ndarray) -> np.ndarray:
    """A 2D image scaled to [0, 1] between its 1st and 99th percentiles."""
    low, high = np.percentile(values, [1, 99])
    return np.clip((values - low) / max(high - low, 1e-12), 0, 1)


def write_cover(test_input: np.ndarray, test_output: np.ndarray, task: str, path: Path) -> None:
    """input | output side by side (2:1, as bioimage.io likes covers): the first channel of
    the input, and P(foreground) = 1 - P(background) or the first output channel; the middle
    plane of a 3D crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = test_input[0, 0].astype(np.float32), test_output[0]
    y = 1.0 - y[0] if task == "segmentation" else y[0]
    if x.ndim == 3:
        x, y = x[x.shape[0] // 2], y[y.shape[0] // 2]
    plt.imsave(path, np.concatenate([_display(x), _display(y)], axis=1), cmap="gray",
               vmin=0, vmax=1)


def _last_validation(history: list[dict[str, Any]]) -> str:
    rows = [r for r in history if r.get("val_loss") not in ("", None)]
    if not rows:
        return "no validation was recorded"
    r = rows[-1]
    return (f"step {r['step']}: validation loss {float(r['val_loss']):.4g}, validation "
            f"metric {float(r['val_metric']):.4g}")


def _normalization_lines(stats: dict[str, Any], normalization: dict[str, Any],
                         dataset: str) -> list[str]:
    offset, scale = channel_scaling(stats, normalization["method"])
    names = [c.get("name", str(i)) for i, c in enumerate(stats["channels"])]
    lines = [f"- cast to float32, then `(x - offset) / scale` per channel "
             f"(`normalize.method: {normalization['method']}`), with the statistics of "
             f"dataset `{dataset}` baked in:"]
    lines += [f"  - `{n}`: offset {o:.6g}, scale {s:.6g}" for n, o, s in zip(names, offset, scale,
                                                                            strict=True)]
    if normalization["clip"]:
        low, high = clip_range(normalization["method"])
        lines.append(f"- then clipped to [{low:g}, {high:g}] (`normalize.clip: true`)")
    lines.append(f"- unetflow normalizes each dataset with its own statistics; this package "
                 f"always uses those of `{dataset}`: images of another intensity range should "
                 f"be brought to that of `{dataset}` first")
    return lines


def package_readme(name: str, info: dict[str, Any], summary: str, curve: str | None) -> str:
    """The package's README: what the model does, how it was trained, what it scored."""
    train = info["train_settings"]
    lines = [f"# {name}", "", info["description"], "",
             "## How it was trained", "",
             f"- task: {info['task']}; network: unetflow U-Net "
             f"`{json.dumps(info['model_config'], sort_keys=True)}`",
             f"- trained on: {', '.join(f'`{d}`' for d in info['train_on'])}; the "
             f"checkpoint of step {info['step']} of {info['total_steps']}, loss "
             f"`{train.get('loss') or 'default for the task'}`, optimizer "
             f"`{train.get('optimizer')}`, learning rate {train.get('learning_rate')}",
             f"- final validation: {info['final_validation']}"]
    if curve:
        lines += ["", f"![training and validation loss]({curve})"]
    lines += ["", "## Preprocessing", "", *info["normalization_lines"], "",
              "## Output", "", info["output_text"], "",
              f"Inputs along each space axis are {info['size'][0]} + n x {info['size'][1]} px; "
              f"the outermost {info['halo']} px of the output on each side depend on the "
              f"window's edge (tile with that overlap: inside it a tiled output equals one "
              f"whole-image pass).", "",
              "## Validation", "",
              "unetflow's evaluation of this model on held-out data (`evaluate`):", "",
              "```", summary or "(no dataset with a target was predicted)", "```", "",
              f"Test tensors: a crop of `{info['crop']['image']}` at "
              f"{info['crop']['origin']} (axes {info['crop']['axes']}), and unetflow's "
              f"prediction of that crop.", "",
              "## Running it", "",
              "`torchscript` needs PyTorch alone. `pytorch_state_dict` builds the network with "
              "`unetflow.model.unet.UNet` (the kwargs in the description): install unetflow.",
              ""]
    return "\n".join(lines)


def _output_text(task: str, class_names: list[str], to_input_units: bool) -> str:
    if task == "segmentation":
        return (f"Class probabilities (softmax over the channel axis, added as "
                f"postprocessing): {', '.join(class_names)}.")
    if to_input_units:
        return "The restored image in the input's intensity units (a fixed linear scaling)."
    return "The restored image, normalized as the input (`predict.output_units: normalized`)."


def summary_text(metric_files: list[str]) -> str:
    """The summary's lines for this model (unetflow.evaluate.format_table)."""
    from unetflow.evaluate import format_table, summary_rows

    return format_table(summary_rows(metric_files)) if metric_files else ""


# --- the description ---------------------------------------------------------------------------
def _scale_linear(gain: np.ndarray, offset: np.ndarray) -> list[Any]:
    """A fixed per-channel scale_linear, or nothing where it is the identity (the spec
    refuses a redundant one: normalize.method none)."""
    from bioimageio.spec.model.v0_5 import AxisId, ScaleLinearAlongAxisKwargs, ScaleLinearDescr

    gain, offset = [float(g) for g in gain], [float(o) for o in offset]
    if all(g == 1.0 for g in gain) and all(o == 0.0 for o in offset):
        return []
    return [ScaleLinearDescr(kwargs=ScaleLinearAlongAxisKwargs(
        axis=AxisId("channel"), gain=gain, offset=offset))]


def preprocessing(stats: dict[str, Any], normalization: dict[str, Any]) -> list[Any]:
    """float32, then normalize_array as x * (1 / scale) + (-offset / scale), then its clip."""
    from bioimageio.spec.model.v0_5 import (
        ClipDescr,
        ClipKwargs,
        EnsureDtypeDescr,
        EnsureDtypeKwargs,
    )

    offset, scale = (v.astype(np.float64) for v in channel_scaling(stats, normalization["method"]))
    steps = [EnsureDtypeDescr(kwargs=EnsureDtypeKwargs(dtype="float32")),
             *_scale_linear(1.0 / scale, -offset / scale)]
    if normalization["clip"]:
        low, high = clip_range(normalization["method"])
        steps.append(ClipDescr(kwargs=ClipKwargs(min=low, max=high)))
    return steps


def postprocessing(task: str, stats: dict[str, Any], method: str,
                   to_input_units: bool) -> list[Any]:
    """Softmax over the classes (segmentation); y * scale + offset back to input units
    (regression where prediction does it); else nothing."""
    from bioimageio.spec.model.v0_5 import AxisId, SoftmaxDescr, SoftmaxKwargs

    if task == "segmentation":
        return [SoftmaxDescr(kwargs=SoftmaxKwargs(axis=AxisId("channel")))]
    if to_input_units:
        offset, scale = channel_scaling(stats, method)
        return _scale_linear(scale.astype(np.float64), offset.astype(np.float64))
    return []


def _axes(channel_names: list[str], space: list[str], size: tuple[int, int] | None,
          halo: int) -> list[Any]:
    """batch, channel, space axes: parameterized on the input (`size`), the input's sizes
    with `halo` on the output (size None)."""
    from bioimageio.spec.model.v0_5 import (
        AxisId,
        BatchAxis,
        ChannelAxis,
        ParameterizedSize,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxis,
        SpaceOutputAxisWithHalo,
        TensorId,
    )

    axes: list[Any] = [BatchAxis(), ChannelAxis(channel_names=channel_names)]
    for name in space:
        if size is not None:
            axes.append(SpaceInputAxis(id=AxisId(name),
                                       size=ParameterizedSize(min=size[0], step=size[1])))
            continue
        same = SizeReference(tensor_id=TensorId(INPUT_ID), axis_id=AxisId(name))
        axes.append(SpaceOutputAxisWithHalo(id=AxisId(name), size=same, halo=halo) if halo
                    else SpaceOutputAxis(id=AxisId(name), size=same))
    return axes


def _people(settings: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Authors and citations of export:, placeholders with a warning where empty."""
    from bioimageio.spec.model.v0_5 import Author, CiteEntry

    authors, cite = settings["authors"], settings["cite"]
    if not authors:
        notices.warn("export.authors is empty: the package names its author as "
                     f"{PLACEHOLDER_AUTHOR['name']!r}; set export.authors "
                     "([{name, affiliation}]) before sharing it")
        authors = [PLACEHOLDER_AUTHOR]
    if not cite:
        notices.warn("export.cite is empty: the package cites only the U-Net paper; set "
                     "export.cite ([{text, doi or url}]) to cite your work")
        cite = [UNET_CITATION]
    return [Author(**a) for a in authors], [CiteEntry(**c) for c in cite]


def _class_names(task: str, out_channels: int, model_settings: dict[str, Any],
                 input_names: list[str]) -> list[str]:
    if task == "regression":
        return input_names if out_channels == len(input_names) else [
            f"output_{i}" for i in range(out_channels)]
    if model_settings.get("target") == "boundaries":
        return ["background", "interior", "boundary"]
    return ["background", *(f"class_{i}" for i in range(1, out_channels))]


def model_description(name: str, files: dict[str, Path], tensors: dict[str, Any],
                      info: dict[str, Any], settings: dict[str, Any]) -> Any:
    """The bioimageio.spec ModelDescr (spec 0.5) of the package's files in `files`."""
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromLibraryDescr,
        Config,
        FileDescr,
        InputTensorDescr,
        IntervalOrRatioDataDescr,
        LicenseId,
        ModelDescr,
        OutputTensorDescr,
        PytorchStateDictWeightsDescr,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    torch_version = Version(torch.__version__.split("+")[0])
    architecture = ArchitectureFromLibraryDescr(**ARCHITECTURE, kwargs=info["model_config"])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=files["state_dict"], architecture=architecture, pytorch_version=torch_version),
        torchscript=TorchscriptWeightsDescr(source=files["torchscript"],
                                            pytorch_version=torch_version,
                                            parent="pytorch_state_dict"))
    authors, cite = _people(settings)
    inputs = InputTensorDescr(
        id=TensorId(INPUT_ID), axes=_axes(info["channel_names"], info["space"], info["size"], 0),
        test_tensor=FileDescr(source=files["test_input"]),
        data=IntervalOrRatioDataDescr(type=tensors["input_dtype"]),
        preprocessing=tensors["preprocessing"])
    outputs = OutputTensorDescr(
        id=TensorId(OUTPUT_ID), description=info["output_text"],
        axes=_axes(info["class_names"], info["space"], None, info["halo"]),
        test_tensor=FileDescr(source=files["test_output"]),
        postprocessing=tensors["postprocessing"])
    return ModelDescr(
        name=f"{name} (unetflow)", description=info["description"], authors=authors, cite=cite,
        license=LicenseId(settings["license"]), documentation=FileDescr(source=files["readme"]),
        covers=[FileDescr(source=files["cover"])],
        attachments=[FileDescr(source=files[k]) for k in ("curve",) if k in files],
        tags=["unetflow", "unet", info["task"], f"{len(info['space'])}d"],
        inputs=[inputs], outputs=[outputs], weights=weights,
        version=Version(unetflow.__version__),
        config=Config(unetflow=info["config"]))


# --- the package ---------------------------------------------------------------------------
def _test_input(crop: np.ndarray) -> np.ndarray:
    """(1, C, *spatial) in the image's dtype where bioimage.io has it, else float32."""
    dtype = crop.dtype if crop.dtype.name in TENSOR_DTYPES else np.dtype(np.float32)
    return crop[None].astype(dtype)


def _package_info(checkpoint: dict[str, Any], model: UNet, stats: dict[str, Any],
                  stats_dataset: str, train_on: list[str], settings: dict[str, Any],
                  predict_settings: dict[str, Any]) -> dict[str, Any]:
    """What the description, the README and the package's config.unetflow say, in one dict."""
    from unetflow.model.unet import exact_halo

    config = model.config()
    task, dims = checkpoint["task"], model.spatial_dims
    normalization = {k: checkpoint["normalization"][k] for k in ("method", "clip")}
    halo = exact_halo(model) if predict_settings["halo"] is None else int(predict_settings["halo"])
    to_units = denormalizes(task, predict_settings["output_units"], config["out_channels"], stats)
    names = [str(c.get("name", i)) for i, c in enumerate(stats["channels"])]
    classes = _class_names(task, config["out_channels"], checkpoint.get("model_settings") or {},
                           names)
    description = settings["description"] or (
        f"unetflow U-Net ({dims}D {task}) trained on {', '.join(train_on)}.")
    return {"task": task, "model_config": config, "normalization": normalization,
            "halo": halo, "size": input_size(model, halo), "to_input_units": to_units,
            "space": ["z", "y", "x"][-dims:], "channel_names": names, "class_names": classes,
            "description": description, "train_on": train_on, "step": checkpoint.get("step"),
            "total_steps": checkpoint.get("total_steps"),
            "train_settings": checkpoint.get("train_settings") or {},
            "final_validation": _last_validation(checkpoint.get("history") or []),
            "normalization_lines": _normalization_lines(stats, normalization, stats_dataset),
            "output_text": _output_text(task, classes, to_units)}


def _package_config(info: dict[str, Any], checkpoint: dict[str, Any], stats: dict[str, Any],
                    stats_dataset: str, checkpoint_path: str, crop: dict[str, Any]
                    ) -> dict[str, Any]:
    """config.unetflow of the package: what unetflow needs to predict with it as it predicts
    with a checkpoint (task, network, normalization, halo), and where it came from."""
    return {"format": CONFIG_FORMAT, "task": info["task"], "model_config": info["model_config"],
            "model_settings": checkpoint.get("model_settings") or {},
            "normalization": {**info["normalization"], "dataset": stats_dataset,
                              "statistics": stats},
            "halo": info["halo"], "input_size": {"min": info["size"][0], "step": info["size"][1]},
            "output_units": "input" if info["to_input_units"] else "normalized",
            "step": info["step"], "train_on": info["train_on"], "test_crop": crop,
            "checkpoint_sha256": file_sha256(checkpoint_path),
            "unetflow_version": unetflow.__version__}


def _write_files(folder: Path, checkpoint: dict[str, Any], model: UNet, test_input: np.ndarray,
                 test_output: np.ndarray, normalized: np.ndarray, curve: str | None
                 ) -> dict[str, Path]:
    """Weights, test tensors, cover and the loss curve under `folder`, by role."""
    files = {"state_dict": folder / "weights.pt", "torchscript": folder / "weights.torchscript",
             "test_input": folder / "test_input.npy", "test_output": folder / "test_output.npy",
             "cover": folder / "cover.png", "readme": folder / "README.md"}
    torch.save(dict(checkpoint["model_state"]), files["state_dict"])
    torchscript_weights(model, normalized, files["torchscript"])
    np.save(files["test_input"], test_input)
    np.save(files["test_output"], test_output)
    write_cover(test_input, test_output, checkpoint["task"], files["cover"])
    if curve:
        files["curve"] = folder / "loss_curve.png"
        shutil.copyfile(curve, files["curve"])
    return files


def _described(name: str, files: dict[str, Path], tensors: dict[str, Any],
               info: dict[str, Any], settings: dict[str, Any]) -> Any:
    """model_description, with the spec's complaint in one line (pydantic gives pages)."""
    from pydantic import ValidationError

    try:
        return model_description(name, files, tensors, info, settings)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"model '{name}': the bioimage.io description is invalid at {where}: "
                         f"{first['msg']} (see the export section of the config)") from None


def export_package(checkpoint_path: str, image_path: str, channels: list | None,
                   stats_dataset: str, train_on: list[str], settings: dict[str, Any],
                   predict_settings: dict[str, Any], metric_files: list[str],
                   curve: str | None, name: str, output: str) -> dict[str, Any]:
    """Write the bioimage.io package (zip) of a checkpoint, atomically; returns what it holds.

    `image_path` gives the test crop (the first predict_on dataset's image), `stats_dataset`
    the statistics baked in (the first train_on dataset), `settings` the validated export
    section and `predict_settings` the model's predict section (halo, output_units).
    """
    from bioimageio.spec import save_bioimageio_package

    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint, torch.device("cpu"))
    stats = baked_statistics(checkpoint, stats_dataset)
    info = _package_info(checkpoint, model, stats, stats_dataset, train_on, settings,
                         predict_settings)
    crop, where = _crop(image_path, channels, model.spatial_dims, info["size"])
    test_output = unetflow_prediction(model, crop, stats, info["normalization"], info["task"],
                                      info["to_input_units"])[None]
    normalized = normalize_array(crop, stats, *info["normalization"].values())[None]
    info["config"] = _package_config(info, checkpoint, stats, stats_dataset, checkpoint_path,
                                     where)
    info["crop"] = where
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        test_input = _test_input(crop)
        files = _write_files(folder, checkpoint, model, test_input, test_output,
                             normalized.astype(np.float32), curve)
        files["readme"].write_text(package_readme(
            name, info, summary_text(metric_files), files["curve"].name if curve else None))
        tensors = {"input_dtype": test_input.dtype.name,
                   "preprocessing": preprocessing(stats, info["normalization"]),
                   "postprocessing": postprocessing(info["task"], stats,
                                                    info["normalization"]["method"],
                                                    info["to_input_units"])}
        description = _described(name, files, tensors, info, settings)
        with atomic_path(output) as target:
            saved = save_bioimageio_package(description, output_path=folder / "package.zip")
            shutil.move(str(saved), target)
    return {"output": output, "halo": info["halo"], "input_size": list(info["size"]),
            "test_crop": where, "task": info["task"]}
