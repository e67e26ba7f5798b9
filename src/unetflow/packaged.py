"""Models from bioimage.io packages (model spec 0.5), predicted through unetflow's tiled path.

A config model with `package: <zip or folder>` has no train rule: its prediction reads the
package. `describe_package` reads and checks the package's description (bioimageio.spec,
offline: a path that does not exist is refused before the library could take it for a
zoo id and go to the network) and turns it into plain data: the input and output axes,
the size step and halo that tiling needs, the pre- and postprocessing. From that:

- **Tiling** (`package_geometry`): tiles lie on the package's size step and the halo is
  its declared output halo (rounded up to the step), so `crop` keeps only pixels the
  package calls valid. Windows are padded at their end to the next valid size
  (min + n * step) and the output cropped back: the padding is more than the halo away
  from every kept pixel. Without a declared halo, tiles are blended with Gaussian
  weights (`package_settings`, with a warning): the output is then not one whole-image
  pass.
- **Preprocessing** (`preprocess`) runs pixel by pixel on the whole lazy image before it is
  tiled, as unetflow's own normalization does: fixed steps (scale_linear,
  fixed_zero_mean_unit_variance, clip with values, binarize, ensure_dtype, sigmoid) as
  they are; the data-dependent zero_mean_unit_variance and scale_range take the whole
  image as the sample, with the dataset's statistics (results/normalization/<dataset>.json),
  so a tile sees what one whole-image pass would.
- **Postprocessing** (`PackagedNetwork`) runs per tile; only pixel-wise steps are taken
  (sigmoid, softmax over channels, scale_linear, clip, binarize, ...).

Loading runs no pickled code: state dicts with `torch.load(weights_only=True)` into an
architecture importable from an installed library (an `nn.Module` subclass, never a
Python file shipped in the package); otherwise TorchScript, which the config names the
package for. ONNX, TensorFlow and Keras weights are refused in one line.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PACKAGE_FORMAT",
    "PackageError",
    "PackagedNetwork",
    "describe_package",
    "is_package",
    "job_description",
    "load_network",
    "package_geometry",
    "package_settings",
    "preprocess",
]

PACKAGE_FORMAT = "bioimageio-model-0.5"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
RUNNABLE_WEIGHTS = ("pytorch_state_dict", "torchscript")
PIXELWISE = ("scale_linear", "fixed_zero_mean_unit_variance", "clip", "binarize",
             "ensure_dtype", "sigmoid")
FROM_STATISTICS = ("zero_mean_unit_variance", "scale_range")


class PackageError(ValueError):
    """A package that unetflow cannot run; the message says which file and why."""


def _rdf_name(names: list[str]) -> str | None:
    return next((n for n in names if n in RDF_NAMES or n.endswith(".bioimageio.yaml")), None)


def is_package(path: str | Path) -> bool:
    """A folder or zip holding a bioimage.io description (rdf.yaml / bioimageio.yaml) at its
    top: a torch checkpoint is a zip too, but never holds one."""
    path = Path(path)
    if path.is_dir():
        return _rdf_name([p.name for p in path.iterdir()]) is not None
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _rdf_name([n for n in archive.namelist() if "/" not in n]) is not None


def _first_error(summary: Any) -> str:
    """The first validation error of a bioimageio summary, in one line."""
    for detail in summary.details:
        for error in detail.errors:
            where = ".".join(map(str, error.loc))
            return f"{where}: {error.msg}".replace("\n", " ")[:240]
    return summary.status


def _load(path: Path) -> Any:
    """The package's description (bioimageio.spec), checked; PackageError otherwise."""
    if not path.exists():  # else bioimageio.spec looks the path up as a zoo id, online
        raise PackageError(f"{path}: no such file or folder")
    if not path.is_dir() and not zipfile.is_zipfile(path):
        raise PackageError(f"{path}: not a bioimage.io package (neither a zip nor a folder)")
    if not is_package(path):
        raise PackageError(f"{path}: not a bioimage.io package (no rdf.yaml or "
                           f"bioimageio.yaml at its top)")
    from bioimageio.spec import InvalidDescr, load_description

    source = path / _rdf_name([p.name for p in path.iterdir()]) if path.is_dir() else path
    try:
        descr = load_description(source, perform_io_checks=True)
    except Exception as err:  # the library raises several types for unreadable packages
        raise PackageError(f"{path}: not a readable bioimage.io package "
                           f"({str(err).splitlines()[0][:200]})") from None
    if isinstance(descr, InvalidDescr):
        version = getattr(descr, "format_version", None)
        if version and not str(version).startswith("0.5"):
            raise _version_error(path, version)
        raise PackageError(f"{path}: not a valid bioimage.io package "
                           f"({_first_error(descr.validation_summary)})")
    if descr.type != "model":
        raise PackageError(f"{path}: a bioimage.io {descr.type} package, not a model")
    if not str(descr.format_version).startswith("0.5"):
        raise _version_error(path, descr.format_version)
    return descr


def _version_error(path: Path, version: Any) -> PackageError:
    return PackageError(f"{path}: model spec {version}; unetflow reads model spec 0.5 "
                        f"(convert it with `bioimageio update-format`)")


def _axes(tensor: Any) -> list[dict[str, Any]]:
    """A tensor's axes as plain data: id, type, and size/halo where they matter."""
    axes = []
    for axis in tensor.axes:
        entry = {"id": str(axis.id), "type": axis.type}
        if axis.type == "channel":
            entry["channels"] = [str(n) for n in axis.channel_names]
        if axis.type == "space":
            entry["scale"] = float(axis.scale)
            size = axis.size
            entry["size"] = size.model_dump(mode="json") if hasattr(size, "model_dump") \
                else size
            entry["halo"] = int(getattr(axis, "halo", 0) or 0)
        axes.append(entry)
    return axes


def _check_axes(path: Path, role: str, axes: list[dict[str, Any]]) -> list[str]:
    """The space axes' ids; refuses axes unetflow cannot tile (time, index, 1 or 4+ dims)."""
    other = [a["id"] for a in axes if a["type"] not in ("batch", "channel", "space")]
    if other:
        raise PackageError(f"{path}: {role} axes {[a['id'] for a in axes]} include "
                           f"{other} (time or index axes); unetflow tiles batch, channel "
                           f"and 2 or 3 space axes")
    space = [a["id"] for a in axes if a["type"] == "space"]
    if len(space) not in (2, 3) or set(space) - {"z", "y", "x"}:
        raise PackageError(f"{path}: {role} space axes {space}; unetflow tiles y, x or "
                           f"z, y, x")
    return space


def _input_sizes(path: Path, axes: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(min, step) per space axis: only parameterized sizes can be tiled."""
    mins, steps = [], []
    for a in axes:
        if a["type"] != "space":
            continue
        size = a["size"]
        if not (isinstance(size, dict) and "step" in size):
            raise PackageError(f"{path}: input axis {a['id']} has size {size}; unetflow "
                               f"tiles inputs of parameterized size (min + n * step)")
        mins.append(int(size["min"]))
        steps.append(int(size["step"]))
    return mins, steps


def _check_output(path: Path, inp: dict[str, Any], out: dict[str, Any]) -> None:
    """Every output space axis is its input axis, same size and scale (a dense output)."""
    by_id = {a["id"]: a for a in inp["axes"]}
    for a in (a for a in out["axes"] if a["type"] == "space"):
        size, source = a["size"], by_id.get(a["id"])
        same = (isinstance(size, dict) and size.get("axis_id") == a["id"]
                and size.get("tensor_id") == inp["id"] and not size.get("offset")
                and source is not None and math.isclose(source["scale"], a["scale"]))
        if not same:
            raise PackageError(f"{path}: output axis {a['id']} has size {size} (scale "
                               f"{a['scale']}); unetflow writes outputs of the input's size "
                               f"along every space axis")


def _steps(path: Path, tensor: Any, role: str) -> list[dict[str, Any]]:
    """The pre- or postprocessing steps as plain data; refuses those unetflow cannot run."""
    steps = []
    allowed = PIXELWISE + (FROM_STATISTICS if role == "preprocessing" else ("softmax",))
    for step in getattr(tensor, role):
        kwargs = step.kwargs.model_dump(mode="json") if hasattr(step, "kwargs") else {}
        if step.id not in allowed or (step.id == "clip" and (
                kwargs.get("min_percentile") is not None
                or kwargs.get("max_percentile") is not None)):
            raise PackageError(f"{path}: {role} step {step.id} {kwargs or ''} is not one "
                               f"unetflow can apply tile by tile; it runs "
                               f"{', '.join(allowed)} (clip with values)")
        steps.append({"id": step.id, "kwargs": kwargs})
    return steps


def _choose_weights(path: Path, weights: Any) -> str:
    """pytorch_state_dict with an installed architecture, else torchscript."""
    held = [name for name, entry in weights if entry is not None]
    state = weights.pytorch_state_dict
    if state is not None and hasattr(state.architecture, "import_from"):
        return "pytorch_state_dict"
    if weights.torchscript is not None:
        return "torchscript"
    if state is not None:
        raise PackageError(f"{path}: its architecture is the Python file "
                           f"{state.architecture.source} of the package, which would run "
                           f"the package's code; unetflow runs architectures importable "
                           f"from installed libraries (import_from) or torchscript weights")
    raise PackageError(f"{path}: weights in {', '.join(held)}; unetflow runs "
                       f"{' or '.join(RUNNABLE_WEIGHTS)}")


def describe_package(path: str | Path) -> dict[str, Any]:
    """What unetflow needs of a package, as plain (JSON) data; PackageError otherwise."""
    path = Path(path)
    descr = _load(path)
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise PackageError(f"{path}: {len(descr.inputs)} input(s) and {len(descr.outputs)} "
                           f"output(s); unetflow runs models of one input and one output")
    inp = {"id": str(descr.inputs[0].id), "axes": _axes(descr.inputs[0])}
    out = {"id": str(descr.outputs[0].id), "axes": _axes(descr.outputs[0])}
    space = _check_axes(path, "input", inp["axes"])
    if _check_axes(path, "output", out["axes"]) != space:
        raise PackageError(f"{path}: output space axes differ from the input's {space}")
    _check_output(path, inp, out)
    mins, steps = _input_sizes(path, inp["axes"])
    return {"format": PACKAGE_FORMAT, "path": str(path), "name": descr.name,
            "weights": _choose_weights(path, descr.weights),
            "input": inp, "output": out, "space_axes": space,
            "in_channels": _channel_count(inp["axes"]),
            "out_channels": _channel_count(out["axes"]),
            "size_min": mins, "size_step": steps,
            "halo": [a["halo"] for a in out["axes"] if a["type"] == "space"],
            "preprocessing": _steps(path, descr.inputs[0], "preprocessing"),
            "postprocessing": _steps(path, descr.outputs[0], "postprocessing")}


def _channel_count(axes: list[dict[str, Any]]) -> int:
    return next((len(a["channels"]) for a in axes if a["type"] == "channel"), 1)


def job_description(package: dict[str, Any], task: str) -> dict[str, Any]:
    """A checkpoint-like description of the package for a prediction job: the task the
    config gives the model, its channels, and that the package normalizes its inputs.

    A segmentation package with one output channel (a sigmoid) gives two: background and
    foreground (`PackagedNetwork`), as unetflow's segmentation networks do.
    """
    out = package["out_channels"]
    if task == "segmentation" and out == 1:
        out = 2
    return {"format": PACKAGE_FORMAT, "task": task, "package": package, "step": None,
            "model_config": {"spatial_dims": len(package["space_axes"]),
                             "in_channels": package["in_channels"], "out_channels": out,
                             "package": package["name"]},
            "normalization": {"method": "package", "clip": False}}


# --- tiling ---------------------------------------------------------------------------------
def package_geometry(description: dict[str, Any]) -> Any:
    """The tiling geometry (tiling.NetworkGeometry) of a package's job description: the
    size step (one multiple for all axes), the declared halo rounded up to it."""
    from unetflow.tiling import NetworkGeometry

    package = description["package"]
    multiple = math.lcm(*package["size_step"])
    halo = max(package["halo"])
    return NetworkGeometry(spatial_dims=len(package["space_axes"]), size_multiple=multiple,
                           exact_halo=math.ceil(halo / multiple) * multiple if halo else None,
                           out_channels=description["model_config"]["out_channels"])


def package_settings(description: dict[str, Any], settings: dict[str, Any],
                     key: str) -> dict[str, Any]:
    """The predict settings for a package: without a declared halo, Gaussian blending over
    a quarter of the tile (rounded up to the size step) unless predict.halo says, warned.

    `key` names the package in the config (models.<name>.package) for the warning.
    """
    geometry = package_geometry(description)
    if geometry.exact_halo is not None:
        return settings
    from unetflow import notices

    m = geometry.size_multiple
    halo = settings["halo"]
    if halo is None:
        halo = max(m, math.ceil(min(settings["tile_shape"]) / 4 / m) * m)
    notices.warn(f"{key}: {description['package']['path']} declares no halo, so tiles are "
                 f"blended with Gaussian weights over a halo of {halo} px (predict.halo); "
                 f"the output is not exactly one whole-image pass")
    return {**settings, "blending": "gaussian", "halo": halo}


# --- preprocessing: the whole lazy image, before tiling ----------------------------------------
def _per_channel(values: Any, ndim: int) -> np.ndarray:
    """A scalar or per-channel list broadcast over (C, *spatial)."""
    return np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * (ndim - 1))


def _along_channel(kwargs: dict[str, Any], name: str, what: str) -> None:
    axis = kwargs.get("axis")
    if axis is not None and axis != "channel":
        raise PackageError(f"{what}: {name} along axis {axis!r}; unetflow applies it per "
                           f"channel or to the whole tensor")


def _channel_stat(stats: dict[str, Any], name: str, what: str) -> np.ndarray:
    """One statistic per channel from the dataset's statistics file."""
    values = []
    for ch in stats["channels"]:
        if name.startswith("p"):
            found = {float(p): v for p, v in (ch.get("percentiles") or {}).items()}
            percent = float(name[1:])
            if percent in (0.0, 100.0):
                values.append(ch["min"] if percent == 0 else ch["max"])
                continue
            if percent not in found:
                raise PackageError(f"{what}: needs the {percent:g} percentile, but the "
                                   f"dataset's statistics have {sorted(found)}; add it to "
                                   f"normalize.percentiles")
            values.append(found[percent])
        else:
            values.append(ch[name])
    return np.asarray(values, dtype=np.float32)


def _joint_axes(kwargs: dict[str, Any], channels: int, what: str) -> None:
    """Statistics per channel (channel not in axes), or joint over one channel."""
    axes = kwargs.get("axes")
    if (axes is None or "channel" in axes) and channels > 1:
        raise PackageError(f"{what}: statistics over all {channels} channels jointly; "
                           f"unetflow's dataset statistics are per channel")


def _apply_step(x: Any, step: dict[str, Any], stats: dict[str, Any] | None, what: str) -> Any:
    """One pre- or postprocessing step on (C, *spatial), numpy or dask, or (N, C, ...) torch."""
    kind, kw = step["id"], step["kwargs"]
    if kind == "scale_linear":
        _along_channel(kw, kind, what)
        return x * _per_channel(kw.get("gain", 1.0), x.ndim) \
            + _per_channel(kw.get("offset", 0.0), x.ndim)
    if kind == "fixed_zero_mean_unit_variance":
        _along_channel(kw, kind, what)
        return (x - _per_channel(kw["mean"], x.ndim)) \
            / (_per_channel(kw["std"], x.ndim) + np.float32(kw.get("eps", 1e-6)))
    if kind == "clip":
        return x.clip(kw.get("min"), kw.get("max"))
    if kind == "binarize":
        _along_channel(kw, kind, what)
        return (x > _per_channel(kw["threshold"], x.ndim)).astype(np.float32)
    if kind == "ensure_dtype":
        return x.astype(kw["dtype"])
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return _from_statistics(x, kind, kw, stats, what)


def _from_statistics(x: Any, kind: str, kw: dict[str, Any], stats: dict[str, Any] | None,
                     what: str) -> Any:
    """zero_mean_unit_variance / scale_range with the whole image as the sample."""
    if stats is None:
        raise PackageError(f"{what}: {kind} needs the dataset's statistics (--stats)")
    _joint_axes(kw, x.shape[0], what)
    eps = np.float32(kw.get("eps", 1e-6))
    if kind == "zero_mean_unit_variance":
        mean = _per_channel(_channel_stat(stats, "mean", what), x.ndim)
        std = _per_channel(_channel_stat(stats, "std", what), x.ndim)
        return (x - mean) / (std + eps)
    if kw.get("reference_tensor"):
        raise PackageError(f"{what}: scale_range of a reference tensor; unetflow scales the "
                           f"input by its own percentiles")
    low = _per_channel(_channel_stat(stats, f"p{kw.get('min_percentile', 0.0)}", what), x.ndim)
    high = _per_channel(_channel_stat(stats, f"p{kw.get('max_percentile', 100.0)}", what),
                        x.ndim)
    return (x - low) / (high - low + eps)


def preprocess(data: Any, package: dict[str, Any], stats: dict[str, Any] | None) -> Any:
    """The package's preprocessing of (C, *spatial) `data` (lazy), as float32."""
    x = data.astype(np.float32)
    for step in package["preprocessing"]:
        x = _apply_step(x, step, stats, f"{package['path']}: preprocessing")
    return x.astype(np.float32)


# --- the network ------------------------------------------------------------------------------
def _import_architecture(package: dict[str, Any], architecture: Any) -> Any:
    """The architecture's class, imported from an installed library; only nn.Module
    subclasses are called (a callable could be any function of any module)."""
    import torch

    try:
        factory = getattr(importlib.import_module(architecture.import_from),
                          str(architecture.callable))
    except (ImportError, AttributeError) as err:
        raise PackageError(f"{package['path']}: its architecture "
                           f"{architecture.import_from}.{architecture.callable} cannot be "
                           f"imported ({err}); install the library that defines it") from None
    if not (isinstance(factory, type) and issubclass(factory, torch.nn.Module)):
        raise PackageError(f"{package['path']}: its architecture "
                           f"{architecture.import_from}.{architecture.callable} is not a "
                           f"torch.nn.Module class; unetflow calls only those")
    return factory


def _read_weights(entry: Any) -> io.BytesIO:
    from bioimageio.spec.utils import get_reader

    return io.BytesIO(get_reader(entry.source).read())


def _build(package: dict[str, Any]) -> Any:
    """The package's network on the CPU, in eval mode, loaded without running pickles."""
    import torch

    descr = _load(Path(package["path"]))
    if package["weights"] == "torchscript":
        return torch.jit.load(_read_weights(descr.weights.torchscript), map_location="cpu").eval()
    entry = descr.weights.pytorch_state_dict
    network = _import_architecture(package, entry.architecture)(**entry.architecture.kwargs)
    try:
        state = torch.load(_read_weights(entry), map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=entry.strict)
    except Exception as err:  # torch raises several types for weights that do not fit
        raise PackageError(f"{package['path']}: its pytorch_state_dict weights do not load "
                           f"into {entry.architecture.callable} "
                           f"({str(err).splitlines()[0][:200]})") from None
    return network.eval()


def load_network(description: dict[str, Any], device: Any) -> Any:
    """The package's network as `PackagedNetwork` on `device`."""
    return PackagedNetwork(_build(description["package"]), description).to(device).eval()


def _axis_names(axes: list[dict[str, Any]]) -> list[str]:
    """batch, channel, or the space axis' id, in the tensor's order."""
    return [a["id"] if a["type"] == "space" else a["type"] for a in axes]


@functools.cache
def _network_class() -> type:
    """The wrapper class, made on first use: planning reads packages without torch."""
    import torch

    class _PackagedNetwork(torch.nn.Module):
        """A package's network as the tile runner calls unetflow's U-Net: (N, C, *spatial)
        float32 in, postprocessed (N, K, *spatial) out, `forward_core` cropping the halo.

        Windows are padded at their end to the next size the package accepts and the
        output cropped back; inputs and outputs are permuted to the package's axis order.
        """

        def __init__(self, network: torch.nn.Module, description: dict[str, Any]) -> None:
            super().__init__()
            self.network = network
            self.package = description["package"]
            self.task = description["task"]
            self.spatial_dims = len(self.package["space_axes"])

        def _valid_sizes(self, shape: tuple[int, ...]) -> list[int]:
            sizes = []
            for s, low, step in zip(shape, self.package["size_min"], self.package["size_step"],
                                    strict=True):
                sizes.append(low + max(0, math.ceil((s - low) / step)) * step)
            return sizes

        def _to_package(self, x: torch.Tensor) -> torch.Tensor:
            """(N, C, *space) -> the package's input axis order (batch/channel optional;
            without a batch axis N is 1)."""
            order = ["batch", "channel", *self.package["space_axes"]]
            wanted = _axis_names(self.package["input"]["axes"])
            for position, name in ((1, "channel"), (0, "batch")):
                if name not in wanted:
                    x = x.select(position, 0)
                    order.remove(name)
            return x.permute(*[order.index(a) for a in wanted]).contiguous()

        def _from_package(self, y: torch.Tensor) -> torch.Tensor:
            """The package's output order -> (N, K, *space)."""
            have = _axis_names(self.package["output"]["axes"])
            for position, name in ((0, "batch"), (1, "channel")):
                if name not in have:
                    y = y.unsqueeze(position)
                    have.insert(position, name)
            return y.permute(*[have.index(a) for a in ["batch", "channel",
                                                       *self.package["space_axes"]]])

        def _run(self, x: torch.Tensor) -> torch.Tensor:
            if "batch" in _axis_names(self.package["input"]["axes"]):
                return self._from_package(self.network(self._to_package(x)))
            return torch.cat([self._from_package(self.network(self._to_package(t[None])))
                              for t in x])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = tuple(x.shape[2:])
            pads: list[int] = []
            for s, v in zip(reversed(shape), reversed(self._valid_sizes(shape)), strict=True):
                pads += [0, v - s]
            y = self._run(torch.nn.functional.pad(x, pads) if any(pads) else x)
            y = y[(..., *(slice(0, s) for s in shape))].float()
            for step in self.package["postprocessing"]:
                y = _postprocess(y, step, self.package["path"])
            if self.task == "segmentation" and y.shape[1] == 1:
                y = torch.cat([1 - y, y], dim=1)
            return y

        def forward_core(self, x: torch.Tensor, halo: int) -> torch.Tensor:
            """forward(x) without `halo` pixels on each side of every space axis."""
            y = self.forward(x)
            return y[(..., *(slice(halo, s - halo) for s in y.shape[2:]))]

    return _PackagedNetwork


def _postprocess(y: Any, step: dict[str, Any], path: str) -> Any:
    """One postprocessing step on (N, K, *space) torch tensors."""
    import torch

    if step["id"] == "softmax":
        axis = step["kwargs"].get("axis", "channel")
        if axis != "channel":
            raise PackageError(f"{path}: postprocessing softmax along {axis!r}; unetflow "
                               f"applies it over channels")
        return torch.softmax(y, dim=1)
    if step["id"] == "sigmoid":
        return torch.sigmoid(y)
    if step["id"] == "ensure_dtype":
        return y.float()
    kw = step["kwargs"]
    view = (1, -1) + (1,) * (y.ndim - 2)
    per = {k: torch.as_tensor(np.asarray(v, np.float32)).reshape(view).to(y.device)
           for k, v in kw.items() if isinstance(v, (int, float, list)) and k != "axis"}
    if step["id"] == "scale_linear":
        return y * per.get("gain", 1.0) + per.get("offset", 0.0)
    if step["id"] == "fixed_zero_mean_unit_variance":
        return (y - per["mean"]) / (per["std"] + kw.get("eps", 1e-6))
    if step["id"] == "clip":
        return y.clamp(kw.get("min"), kw.get("max"))
    return (y > per["threshold"]).float()  # binarize


def PackagedNetwork(network: Any, description: dict[str, Any]) -> Any:  # noqa: N802
    """A package's network wrapped for unetflow's tile runner (see `_network_class`)."""
    return _network_class()(network, description)
