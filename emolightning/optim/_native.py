"""The fused path's CPU kernels: C++ multi-tensor updates, built on first use.

``fused=True`` on the CPU runs EmoNavi's, EmoFact's and EmoLynx's updates (and EmoClan's
Navi and Lynx rules) as one C++ call per bucket of float32 or float64 tensors
(``csrc/emo_kernels.cpp``, registered as ``torch.ops.emolightning.*``), like torch's own fused
AdamW: every element is read and written once and the work is split across torch's CPU
threads, with no per-tensor Python or compiled-graph input checks. The source is compiled with
``torch.utils.cpp_extension`` the first time it is needed (a few seconds; it needs a C++
compiler, as ``torch.compile`` does on the CPU, and ``ninja``) and cached in torch's extension
folder (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), in a build folder
named after the source's contents and place, so that checkouts or versions sharing that folder
never rebuild each other's kernels.

Everything else (CUDA tensors, float16/bfloat16 buckets, tensors of mixed dtypes) takes the
``torch.compile``-d update. If the kernels cannot be built, a warning says why once and the
compiled update is used. ``EMOLIGHTNING_NATIVE_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

SOURCE = Path(__file__).parent / "csrc" / "emo_kernels.cpp"


def _library_name(source: Path) -> str:
    # One build folder per source file and place: torch rebuilds a library whose build file
    # changed, so two checkouts (or versions) sharing one extension folder would rebuild it in
    # turn, and a process could load the library while another rewrote it.
    digest = hashlib.sha1(source.read_bytes() + str(source.resolve()).encode()).hexdigest()[:12]
    return f"emolightning_kernels_{digest}"


LIBRARY = _library_name(SOURCE)

enabled = os.environ.get("EMOLIGHTNING_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_ops: Optional[Any] = None
_tried = False


def native_kernels() -> Optional[Any]:
    """``torch.ops.emolightning`` once the kernels are built and loaded; None when they are
    turned off or could not be built (the reason is given once as a ``RuntimeWarning``)."""
    global _ops, _tried
    if not enabled:
        return None
    if _tried:
        return _ops
    _tried = True
    try:
        from torch.utils.cpp_extension import load

        _ensure_ninja_on_path()
        _clear_stale_lock()
        # No -march=native: the build folder may be shared by machines of different CPUs (the
        # source picks AVX2 or baseline loops at load time). -fno-math-errno lets the compiler
        # vectorize sqrt (errno is never read here). -ffp-contract=off: no fused multiply-adds,
        # so an element rounds alike in a vector loop and in its scalar remainder, and results
        # do not depend on how the elements are split between threads.
        load(name=LIBRARY, sources=[str(SOURCE)],
             extra_cflags=["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        _ops = torch.ops.emolightning
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        warnings.warn(
            f"emolightning: the fused path's CPU kernels ({SOURCE.name}) could not be built "
            f"({type(error).__name__}: {str(error).strip()[-500:]}); fused=True uses the "
            "torch.compile-d update instead. Install a C++ compiler and ninja to get them, or "
            "set EMOLIGHTNING_NATIVE_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _ops


# A build takes seconds; a lock file older than this was left by a process killed mid-build
# (torch removes it on errors and interrupts), and every later load would wait for it forever.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock() -> None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(LIBRARY, verbose=False)) / "lock"
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
            warnings.warn(f"emolightning: removed a stale build lock, {lock}", RuntimeWarning, stacklevel=3)
    except (ImportError, OSError):
        pass  # no lock (the usual case), or torch moved its helper: nothing to clear


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package installs it beside the Python
    scripts, which is not on PATH when a virtual environment is used without activating it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # torch's own error then says that ninja is needed
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + ninja.BIN_DIR
