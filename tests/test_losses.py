"""Tests for unetflow.losses: values checkable by hand, ignore_label, 2D and 3D."""

import pytest
import torch
import torch.nn.functional as F

from unetflow.losses import LOSSES, build_loss, ssim_gaussian11

SPATIAL = {2: (6, 7), 3: (3, 5, 4)}


def perfect_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose softmax is the one-hot labels up to exp(-50)."""
    return 50.0 * F.one_hot(labels, num_classes).movedim(-1, 1).double()


def random_labels(spatial_dims: int, num_classes: int = 3, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, num_classes, (batch, *SPATIAL[spatial_dims]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mse_and_mae_equal_torch(spatial_dims):
    prediction = torch.randn(2, 2, *SPATIAL[spatial_dims])
    target = torch.randn(2, 2, *SPATIAL[spatial_dims])
    assert build_loss("regression", "mse")(prediction, target) == F.mse_loss(prediction, target)
    assert build_loss("regression", "mae")(prediction, target) == F.l1_loss(prediction, target)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ssim_gaussian11_of_identical_images_is_one_so_mae_ssim_is_zero(spatial_dims):
    image = 5.0 * torch.rand(2, 2, *(12,) * spatial_dims, dtype=torch.float64) - 1.0
    torch.testing.assert_close(ssim_gaussian11(image, image),
                               torch.tensor(1.0, dtype=torch.float64))
    assert build_loss("regression", "mae_ssim")(image, image).abs() < 1e-12


@pytest.mark.parametrize("shape", [(20, 24), (14, 20, 24)])
def test_ssim_gaussian11_equals_scikit_image(shape):
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    target = torch.rand(shape, dtype=torch.float64)
    prediction = target + 0.2 * torch.randn_like(target)
    expected = metrics.structural_similarity(
        prediction.numpy(), target.numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=float(target.max() - target.min()),
    )
    value = ssim_gaussian11(prediction[None, None], target[None, None])
    assert float(value) == pytest.approx(expected)


def test_ssim_gaussian11_is_lower_for_noisier_prediction_and_thin_axes_work():
    torch.manual_seed(0)
    target = torch.rand(1, 1, 3, 16, 16, dtype=torch.float64)  # z shorter than the window
    slightly = ssim_gaussian11(target + 0.05 * torch.randn_like(target), target)
    very = ssim_gaussian11(target + 0.5 * torch.randn_like(target), target)
    assert 1 > slightly > very


def test_ssim_gaussian11_uses_target_range_so_it_is_scale_invariant():
    torch.manual_seed(0)
    target = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    prediction = target + 0.1 * torch.randn_like(target)
    torch.testing.assert_close(ssim_gaussian11(1000 * prediction, 1000 * target),
                               ssim_gaussian11(prediction, target))


def test_mae_ssim_gradient_is_finite_for_constant_target():
    prediction = torch.rand(1, 1, 12, 12, requires_grad=True)
    loss = build_loss("regression", "mae_ssim")(prediction, torch.zeros(1, 1, 12, 12))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prediction.grad).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_perfect_prediction_gives_dice_near_zero(spatial_dims):
    labels = random_labels(spatial_dims)
    assert build_loss("segmentation", "dice")(perfect_logits(labels, 3), labels) < 1e-6
    assert build_loss("segmentation", "ce_dice")(perfect_logits(labels, 3), labels) < 1e-6


def test_dice_by_hand():
    # Hard predictions of class 1 on 2 of 4 pixels whose label is 1 on 3 of them:
    # Dice = 2 * 2 / (2 + 3) = 0.8 for the only foreground class.
    labels = torch.tensor([[[1, 1, 1, 0]]])
    logits = perfect_logits(torch.tensor([[[1, 1, 0, 0]]]), 2)
    torch.testing.assert_close(
        build_loss("segmentation", "dice")(logits, labels),
        torch.tensor(0.2, dtype=torch.float64), atol=1e-5, rtol=0,
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ce_equals_torch_with_class_weights(spatial_dims):
    labels = random_labels(spatial_dims)
    logits = torch.randn(2, 3, *SPATIAL[spatial_dims])
    weights = [0.2, 1.0, 3.0]
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights))
    torch.testing.assert_close(
        build_loss("segmentation", "ce", class_weights=weights)(logits, labels), expected
    )


def test_target_with_channel_axis_is_squeezed():
    labels = random_labels(2)
    logits = torch.randn(2, 3, *SPATIAL[2])
    loss = build_loss("segmentation", "ce_dice")
    assert loss(logits, labels[:, None]) == loss(logits, labels)


@pytest.mark.parametrize("name", LOSSES["segmentation"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("ignore_label", [255, -1, 0])
def test_ignored_pixels_do_not_change_the_loss(name, spatial_dims, ignore_label):
    labels = random_labels(spatial_dims)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, 1] = True
    labels = torch.where(ignored, torch.full_like(labels, ignore_label), labels)
    logits = torch.randn(2, 3, *SPATIAL[spatial_dims], dtype=torch.float64, requires_grad=True)
    changed = logits.detach() + 10 * torch.randn_like(logits) * ignored[:, None]
    loss = build_loss("segmentation", name, ignore_label=ignore_label, class_weights=[1, 2, 3])
    value = loss(logits, labels)
    torch.testing.assert_close(loss(changed, labels), value.detach())
    value.backward()
    assert (logits.grad * ignored[:, None]).abs().max() == 0


@pytest.mark.parametrize("name", LOSSES["segmentation"])
def test_all_ignored_gives_zero_loss_and_zero_gradient(name):
    labels = torch.full((1, 4, 4, 4), 255)
    logits = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    loss = build_loss("segmentation", name, ignore_label=255, class_weights=[1.0, 5.0])
    value = loss(logits, labels)
    value.backward()
    assert value == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("task,name,message", [
    ("classification", "ce", "task='classification'"),
    ("regression", "ce", "'ce' is not one of \\['mse', 'mae', 'mae_ssim'\\]"),
    ("segmentation", "mse", "'mse' is not one of \\['ce', 'dice', 'ce_dice'\\]"),
])
def test_unknown_task_or_name_is_named(task, name, message):
    with pytest.raises(ValueError, match=message):
        build_loss(task, name)


def test_segmentation_options_are_refused_for_regression():
    with pytest.raises(ValueError, match="ignore_label=0"):
        build_loss("regression", "mse", ignore_label=0)


def test_bad_inputs_are_named():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="label 3 is outside the classes 0..2"):
        build_loss("segmentation", "ce")(logits, torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match=r"\(1, 4, 5\)"):
        build_loss("segmentation", "dice")(logits, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="float32"):
        build_loss("segmentation", "dice")(logits, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="2 entries for 3 classes"):
        build_loss("segmentation", "ce", class_weights=[1, 2])(logits, torch.zeros(1, 4, 4).long())
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4\) differs"):
        build_loss("regression", "mae")(logits, torch.zeros(1, 1, 4, 4))
