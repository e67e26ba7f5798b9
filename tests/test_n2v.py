"""Noise2Void's blind spot: what is masked, what replaces it, and what the loss sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetflow.n2v import blind_spot, masked_count, masked_mse


@pytest.mark.parametrize("shape, fraction", [((1, 64, 64), 0.002), ((2, 50, 70), 0.01),
                                             ((1, 8, 32, 32), 0.005)])
def test_the_mask_touches_the_configured_fraction_of_pixels(shape, fraction):
    patch = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # all values distinct
    manipulated, mask = blind_spot(patch, np.random.default_rng(0), fraction)
    per_channel = masked_count(shape[1:], fraction)
    assert per_channel == max(1, round(fraction * np.prod(shape[1:])))
    assert mask.sum(axis=tuple(range(1, len(shape)))).tolist() == [per_channel] * shape[0]
    assert np.array_equal(manipulated[~mask], patch[~mask])  # nothing else changes


def test_a_masked_pixel_is_never_replaced_by_itself_and_comes_from_its_window():
    rng = np.random.default_rng(1)
    patch = np.arange(16 * 16, dtype=np.float32).reshape(1, 16, 16)
    for _ in range(200):  # small patches: many draws mirror at the edges
        manipulated, mask = blind_spot(patch, rng, fraction=0.05, window=5)
        for y, x in zip(*np.nonzero(mask[0]), strict=True):
            value = int(manipulated[0, y, x])
            source = divmod(value, 16)
            assert source != (y, x)
            assert abs(source[0] - y) <= 4 and abs(source[1] - x) <= 4  # mirrored window


def test_struct_masking_hides_the_line_but_keeps_it_out_of_the_loss():
    patch = np.zeros((1, 32, 32), np.float32)
    patch[0, :, ::2] = 1.0  # stripes
    manipulated, mask = blind_spot(patch, np.random.default_rng(2), fraction=0.003,
                                   struct_axis=1, struct_span=5)
    changed = manipulated != patch
    assert mask.sum() == masked_count((32, 32), 0.003)
    assert (changed & ~mask).any()  # the line's neighbours were replaced
    assert not (changed & ~mask)[0].any(axis=1)[~mask[0].any(axis=1)].any()  # same rows only


def test_the_loss_ignores_unmasked_pixels():
    prediction = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = torch.randn(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 3, 4] = mask[1, 0, 7, 0] = True
    loss = masked_mse(prediction, target, mask)
    loss.backward()
    assert torch.count_nonzero(prediction.grad) == 2
    changed = prediction.detach().clone()
    changed[~mask] += 5.0
    assert torch.equal(masked_mse(changed, target, mask), loss.detach())
    expected = ((prediction - target)[mask] ** 2).mean()
    assert torch.allclose(loss, expected)


def test_bad_settings_are_refused():
    patch = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="fraction"):
        blind_spot(patch, np.random.default_rng(0), fraction=0.0)
    with pytest.raises(ValueError, match="odd"):
        blind_spot(patch, np.random.default_rng(0), window=4)


# --- training: a model.target n2v model on a store of images alone --------------------------
def write_noisy_store(path, n_train: int = 16, n_val: int = 4, size: int = 32,
                      noise: float = 0.3, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """A store as extract_patches writes it for n2v (images only, target attribute n2v),
    cut from one smooth image with independent noise; returns (store, clean, noisy)."""
    import zarr
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    clean = ndimage.gaussian_filter(rng.normal(size=(96, 96)), 3).astype(np.float32)
    clean /= clean.std()
    noisy = (clean + rng.normal(0, noise, size=clean.shape)).astype(np.float32)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["unetflow"] = {"task": "regression", "patch_shape": [size, size],
                               "target": {"target": "n2v", "boundary_width": 2},
                               "normalize": {"method": "none", "clip": False},
                               "datasets": {"toy": {"level": 0}}}
    for split, n in (("train", n_train), ("val", n_val)):
        origins = rng.integers(0, 96 - size + 1, size=(n, 2))
        data = np.stack([noisy[y:y + size, x:x + size] for y, x in origins])[:, None]
        array = group.create_array(f"{split}/images", shape=data.shape, dtype=data.dtype,
                                   chunks=(1, *data.shape[1:]))
        array[...] = data
    return str(path), clean, noisy


def n2v_sections(**train):
    from test_train import sections

    return sections("regression", model={"target": "n2v"}, **train)


def test_n2v_overfits_a_tiny_noisy_image_to_better_than_the_input(tmp_path):
    from unetflow.train import Trainer

    store, clean, noisy = write_noisy_store(tmp_path / "p.zarr")
    model, train = n2v_sections(steps=200, validate_every=100, learning_rate=0.01,
                                blind_spot={"fraction": 0.05}, augment={"intensity": 0.0})
    trainer = Trainer(store, str(tmp_path / "run"), "regression", model, train, threads=1)
    assert trainer.model.config()["out_channels"] == 1  # the image is the target
    trainer.run(progress=False)
    trainer.model.eval()
    with torch.no_grad():
        denoised = trainer.model(torch.from_numpy(noisy)[None, None])[0, 0].numpy()
    input_mse = float(np.mean((noisy - clean) ** 2))
    n2v_mse = float(np.mean((denoised - clean) ** 2))
    assert n2v_mse < 0.7 * input_mse, (n2v_mse, input_mse)


def test_n2v_batches_mask_the_augmented_image_and_replay_by_step(tmp_path):
    from unetflow.train import PatchBatches

    store, _, _ = write_noisy_store(tmp_path / "p.zarr")
    spot = {"fraction": 0.01, "window": 5, "struct_axis": None, "struct_span": 5}
    batches = PatchBatches(store, "train", 4, 0, {"flips": True}, "regression", spot)
    x, y = batches[3]
    mask = torch.isfinite(y)
    assert mask.sum() == 4 * masked_count((32, 32), 0.01)
    again_x, again_y = PatchBatches(store, "train", 4, 0, {"flips": True}, "regression",
                                    spot)[3]
    assert torch.equal(x, again_x) and torch.equal(mask, torch.isfinite(again_y))
    assert not torch.equal(x[mask], y[mask])  # inputs at the masked pixels were replaced
    validation = PatchBatches(store, "val", 4, 0, None, "regression", spot)
    first, second = validation.patches(0, 4), validation.patches(0, 4)  # the same each time
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].nan_to_num(-9.0), second[1].nan_to_num(-9.0))


def test_the_masked_loss_reads_its_mask_from_the_target():
    from unetflow.n2v import masked_loss

    target = torch.full((1, 1, 4, 4), torch.nan)
    target[0, 0, 1, 2] = 1.0
    prediction = torch.zeros(1, 1, 4, 4, requires_grad=True)
    loss = masked_loss("mse")(prediction, target)
    loss.backward()
    assert float(loss.detach()) == 1.0
    assert torch.count_nonzero(prediction.grad) == 1 and prediction.grad[0, 0, 1, 2] != 0
    with pytest.raises(ValueError, match="mse or mae"):
        masked_loss("ssim")


def test_a_store_of_images_alone_and_a_supervised_model_refuse_each_other(tmp_path):
    from test_train import sections, write_store
    from unetflow.train import Trainer

    store, _, _ = write_noisy_store(tmp_path / "p.zarr")
    with pytest.raises(ValueError, match="re-extract the patches"):
        Trainer(store, str(tmp_path / "a"), "regression", *sections("regression"))
    supervised = write_store(tmp_path / "s.zarr", "regression", n_train=4, n_val=2)
    with pytest.raises(ValueError, match="re-extract the patches"):
        Trainer(supervised, str(tmp_path / "b"), "regression", *n2v_sections())


def test_n2v_resume_after_sigterm_gives_the_uninterrupted_weights(tmp_path):
    import signal
    import subprocess

    from test_train import (
        STEPS,
        assert_same_training,
        cli_args,
        outputs,
        wait_for_saved_state,
    )
    from unetflow.train import train_model

    store, _, _ = write_noisy_store(tmp_path / "p.zarr")
    model, train = n2v_sections(blind_spot={"fraction": 0.02},
                                augment={"noise": 0.05})
    reference = tmp_path / "reference"
    reference.mkdir()
    train_model(store, str(reference), "regression", model, train, threads=1,
                **outputs(reference))
    run = tmp_path / "run"
    args = cli_args(store, run, model, train, task="regression")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_saved_state(proc, run)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.stderr.read().decode()[-2000:]
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert_same_training(run, reference)
    assert STEPS == train["steps"]
