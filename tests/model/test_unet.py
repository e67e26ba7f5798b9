"""Tests for unetflow.model.unet: shapes, configuration, receptive field and halo, training."""

import itertools

import pytest
import torch

from unetflow.model import UNet, build_unet, exact_halo
from unetflow.model.unet import ACTIVATIONS, DOWNSAMPLES, NORMS, UPSAMPLES

TINY = dict(depth=2, base_features=4)


def tiny_unet(spatial_dims: int = 2, channels_in: int = 1, channels_out: int = 2, **kwargs) -> UNet:
    """A small, seeded U-Net, fast enough for many instances per test."""
    torch.manual_seed(0)
    return UNet(spatial_dims, channels_in, channels_out, **{**TINY, **kwargs})


@pytest.mark.parametrize(
    "norm,downsample,upsample", list(itertools.product(NORMS, DOWNSAMPLES, UPSAMPLES))
)
def test_forward_keeps_spatial_shape_2d(norm, downsample, upsample):
    model = tiny_unet(2, 2, 3, norm=norm, downsample=downsample, upsample=upsample)
    assert model(torch.randn(2, 2, 16, 24)).shape == (2, 3, 16, 24)


@pytest.mark.parametrize("norm,downsample,upsample", [
    ("batch", "maxpool", "transpose"), ("group", "conv", "interpolate"),
    ("instance", "maxpool", "interpolate"), ("none", "conv", "transpose"),
])
def test_forward_keeps_spatial_shape_3d(norm, downsample, upsample):
    model = tiny_unet(3, 1, 2, norm=norm, downsample=downsample, upsample=upsample)
    assert model(torch.randn(1, 1, 8, 12, 4)).shape == (1, 2, 8, 12, 4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_runs(activation):
    assert tiny_unet(activation=activation)(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (5, 7), (13, 4), (17, 31)])
@pytest.mark.parametrize("norm", NORMS)
def test_odd_and_tiny_sizes_come_back_unchanged_2d(shape, norm):
    model = tiny_unet(norm=norm, depth=3)
    model.train()
    assert model(torch.randn(1, 1, *shape)).shape == (1, 2, *shape)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_tiny_3d_volume_in_training_mode(norm):
    model = tiny_unet(3, norm=norm)
    model.train()
    assert model(torch.randn(1, 1, 1, 1, 1)).shape == (1, 2, 1, 1, 1)
    assert model(torch.randn(1, 1, 3, 5, 2)).shape == (1, 2, 3, 5, 2)


def test_odd_size_equals_zero_padded_aligned_input():
    model = tiny_unet(norm="none").double()
    x = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 2))
    torch.testing.assert_close(model(x), model(padded)[..., :6, :7])


def test_wrong_input_shape_is_named():
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\)"):
        tiny_unet(channels_in=2)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="3D"):
        tiny_unet(3)(torch.randn(1, 1, 8, 8))


def test_features_grow_per_level_and_group_norm_divides_channels():
    model = UNet(2, 1, 1, depth=2, base_features=12, growth=1.5, norm="group")
    assert [enc[0].out_channels for enc in model.encoders] == [12, 18]
    assert model.bottleneck[0].out_channels == 27
    assert model.bottleneck[1].num_groups == 3  # 27 is not divisible by 8


def test_parameter_count_is_sum_of_numel():
    model = tiny_unet(3, 2, 2, norm="batch", upsample="interpolate")
    assert model.parameter_count() == sum(p.numel() for p in model.parameters())


def test_config_round_trips():
    model = UNet(3, 2, 2, depth=2, base_features=6, growth=1.5, norm="group",
                 activation="silu", downsample="conv", upsample="interpolate", residual=True)
    rebuilt = UNet(**model.config())
    assert rebuilt.config() == model.config()
    assert rebuilt.parameter_count() == model.parameter_count()
    assert isinstance(model.config()["growth"], float)


def test_build_unet_reads_model_section():
    model = build_unet({"depth": 2, "base_features": 8, "norm": "none"}, 3, 2, 4)
    assert model.config() == dict(
        spatial_dims=3, in_channels=2, out_channels=4, depth=2, base_features=8, growth=2.0,
        norm="none", activation="relu", downsample="maxpool", upsample="transpose",
        residual=False,
    )
    assert build_unet({}, 2, 1, 1).config()["depth"] == 3


@pytest.mark.parametrize("kwargs,named", [
    ({"norm": "layer"}, "norm='layer'"),
    ({"activation": "tanh"}, "activation='tanh'"),
    ({"downsample": "avgpool"}, "downsample='avgpool'"),
    ({"upsample": "pixelshuffle"}, "upsample='pixelshuffle'"),
    ({"depth": 0}, "depth=0"),
    ({"base_features": 2.5}, "base_features=2.5"),
    ({"growth": -1}, "growth=-1"),
])
def test_bad_options_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        UNet(2, 1, 1, **kwargs)


def test_bad_spatial_dims_and_unknown_model_keys_are_named():
    with pytest.raises(ValueError, match="spatial_dims=4"):
        UNet(4, 1, 1)
    with pytest.raises(ValueError, match="base_feature"):
        build_unet({"base_feature": 8}, 2, 1, 1)


def test_residual_requires_matching_channels():
    with pytest.raises(ValueError, match="in_channels=2.*out_channels=1"):
        UNet(2, 2, 1, residual=True)


def test_residual_adds_input_to_output():
    model = tiny_unet(2, 2, 2, norm="none", residual=True).double().eval()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    plain = UNet(**{**model.config(), "residual": False}).double().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x) + x)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    torch.testing.assert_close(model(x), x)  # a zero correction is the identity


def measured_reach(model: UNet, positions: list[int], width: int) -> list[tuple[int, set[int]]]:
    """Perturb one input pixel per sample at x = q; return q and the x of changed outputs.

    Eval mode and float64, one sample per position in a batch (norms here are per-sample).
    Rows span one size_multiple; the x-dependence is the same for any row (box kernels).
    """
    model = model.double().eval()
    height = model.size_multiple
    torch.manual_seed(1)
    x = torch.randn(len(positions), model.config()["in_channels"], height, width,
                    dtype=torch.float64)
    perturbed = x.clone()
    for sample, q in enumerate(positions):
        perturbed[sample, 0, height // 2, q] += 1.0
    with torch.no_grad():
        changed = (model(perturbed) - model(x)).abs().amax(dim=(1, 2)) > 0
    return [(q, set(torch.nonzero(changed[s]).flatten().tolist())) for s, q in enumerate(positions)]


def analytic_outputs_reading(model: UNet, q: int, width: int) -> set[int]:
    """Outputs p in [0, width) whose input interval holds q."""
    intervals = {p: model.input_interval(p) for p in range(width)}
    return {p for p, (first, last) in intervals.items() if first <= q <= last}


def interior_positions(model: UNet) -> tuple[list[int], int]:
    """One input position per phase, far enough from the borders, and an image width."""
    m, radius = model.size_multiple, model.receptive_field_radius()
    start = (radius // m + 1) * m
    return list(range(start, start + m)), 2 * start + 2 * m


@pytest.mark.parametrize("depth,upsample", [(2, "transpose"), (3, "transpose"),
                                            (2, "interpolate"), (3, "interpolate")])
def test_receptive_field_equals_perturbation_exactly(depth, upsample):
    # Stride-2 convolutions and GELU pass every dependency on (max pooling and ReLU can drop
    # some for a given input), so the changed outputs must be exactly the analytic set.
    model = tiny_unet(depth=depth, upsample=upsample, norm="none", downsample="conv",
                      activation="gelu")
    positions, width = interior_positions(model)
    reaches = []
    for q, changed in measured_reach(model, positions, width):
        assert changed == analytic_outputs_reading(model, q, width)
        reaches.append(max(q - min(changed), max(changed) - q))
    assert max(reaches) == model.receptive_field_radius()
    assert min(reaches) > model.receptive_field_radius() - model.size_multiple


def test_receptive_field_bounds_max_pooling_network():
    model = tiny_unet(depth=3, norm="batch", downsample="maxpool", activation="relu")
    positions, width = interior_positions(model)
    radius = model.receptive_field_radius()
    reaches = []
    for q, changed in measured_reach(model, positions, width):
        assert changed <= analytic_outputs_reading(model, q, width)
        reaches.append(max(q - min(changed), max(changed) - q))
    assert max(reaches) <= radius
    assert max(reaches) > radius - model.size_multiple


def test_receptive_field_is_the_same_along_every_axis_in_3d():
    model = tiny_unet(3, depth=1, norm="none", downsample="conv", activation="gelu")
    model = model.double().eval()
    radius = model.receptive_field_radius()
    size = 2 * radius + 4
    x = torch.randn(2, 1, size, size, size, dtype=torch.float64)
    perturbed = x.clone()
    perturbed[0, 0, radius + 1, radius + 1, radius + 1] += 1.0  # odd phase: reaches right
    perturbed[1, 0, radius + 2, radius + 2, radius + 2] += 1.0  # even phase: reaches left
    with torch.no_grad():
        changed = (model(perturbed) - model(x)).abs()[:, 0] > 0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        along = torch.nonzero(changed.any(dim=tuple(o + 1 for o in others))[0]).flatten()
        right = int(along.max()) - (radius + 1)
        along = torch.nonzero(changed.any(dim=tuple(o + 1 for o in others))[1]).flatten()
        left = radius + 2 - int(along.min())
        assert max(left, right) == radius


def test_known_receptive_fields():
    # Depth 4, base 32 as measured in FACTS.md: 92-107 px per side, 94 at 16-aligned edges.
    model = UNet(2, 1, 1, depth=4, base_features=32)
    sides = [side for reach in model.reach_by_phase() for side in reach]
    assert (min(sides), max(sides), model.receptive_field_radius()) == (92, 107, 107)
    assert exact_halo(model) == 96
    assert UNet(2, 1, 1).receptive_field_radius() == 51
    assert exact_halo(UNet(2, 1, 1)) == 48


def tiled_prediction(model: UNet, x: torch.Tensor, tile: int, halo: int) -> torch.Tensor:
    """Crop tiling along the last axis: each output tile from its input grown by the halo."""
    width = x.shape[-1]
    padded = torch.nn.functional.pad(x, (halo, halo))  # zeros, as a border read past the image
    tiles = [model(padded[..., start:start + tile + 2 * halo])[..., halo:halo + tile]
             for start in range(0, width, tile)]
    return torch.cat(tiles, dim=-1)


@pytest.mark.parametrize("downsample,upsample", [("maxpool", "transpose"), ("conv", "interpolate")])
def test_exact_halo_is_the_smallest_halo_that_tiles_exactly(downsample, upsample):
    model = tiny_unet(depth=2, norm="none", downsample=downsample, upsample=upsample)
    model = model.double().eval()
    halo, m = exact_halo(model), model.size_multiple
    x = torch.randn(1, 1, 8, 6 * halo, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)
        inside = slice(halo, 5 * halo)  # tiles here never read past the image
        exact = tiled_prediction(model, x, 2 * m, halo)
        short = tiled_prediction(model, x, 2 * m, halo - m)
    torch.testing.assert_close(exact[..., inside], whole[..., inside], rtol=0, atol=1e-12)
    assert (short[..., inside] - whole[..., inside]).abs().max() > 1e-9


def test_tiny_model_overfits_one_batch():
    model = tiny_unet(2, 1, 1, depth=2, base_features=8, norm="batch")
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    target = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # a smoothing to learn
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10


@pytest.mark.parametrize("spatial_dims,norm,downsample,upsample,residual", [
    (2, "batch", "maxpool", "transpose", False), (2, "none", "conv", "interpolate", False),
    (2, "batch", "maxpool", "interpolate", True), (2, "instance", "maxpool", "transpose", False),
    (3, "batch", "maxpool", "transpose", False), (3, "none", "conv", "interpolate", True),
])
@pytest.mark.parametrize("halo", [0, 4, 8])
def test_forward_core_equals_the_cropped_forward(spatial_dims, norm, downsample, upsample,
                                                 residual, halo):
    channels = 2 if residual else 3
    model = tiny_unet(spatial_dims, 2, channels, norm=norm, downsample=downsample,
                      upsample=upsample, residual=residual).eval()
    shape = (37, 29) if spatial_dims == 2 else (21, 19, 26)  # cores off the 2**depth grid
    x = torch.randn(2, 2, *shape)
    core = (..., *(slice(halo, s - halo) for s in shape))
    with torch.no_grad():
        expected, got = model(x)[core], model.forward_core(x, halo)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_forward_core_refuses_halos_off_the_grid_or_without_a_core():
    model = tiny_unet().eval()
    with pytest.raises(ValueError, match="halo 3 must be a multiple of 4"):
        model.forward_core(torch.randn(1, 1, 32, 32), 3)
    with pytest.raises(ValueError, match="halo 16 .* leaves a core"):
        model.forward_core(torch.randn(1, 1, 32, 40), 16)
