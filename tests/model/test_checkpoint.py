"""The checkpoint module: format, atomic save, weights_only load, format-1 upgrade,
descriptions without weights, device choice and the one AMP vocabulary."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unetflow.model.checkpoint import (
    FORMAT,
    autocast_dtype,
    build_model,
    load_checkpoint,
    new_checkpoint,
    read_description,
    save_checkpoint,
    skeleton_model,
)
from unetflow.model.unet import UNet, exact_halo

NORMALIZATION = {"method": "percentile", "clip": False, "datasets": {"d": {"level": 0}}}


def small_model() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 1, 2, depth=2, base_features=4)


def test_saved_checkpoint_loads_back_the_same_network(tmp_path):
    model = small_model().eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, new_checkpoint(model, "segmentation", NORMALIZATION, step=7))
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["step"] == 7
    assert ckpt["normalization"] == NORMALIZATION and "normalize" not in ckpt
    rebuilt = build_model(ckpt, torch.device("cpu"))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary left


def test_new_checkpoint_refuses_an_incomplete_normalization():
    with pytest.raises(ValueError, match=r"normalization lacks \['datasets'\]"):
        new_checkpoint(small_model(), "regression", {"method": "zscore", "clip": False})


def test_format_1_checkpoints_load_with_one_normalization_key(tmp_path):
    """Checkpoints written before format 2 kept the method apart under `normalize`."""
    model = small_model()
    old = {"format": "unetflow-checkpoint-1", "task": "segmentation", "step": 3,
           "model_config": model.config(), "model_state": model.state_dict(),
           "normalize": {"method": "zscore", "clip": True},
           "normalization": {"d": {"level": 0}}}
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["format"] == FORMAT and "normalize" not in ckpt
    assert ckpt["normalization"] == {"method": "zscore", "clip": True,
                                     "datasets": {"d": {"level": 0}}}


def test_a_file_of_another_format_is_refused(tmp_path):
    torch.save({"model_state": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a unetflow checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_description_has_no_weights_and_plans_like_the_network(tmp_path):
    model = small_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, new_checkpoint(model, "segmentation", NORMALIZATION,
                                         optimizer_state={"x": torch.zeros(3)}))
    description = read_description(path)
    assert "model_state" not in description and "optimizer_state" not in description
    assert description["model_config"] == model.config()
    skeleton = skeleton_model(description)
    assert next(skeleton.parameters()).device.type == "meta"
    assert exact_halo(skeleton) == exact_halo(model) and skeleton.config() == model.config()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_payload_is_refused_and_does_not_run(tmp_path):
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _Payload(marker)}, path)
    for load in (load_checkpoint, read_description):
        with pytest.raises(ValueError, match="not a readable unetflow checkpoint"):
            load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as fh:
        pickle.dump(_Payload(tmp_path / "raw_ran"), fh, protocol=2)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "raw.pkl")
    assert not (tmp_path / "raw_ran").exists()


def test_auto_device_falls_back_to_cpu_and_cuda_names_the_setting():
    code = ("from unetflow.model.checkpoint import choose_device\n"
            "print(choose_device('auto', 'predict.device'))\n"
            "try:\n    choose_device('cuda', 'predict.device')\n"
            "except RuntimeError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, check=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    lines = result.stdout.splitlines()
    assert lines[0] == "cpu"
    assert lines[1].startswith("predict.device is 'cuda' but no usable CUDA GPU")
    assert "'0'" in lines[1]


@pytest.mark.parametrize("amp", [True, False, "bf16", "fp16"])
def test_amp_is_float32_on_the_cpu_whatever_its_value(amp):
    assert autocast_dtype(torch.device("cpu"), amp) is None


def test_amp_refuses_words_outside_its_vocabulary():
    with pytest.raises(ValueError, match="'bfloat16' is not one of true, false, bf16, fp16"):
        autocast_dtype(torch.device("cpu"), "bfloat16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_vocabulary_on_cuda():
    cuda = torch.device("cuda")
    bf16 = torch.cuda.is_bf16_supported()
    assert autocast_dtype(cuda, False) is None
    assert autocast_dtype(cuda, "fp16") == torch.float16
    assert autocast_dtype(cuda, True) == (torch.bfloat16 if bf16 else torch.float16)
