"""Writing files so that nothing is ever left half-written: a temporary name, then a rename; and
removing the temporary files that a killed write left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Union

PARTIAL_SUFFIX = ".partial"
STALE_AFTER_S = 60.0
"""A temporary file not modified for this long is not being written: a write streams its bytes
and touches the file all the time, so one that stopped a minute ago was killed."""


def temporary_path(path: Union[str, Path]) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.partial`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` has the name :func:`temporary_path` gives (``.<name>.partial``)."""
    name = path.name
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and len(name) > len(PARTIAL_SUFFIX) + 1


def remove_stale_partials(folder: Union[str, Path], *, before: Optional[float] = None, recursive: bool = False,
                          stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the ``.<name>.partial`` files that killed writes left in ``folder``.

    Only files with the kit's temporary name are touched, and only those that nobody is still
    writing: last modified before ``before`` (e.g. the time the run started) and at least
    ``stale_after_s`` seconds ago. Files that vanish or cannot be removed meanwhile are skipped.

    Args:
        folder: where to look; nothing happens if it does not exist.
        before: a time (``time.time()``) the file must be older than; default: now.
        recursive: look in the subfolders too.
        stale_after_s: how long a file must have been left alone.

    Returns:
        The files removed.

    Example:
        >>> remove_stale_partials("runs/my_lora/lightning_logs", before=run_started, recursive=True)
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - stale_after_s
    if before is not None:
        cutoff = min(cutoff, before)
    removed = []
    for path in folder.rglob(f"*{PARTIAL_SUFFIX}") if recursive else folder.glob(f"*{PARTIAL_SUFFIX}"):
        if not is_temporary(path):
            continue
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # removed by someone else, or not ours to remove
            continue
    return removed


def save_tensors_atomically(tensors: dict[str, Any], path: Union[str, Path], metadata: dict[str, str]) -> Path:
    """A safetensors file written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path
