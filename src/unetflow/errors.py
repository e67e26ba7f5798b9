"""Errors a user can fix, which the command line reports in one line (unetflow.cli).

Kept apart from the modules that raise them so that the CLI can name them without importing
torch: `unetflow show` or `unetflow summarize` start in a fraction of a second.
"""

from __future__ import annotations

__all__ = ["DeviceUnavailable"]


class DeviceUnavailable(RuntimeError):
    """A setting insists on CUDA where no usable GPU is; the message names the setting."""
