"""unetflow: OME-Zarr microscopy images to a trained U-Net and predictions over whole datasets."""

__version__ = "0.1.0"
