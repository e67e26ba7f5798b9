"""Touching nuclei as separate objects on the demo's own images: the boundary targets of
their labels, taken as ideal predicted maps, give back the nuclei through the seeded
watershed, out of core as in memory, in 2D and on the demo's 3D stack; and the workflow
runs the boundaries mode for real."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from conftest import planned_jobs, snakemake, write_config
from unetflow.demo import synthesize_nuclei
from unetflow.metrics import instance_scores
from unetflow.targets import BOUNDARY_CLASSES, boundary_classes
from unetflow.watershed import seeded_watershed, seeded_watershed_chunked

SETTINGS = {"foreground_threshold": 0.5, "seed_threshold": 0.5, "min_seed_size": 4,
            "min_size": 8}


def ideal_maps(labels: np.ndarray, width: int) -> np.ndarray:
    """The probabilities of a perfect network: one-hot background / interior / boundary."""
    classes = boundary_classes(labels, width)
    return np.stack([(classes == k) for k in range(BOUNDARY_CLASSES)]).astype(np.float32)


def largest_clump(labels: np.ndarray) -> int:
    """The longest extent of a clump of touching objects (a foreground component)."""
    clumps, _ = ndimage.label(labels > 0)
    return max(s.stop - s.start for box in ndimage.find_objects(clumps) for s in box)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same objects, whatever their ids: each id of one maps to exactly one of the other."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# 2D: a corner-sized scene of the demo's kind; 3D: the demo's own stack (demo_store's
# stack_3d: shape_3d [32, 128, 128], seed 42 + 2)
@pytest.mark.parametrize("shape, seed, chunks", [((256, 256), 42, (64, 96)),
                                                 ((32, 128, 128), 44, (16, 48, 48))])
def test_ideal_maps_of_the_demo_nuclei_give_back_the_nuclei_tiled_as_whole(
        tmp_path, shape, seed, chunks):
    labels = synthesize_nuclei(shape, seed=seed).labels
    maps = ideal_maps(labels, width=1)
    halo = largest_clump(labels) + 1  # exactness needs clumps within the halo
    settings = {**SETTINGS, "halo": halo}
    whole = seeded_watershed(maps, settings)
    tiled, count = seeded_watershed_chunked(
        da.from_array(maps, chunks=(3, *chunks)), tmp_path / "scratch", 2, settings)
    tiled = np.asarray(tiled.compute())
    assert same_partition(tiled, whole)
    assert count == len(np.unique(whole[whole > 0]))
    # the demo's nuclei touch: connected components make fewer objects than there are nuclei
    assert ndimage.label(labels > 0)[1] < len(np.unique(labels[labels > 0]))
    merged = instance_scores(labels, ndimage.label(labels > 0)[0])
    scores = instance_scores(labels, whole)
    assert scores["f1"] >= 0.95 and scores["f1"] > merged["f1"]
    assert scores["mean_ap"] >= 0.8


@pytest.mark.slow
def test_the_workflow_learns_boundaries_and_reruns_what_their_settings_touch(tmp_path,
                                                                             tiny_config):
    """A real Snakemake run of a boundaries model (a few steps: its objects are not good,
    the test checks the chain): extraction stores 3 classes, the network has 3 outputs,
    prediction makes objects by the watershed and the metrics say so. Then the reruns:
    model.target / boundary_width from extraction on, predict.watershed the prediction on
    (an output key: the tile steps run again only because their raw store is a temp())."""
    import torch
    import zarr

    tiny_config["models"] = {"seg": {**tiny_config["models"]["seg"],
                                     "model": {"target": "boundaries", "boundary_width": 1}}}
    write_config(tmp_path, tiny_config)
    snakemake(tmp_path, "--cores", "2", "--configfile", "config.yaml")
    store = zarr.open_group(str(tmp_path / "results/seg/patches.zarr"), mode="r")
    assert store.attrs["unetflow"]["target"] == {"target": "boundaries", "boundary_width": 1}
    assert set(np.unique(store["train/targets"][:]).tolist()) == {0, 1, 2}
    checkpoint = torch.load(tmp_path / "results/seg/checkpoint_best.pt", weights_only=True)
    assert checkpoint["model_config"]["out_channels"] == 3
    metrics = json.loads((tmp_path / "results/seg/metrics/te_seg.json").read_text())
    assert metrics["objects"].startswith("seeded watershed (model.target: boundaries")
    assert "f1" in metrics["scores"]["unet"]

    def rules_after(edit) -> set[str]:
        config = json.loads(json.dumps(tiny_config))
        edit(config)
        write_config(tmp_path, config)
        result = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", "config.yaml")
        return {rule for rule, _ in planned_jobs(result.stdout + result.stderr)}

    downstream = {"predict_create", "predict_shard", "predict", "evaluate", "montage",
                  "compare", "summarize", "all"}
    assert rules_after(lambda c: c["models"]["seg"]["model"].update(boundary_width=2)) == \
        {"extract_patches", "train"} | downstream
    assert rules_after(lambda c: c["models"]["seg"]["model"].update(target="classes")) == \
        {"extract_patches", "train"} | downstream
    assert rules_after(lambda c: c["predict"].update(watershed={"min_size": 4})) == downstream
