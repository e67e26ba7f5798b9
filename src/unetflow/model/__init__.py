"""Network architectures."""

from unetflow.model.unet import UNet, build_unet, halo_for

__all__ = ["UNet", "build_unet", "halo_for"]
