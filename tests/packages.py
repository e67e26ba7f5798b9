"""bioimage.io packages built for the tests with bioimageio.spec: a plain CNN (another
architecture) and a unetflow U-Net as the exporter writes it (import_from + kwargs, and
torchscript). Each is a real package that `bioimageio.spec` validates when it saves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetflow.model.unet import UNet, exact_halo


def _spec():
    from bioimageio.spec.model import v0_5

    return v0_5


def plain_cnn(in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> torch.nn.Sequential:
    """Three 3x3 convolutions: reach 3 px per side, any input size."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, out_channels, 3, padding=1)).eval()


def _space_in(v, ids, size_min, step):
    return [v.SpaceInputAxis(id=v.AxisId(a), size=v.ParameterizedSize(min=size_min, step=step))
            for a in ids]


def _space_out(v, ids, tensor, halo):
    if not halo:
        return [v.SpaceOutputAxis(id=v.AxisId(a), size=v.SizeReference(
            tensor_id=v.TensorId(tensor), axis_id=v.AxisId(a))) for a in ids]
    return [v.SpaceOutputAxisWithHalo(id=v.AxisId(a), halo=halo, size=v.SizeReference(
        tensor_id=v.TensorId(tensor), axis_id=v.AxisId(a))) for a in ids]


def _weights(v, folder: Path, network: torch.nn.Module, example: torch.Tensor,
             formats: tuple[str, ...], architecture: dict[str, Any] | None,
             traced: torch.nn.Module | None):
    entries = {}
    version = v.Version(torch.__version__.split("+")[0])
    if "torchscript" in formats:
        torch.jit.trace(traced or network, example).save(folder / "weights.torchscript.pt")
        entries["torchscript"] = v.TorchscriptWeightsDescr(
            source=folder / "weights.torchscript.pt", pytorch_version=version)
    if "pytorch_state_dict" in formats:
        torch.save(network.state_dict(), folder / "weights.pt")
        entries["pytorch_state_dict"] = v.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt", pytorch_version=version,
            architecture=(v.ArchitectureFromFileDescr if "source" in architecture
                          else v.ArchitectureFromLibraryDescr)(**architecture))
    if "onnx" in formats:
        (folder / "weights.onnx").write_bytes(b"not really onnx")
        entries["onnx"] = v.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=15)
    return v.WeightsDescr(**entries)


def build_package(folder: Path, network: torch.nn.Module, *, channels: list[str],
                  classes: list[str], halo: int, size_min: int, step: int,
                  preprocessing: list | None = None, postprocessing: list | None = None,
                  formats: tuple[str, ...] = ("torchscript",),
                  architecture: dict[str, Any] | None = None, space: tuple = ("y", "x"),
                  test_shape: int = 64, zip_it: bool = True, name: str = "test model",
                  traced: torch.nn.Module | None = None) -> Path:
    """Save a model package of `network` (its test tensors computed by the network itself
    with the given processing left out: they only need to exist here) -> the zip or folder.
    `traced` is what torchscript traces, when not `network` itself."""
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

    v = _spec()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.random((1, len(channels), *(test_shape,) * len(space)), dtype=np.float32)
    with torch.no_grad():
        y = network(torch.from_numpy(x)).numpy()
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", y)
    (folder / "README.md").write_text(f"# {name}\n\nA package made by unetflow's tests.\n")
    inputs = v.InputTensorDescr(
        id=v.TensorId("raw"), test_tensor=v.FileDescr(source=folder / "test_input.npy"),
        axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in channels]),
              *_space_in(v, space, size_min, step)],
        preprocessing=preprocessing or [])
    outputs = v.OutputTensorDescr(
        id=v.TensorId("out"), test_tensor=v.FileDescr(source=folder / "test_output.npy"),
        axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in classes]),
              *_space_out(v, space, "raw", halo)],
        postprocessing=postprocessing or [])
    descr = v.ModelDescr(
        name=name, description="made by unetflow's tests", authors=[v.Author(name="unetflow")],
        cite=[v.CiteEntry(text="unetflow tests", url="https://example.org/unetflow")],
        license=v.LicenseId("MIT"), documentation=v.FileDescr(source=folder / "README.md"),
        inputs=[inputs], outputs=[outputs],
        weights=_weights(v, folder, network, torch.from_numpy(x), formats, architecture,
                         traced))
    if zip_it:
        return save_bioimageio_package(descr, output_path=folder.with_suffix(".zip"))
    return save_bioimageio_package_as_folder(descr, output_path=folder.with_name(
        folder.name + "_package"))


def unet_package(folder: Path, unet: UNet, *, formats=("pytorch_state_dict", "torchscript"),
                 softmax: bool = True, **kwargs: Any) -> Path:
    """A unetflow U-Net packaged with the exporter's pieces: architecture import_from
    unetflow.model.unet with the network's kwargs, torchscript traced from
    `export.TracedUNet`, the sizes of `export.input_size` (min above twice the halo, step
    2**depth), the exact halo on the output, softmax postprocessing."""
    from unetflow.export import ARCHITECTURE, TracedUNet, input_size

    v = _spec()
    post = [v.SoftmaxDescr(kwargs=v.SoftmaxKwargs(axis=v.AxisId("channel")))] if softmax else []
    config, halo = unet.config(), exact_halo(unet)
    size_min, step = input_size(unet, halo)
    return build_package(
        folder, unet.eval(), channels=[f"c{i}" for i in range(config["in_channels"])],
        classes=[f"k{i}" for i in range(config["out_channels"])], halo=halo,
        size_min=size_min, step=step, postprocessing=post, formats=formats,
        architecture={**ARCHITECTURE, "kwargs": config}, traced=TracedUNet(unet.eval()),
        **kwargs)


def cnn_package(folder: Path) -> Path:
    """A plain CNN (reach 3 px, halo 4, sizes 16 + 8n), scale_linear in, softmax out: a
    package of an architecture that is not unetflow's."""
    v = _spec()
    return build_package(
        folder, plain_cnn(), channels=["dna"], classes=["background", "nucleus"], halo=4,
        size_min=16, step=8,
        preprocessing=[v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=0.5, offset=-1.0))],
        postprocessing=[v.SoftmaxDescr(kwargs=v.SoftmaxKwargs(axis=v.AxisId("channel")))])
