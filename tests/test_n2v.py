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
