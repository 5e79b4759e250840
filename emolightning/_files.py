"""Writing files so that nothing is ever left half-written: a temporary name, then a rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union


def save_tensors_atomically(tensors: dict[str, Any], path: Union[str, Path], metadata: dict[str, str]) -> Path:
    """A safetensors file written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path
