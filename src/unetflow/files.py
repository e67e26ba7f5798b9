"""Small file helpers shared by the stages."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic"]


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON under a temporary name in the same folder, then rename it into place.

    A killed job never leaves a complete-looking file, and two processes never share the
    temporary name (it carries the process id).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
