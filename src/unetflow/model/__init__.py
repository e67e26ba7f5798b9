"""Network architectures."""

from unetflow.model.unet import UNet, build_unet, exact_halo

__all__ = ["UNet", "build_unet", "exact_halo"]
