"""Models from bioimage.io packages (and unetflow checkpoints) predicted through the sharded,
tiled OME-Zarr path: oracles are bioimageio.core's own prediction of the package and
unetflow's prediction of the network the package holds. The packages are real ones, built
with bioimageio.spec (tests/packages.py)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import snakemake, write_config
from packages import build_package, cnn_package, plain_cnn, unet_package
from test_predict import (
    predict_defaults,
    relative_error,
    smooth_image,
    tiny_model,
    write_checkpoint,
    write_dataset,
)
from unetflow import notices
from unetflow.checks import dataset_problems
from unetflow.config import ConfigError, validate_config
from unetflow.normalize import read_stats
from unetflow.ome import open_image
from unetflow.packaged import PackageError, describe_package
from unetflow.predict import (
    create_raw_store,
    gather_prediction,
    predict_shard,
    predict_to_ome_zarr,
    prepare_job,
)

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def _spec():
    from bioimageio.spec.model import v0_5

    return v0_5


@pytest.fixture(scope="module")
def cnn_zip(tmp_path_factory) -> Path:
    return cnn_package(tmp_path_factory.mktemp("cnn") / "cnn")


def bioimageio_core_pass(package: Path, x: np.ndarray, halo: int, step: int) -> np.ndarray:
    """The oracle: bioimageio.core's prediction (its own pre- and postprocessing) of the
    image (C, Y, X) reflect-padded by `halo` and zero-padded at its end to the size step,
    cropped back: what unetflow's crop tiling must equal."""
    from bioimageio.core import load_description, predict

    padded = np.pad(x, [(0, 0), (halo, halo), (halo, halo)], mode="reflect")
    ends = [(0, -s % step) for s in padded.shape[1:]]
    padded = np.pad(padded, [(0, 0), *ends])
    sample = predict(model=load_description(package), inputs={"raw": padded[None]})
    y = np.asarray(sample.members["out"].data)[0]
    return y[:, halo:halo + x.shape[1], halo:halo + x.shape[2]]


# --- item 3: packages predict at scale, equal to their own whole-image pass -------------------
def test_plain_cnn_package_predicts_in_shards_what_bioimageio_core_predicts(cnn_zip, tmp_path):
    """Another architecture (a plain CNN, torchscript): crop tiling from the package's halo
    (4, rounded up to its size step 8) and its step, in 3 shards, equals bioimageio.core's
    prediction of the whole image (rtol 1e-5 of the range), pre- and postprocessing
    included; the labels are the argmax's components."""
    data = smooth_image((1, 75, 101)) + 20
    image, stats = write_dataset(tmp_path, data, ["c", "y", "x"])
    settings = predict_defaults(tile_shape=[32, 32], probabilities=True)
    job = prepare_job(str(cnn_zip), image, None, settings, stats, task="segmentation")
    assert job.plan.halo == 8 and job.plan.blending == "crop" and job.plan.tile_count() == 12
    raw = tmp_path / "raw.zarr"
    create_raw_store(job, raw, shards=3)
    records = [predict_shard(job, raw, i, 3, threads=1) for i in range(3)]
    out = tmp_path / "pred.ome.zarr"
    gather_prediction(job, raw, records, out, "cnn", "d", threads=1)
    got = np.asarray(open_image(out).data.compute())
    want = bioimageio_core_pass(cnn_zip, data, 8, 8)
    assert got.shape == want.shape == (2, 75, 101)
    assert relative_error(got, want) < 1e-5
    labels = np.asarray(open_image(f"{out}/labels/prediction").data.compute())
    assert ((labels > 0) == (want.argmax(0) > 0)).all()
    provenance = open_image(out).attrs["unetflow"]  # the package is recorded, not a checkpoint
    assert provenance["normalize"]["method"] == "package"
    assert provenance["model_config"]["package"] == "test model"


@pytest.mark.parametrize("weights", ["pytorch_state_dict", "torchscript"])
def test_packaged_unet_predicts_as_unetflow_predicts_its_network(weights, tmp_path):
    """A unetflow U-Net packaged as the exporter does (architecture import_from
    unetflow.model.unet with its kwargs, or torchscript; the dataset's percentile
    normalization baked in by the exporter's `preprocessing`; softmax): its prediction
    equals unetflow's prediction of the same network from a checkpoint (atol 1e-5 on
    probabilities)."""
    from unetflow.export import preprocessing

    model = tiny_model(channels_out=2, seed=3)
    image, stats_path = write_dataset(tmp_path, smooth_image((1, 75, 101)), ["c", "y", "x"])
    baked = preprocessing(read_stats(stats_path), {"method": "percentile", "clip": False})
    package = unet_package(tmp_path / "unet", model, formats=(weights,), zip_it=False,
                           preprocessing=baked)
    assert describe_package(package)["weights"] == weights
    settings = predict_defaults(tile_shape=[32, 32], probabilities=True)
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "segmentation")
    outputs = {}
    for name, source in (("checkpoint", ckpt), ("package", str(package))):
        outputs[name] = tmp_path / f"{name}.ome.zarr"
        predict_to_ome_zarr(source, image, stats_path, None, settings, str(outputs[name]),
                            name, "d", threads=1, task="segmentation")
    a, b = (np.asarray(open_image(p).data.compute()) for p in outputs.values())
    assert np.abs(a - b).max() < 1e-5
    assert open_image(outputs["package"]).attrs["unetflow"]["halo"] == 24  # exact_halo


def test_package_without_halo_blends_and_says_so_and_sigmoid_gives_two_classes(tmp_path):
    """No declared halo: Gaussian blending over a quarter tile, with a warning naming the
    package; a one-channel sigmoid segmentation becomes background and foreground."""
    v = _spec()
    package = build_package(
        tmp_path / "sig", plain_cnn(out_channels=1, seed=2), channels=["dna"],
        classes=["foreground"], halo=0, size_min=8, step=8,
        postprocessing=[v.SigmoidDescr()])
    data = smooth_image((1, 64, 80))
    image, stats = write_dataset(tmp_path, data, ["c", "y", "x"])
    out = tmp_path / "pred.ome.zarr"
    settings = predict_defaults(tile_shape=[32, 32], probabilities=True)
    predict_to_ome_zarr(str(package), image, stats, None, settings, str(out), "sig", "d",
                        threads=1, task="segmentation")
    said = " ".join(notices.recorded())
    assert "declares no halo" in said and "halo of 8 px" in said and str(package) in said
    got = np.asarray(open_image(out).data.compute())
    assert got.shape == (2, 64, 80) and np.allclose(got.sum(0), 1, atol=1e-6)
    want = bioimageio_core_pass(package, data, 0, 8)[0]
    # blended windows see less context at tile borders: close to the whole pass, not equal
    assert np.median(np.abs(got[1] - want)) < 1e-6 and np.abs(got[1] - want).max() < 0.2


def test_regression_package_writes_its_own_output_units(tmp_path):
    """A regression package's postprocessing (scale_linear back to intensities) decides
    its units: unetflow writes them as they are, and predict.output_units: input does not
    map them again with the dataset's statistics."""
    v = _spec()
    package = build_package(
        tmp_path / "reg", plain_cnn(out_channels=1, seed=4), channels=["raw"],
        classes=["denoised"], halo=4, size_min=16, step=8,
        preprocessing=[v.ZeroMeanUnitVarianceDescr(kwargs=v.ZeroMeanUnitVarianceKwargs(
            axes=[v.AxisId("batch"), v.AxisId("y"), v.AxisId("x")]))],
        postprocessing=[v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=10.0,
                                                                      offset=100.0))])
    data = smooth_image((1, 48, 64)) * 3 + 50
    image, stats = write_dataset(tmp_path, data, ["c", "y", "x"])
    out = tmp_path / "pred.ome.zarr"
    settings = predict_defaults(tile_shape=[32, 32], output_units="input")
    predict_to_ome_zarr(str(package), image, stats, None, settings, str(out), "reg", "d",
                        threads=1, task="regression")
    got = np.asarray(open_image(out).data.compute())
    # the oracle normalizes with the whole image's mean and std, as the package's
    # zero_mean_unit_variance does with the image as its sample (its statistics file)
    channel = json.loads(Path(stats).read_text())["channels"][0]
    x = (data - channel["mean"]) / (channel["std"] + 1e-6)
    padded = np.pad(x, [(0, 0), (8, 8), (8, 8)], mode="reflect")
    with torch.no_grad():
        y = plain_cnn(out_channels=1, seed=4)(torch.from_numpy(padded[None]).float())
    want = y.numpy()[0, 0, 8:-8, 8:-8] * 10 + 100
    assert got.shape == (1, 48, 64) and np.abs(got[0] - want).max() < 1e-3  # about 100


# --- item 4: bad packages, one line naming the key, at planning --------------------------------
def package_config(tmp_path: Path, source: str, kind: str = "package",
                   image: str | None = None) -> dict:
    """A config of one dataset and one model from `source` (no train_on)."""
    if image is None:
        image, _ = write_dataset(tmp_path, smooth_image((1, 64, 64)), ["c", "y", "x"])
    return {"datasets": {"img": {"image": image}},
            "models": {"ext": {"task": "segmentation", kind: source, "predict_on": ["img"]}},
            "predict": {"tile_shape": [32, 32]}}


def problems_of(config: dict) -> list[str]:
    return dataset_problems(validate_config(config))


def _not_a_package(tmp_path: Path, cnn_zip: Path) -> Path:
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat.txt", "meow")
    return path


def _spec_04(tmp_path: Path, cnn_zip: Path) -> Path:
    folder = tmp_path / "old"
    with zipfile.ZipFile(cnn_zip) as archive:
        archive.extractall(folder)
    rdf = folder / "rdf.yaml"
    rdf.write_text(rdf.read_text().replace("format_version: 0.5.", "format_version: 0.4."))
    return folder


def _onnx_only(tmp_path: Path, cnn_zip: Path) -> Path:
    return build_package(tmp_path / "onnx", plain_cnn(), channels=["dna"], classes=["a", "b"],
                         halo=4, size_min=16, step=8, formats=("onnx",))


def _two_channels(tmp_path: Path, cnn_zip: Path) -> Path:
    return build_package(tmp_path / "rgb", plain_cnn(in_channels=2), channels=["r", "g"],
                         classes=["a", "b"], halo=4, size_min=16, step=8)


def _three_d(tmp_path: Path, cnn_zip: Path) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1)).eval()
    return build_package(tmp_path / "vol", net, channels=["dna"], classes=["a", "b"], halo=2,
                         size_min=8, step=8, space=("z", "y", "x"), test_shape=16)


def _missing(tmp_path: Path, cnn_zip: Path) -> Path:
    return tmp_path / "nowhere.zip"


@pytest.mark.parametrize("make,reason", [
    (_not_a_package, r"photos\.zip: not a bioimage\.io package \(no rdf\.yaml"),
    (_spec_04, r"old: model spec 0\.4\.\d+; unetflow reads model spec 0\.5"),
    (_onnx_only, r"onnx\.zip: weights in onnx; unetflow runs pytorch_state_dict or "
                 r"torchscript"),
    (_two_channels, r"rgb\.zip takes 2 input channel\(s\) but model 'ext' reads 1"),
    (_three_d, r"vol\.zip is a 3D model but dataset 'img' .* has the spatial axes \['y', "
               r"'x'\]"),
    (_missing, r"nowhere\.zip: no such file or folder"),
])
def test_bad_package_is_one_line_naming_the_key(make, reason, cnn_zip, tmp_path):
    problems = problems_of(package_config(tmp_path, str(make(tmp_path, cnn_zip))))
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith("config key 'models.ext.package': ")
    assert re.search(reason, problems[0]), problems[0]


def test_python_file_architecture_is_refused_without_running_it(cnn_zip, tmp_path):
    """pytorch_state_dict whose architecture is a .py file of the package (it would run
    the package's code) and no torchscript: refused; a state dict is loaded with
    weights_only (an architecture that is not an nn.Module class is refused too)."""
    folder = tmp_path / "py"
    folder.mkdir()
    marker = tmp_path / "ran.txt"
    (folder / "arch.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    f"import torch\nNet = torch.nn.Conv2d\n")
    package = build_package(folder, plain_cnn(), channels=["dna"], classes=["a", "b"],
                            halo=4, size_min=16, step=8, formats=("pytorch_state_dict",),
                            architecture={"callable": "Net", "source": folder / "arch.py",
                                          "kwargs": {}})
    with pytest.raises(PackageError, match=r"its architecture is the Python file arch\.py "
                                           r"of the package, which would run"):
        describe_package(package)
    assert not marker.exists()
    call = build_package(tmp_path / "call", plain_cnn(), channels=["dna"], classes=["a", "b"],
                         halo=4, size_min=16, step=8, formats=("pytorch_state_dict",),
                         architecture={"callable": "system", "import_from": "os",
                                       "kwargs": {"command": f"touch {marker}"}})
    image, stats = write_dataset(tmp_path, smooth_image((1, 32, 32)), ["c", "y", "x"])
    job = prepare_job(str(call), image, None, predict_defaults(tile_shape=[32, 32]), stats,
                      task="segmentation")
    with pytest.raises(PackageError, match=r"os\.system is not a torch\.nn\.Module class"):
        job.load_network()
    assert not marker.exists()


def test_model_sources_are_exclusive_and_need_predict_on(tmp_path):
    base = package_config(tmp_path, "x.zip")
    both = json.loads(json.dumps(base))
    both["models"]["ext"]["train_on"] = ["img"]
    with pytest.raises(ConfigError, match=r"'models\.ext': give exactly one of train_on .* "
                                          r"\(got train_on and package\)"):
        validate_config(both)
    alone = json.loads(json.dumps(base))
    del alone["models"]["ext"]["predict_on"]
    with pytest.raises(ConfigError, match=r"'models\.ext\.predict_on': model 'ext' comes from "
                                          r"its package"):
        validate_config(alone)


def test_checkpoint_of_another_task_or_grid_is_refused_at_planning(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_model(channels_out=1), "regression")
    config = package_config(tmp_path, ckpt, kind="checkpoint")
    assert problems_of(config) == [f"config key 'models.ext.checkpoint': {ckpt} holds a "
                                   f"regression model but model 'ext' is configured as task: "
                                   f"segmentation; fix the task"]
    config["models"]["ext"]["task"] = "regression"
    config["predict"]["tile_shape"] = [34, 34]
    assert "not multiples of 4, 2**depth of the checkpoint's U-Net" in problems_of(config)[0]


# --- the workflow: nothing written for a bad package (a real run with a package and a
# checkpoint: tests/test_export.py, the round trip) -------------------------------------------
def test_snakemake_refuses_a_bad_package_before_any_job(cnn_zip, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    onnx = _onnx_only(tmp_path, cnn_zip)
    write_config(workdir, package_config(tmp_path, str(onnx)))
    result = snakemake(workdir, "--cores", "1", "--configfile", "config.yaml", check=False)
    assert result.returncode != 0
    line = (f"config key 'models.ext.package': {onnx}: weights in onnx; unetflow runs "
            f"pytorch_state_dict or torchscript")
    assert line in result.stderr
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
