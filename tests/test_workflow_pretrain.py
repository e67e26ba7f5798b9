"""Learning from little data, run by the real Snakemake: a Noise2Void denoiser trained on a
dataset that has no target, and a segmentation model started from its encoder; which
edits rerun which stages."""

from __future__ import annotations

import json

import pytest

from conftest import planned_jobs, snakemake, write_config


def pretrain_config(tiny_config: dict) -> dict:
    config = tiny_config
    config["datasets"]["noisy"] = {"image": "data/demo/train_2d/image.ome.zarr"}  # no target
    config["models"] = {
        "n2v": {"task": "regression", "train_on": ["noisy"], "predict_on": ["te_dn"],
                "model": {"target": "n2v"},
                "train": {"blind_spot": {"fraction": 0.01}}},
        "ft": {"task": "segmentation", "train_on": ["tr_seg"],  # trained, not applied
               "train": {"init_from": "results/n2v/checkpoint_best.pt",
                         "init_encoder_only": True, "freeze_encoder_steps": 4}},
    }
    return config


@pytest.mark.slow
def test_n2v_without_targets_starts_a_segmentation_model_and_reruns_what_it_should(
        tmp_path, tiny_config):
    import torch
    import zarr

    from unetflow.model.unet import encoder_state

    config = pretrain_config(tiny_config)
    write_config(tmp_path, config)
    snakemake(tmp_path, "--cores", "2", "--configfile", "config.yaml")

    store = zarr.open_group(str(tmp_path / "results/n2v/patches.zarr"), mode="r")
    assert store.attrs["unetflow"]["target"]["target"] == "n2v"
    assert sorted(store["train"].array_keys()) == ["images"]  # no target read or stored
    metrics = json.loads((tmp_path / "results/n2v/metrics/te_dn.json").read_text())
    assert metrics["task"] == "regression" and "psnr" in metrics["scores"]["unet"]
    assert "input" in metrics["scores"]  # scored against the clean image of te_dn

    source = torch.load(tmp_path / "results/n2v/checkpoint_best.pt", weights_only=True)
    tuned = torch.load(tmp_path / "results/ft/checkpoint_last.pt", weights_only=True)
    assert tuned["initialized_from"]["part"] == "encoder"
    assert tuned["initialized_from"]["path"] == "results/n2v/checkpoint_best.pt"
    assert tuned["initialized_from"]["task"] == "regression"
    encoder = encoder_state(source["model_state"])
    assert encoder and all(torch.equal(tuned["model_state"][k], v) for k, v in encoder.items())
    assert tuned["model_config"]["out_channels"] == 2 != source["model_config"]["out_channels"]

    def rules_after(edit) -> set[tuple[str, str]]:
        edited = json.loads(json.dumps(config))
        edit(edited)
        write_config(tmp_path, edited)
        result = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", "config.yaml")
        return planned_jobs(result.stdout + result.stderr)

    masking = rules_after(lambda c: c["models"]["n2v"]["train"]["blind_spot"].update(
        fraction=0.02))
    assert ("train", "model=n2v") in masking and ("train", "model=ft") in masking
    assert not any(rule == "extract_patches" for rule, _ in masking)
    # blind_spot means nothing to a segmentation model: editing it reruns nothing
    assert rules_after(lambda c: c["models"]["ft"]["train"].update(
        blind_spot={"fraction": 0.05})) == set()
    assert ("extract_patches", "model=n2v") in rules_after(
        lambda c: c["models"]["n2v"]["model"].update(target="classes") or
        c["models"]["n2v"].update(train_on=["tr_dn"]))
