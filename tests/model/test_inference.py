"""Tests for unetflow.model.inference: the prediction copy computes the trained function."""

import pytest
import torch
from torch import nn

from unetflow.model import UNet, exact_halo
from unetflow.model.inference import fold_batch_norms, memory_format_for, prepare_for_inference


def trained_like_unet(spatial_dims: int, norm: str = "batch", **kwargs) -> UNet:
    """A seeded U-Net whose norms hold non-trivial statistics and affine parameters, as after
    training (fresh batch norms are the identity map and would hide a wrong fold)."""
    torch.manual_seed(0)
    model = UNet(spatial_dims, 2, 3, depth=2, base_features=8, norm=norm, **kwargs)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 2, 40, 56)), (3, (1, 2, 12, 20, 16))])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_prepared_model_computes_the_trained_function(spatial_dims, shape, norm):
    model = trained_like_unet(spatial_dims, norm=norm)
    fast = prepare_for_inference(model, torch.device("cpu"))
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = model(x), fast(x)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-5


def test_folding_removes_every_batch_norm_and_leaves_the_original_alone():
    model = trained_like_unet(2)
    norms_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batch_norms(model)
    assert norms_before == 2 * 5  # 2 per block; depth 2: 2 encoders, bottleneck, 2 decoders
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms_before
    assert folded.reach_by_phase() == model.reach_by_phase()
    assert exact_halo(folded) == exact_halo(model)


def test_group_norms_are_kept_since_they_depend_on_each_input():
    folded = fold_batch_norms(trained_like_unet(2, norm="group"))
    assert sum(isinstance(m, nn.GroupNorm) for m in folded.modules()) == 10


def test_residual_and_interpolating_models_fold_too():
    model = trained_like_unet(2, upsample="interpolate", downsample="conv")
    x = torch.randn(1, 2, 32, 32)
    with torch.inference_mode():
        assert relative_error(fold_batch_norms(model)(x), model(x)) < 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_prepared_weights_are_channels_last(spatial_dims):
    fast = prepare_for_inference(trained_like_unet(spatial_dims), torch.device("cpu"))
    fmt = memory_format_for(spatial_dims)
    first_conv = next(m for m in fast.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    assert first_conv.weight.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu"])
def test_in_place_activations_compute_the_same_function(activation):
    model = trained_like_unet(2, activation=activation)
    fast = prepare_for_inference(model, torch.device("cpu"))
    x = torch.randn(1, 2, 32, 48)
    with torch.inference_mode():
        assert relative_error(fast.forward_core(x, 4), model(x)[..., 4:-4, 4:-4]) < 1e-5
