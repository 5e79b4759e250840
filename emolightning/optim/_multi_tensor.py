"""Helpers shared by the optimizers' multi-tensor paths: grouping, dtype care, compilation."""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict
from operator import attrgetter
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor


def floored_eps(eps: float, dtype: torch.dtype) -> float:
    """``eps`` raised, where needed, so that it survives in ``dtype``.

    In float16 the reference's ``eps = 1e-8`` rounds to zero, and a second moment that underflowed
    to zero then gives ``0/0``. The floor is the square root of the smallest positive float16
    value (2**-12): the size of a root-mean-square that has just underflowed. bf16, float32 and
    float64 keep ``eps`` unchanged.
    """
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return max(eps, math.sqrt(tiny))


def group_by_device_and_dtype(
    tensors: Sequence[Sequence[Tensor]],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel lists of tensors into buckets of one device and one (first-list) dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = defaultdict(
        lambda: [[] for _ in tensors]
    )
    for items in zip(*tensors):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for column, item in zip(bucket, items):
            column.append(item)
    return dict(buckets)


def scalar_tensor(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor on ``like``'s device: compiled updates take changing scalars this way, so a new
    learning rate or emoDrive does not trigger a recompilation."""
    return torch.tensor(value, dtype=like.dtype if like.is_floating_point() else torch.float32,
                        device=like.device)


def _fresh_copy(fn: Callable) -> Callable:
    # torch.compile keeps its cache on the code object. A private copy per optimizer keeps one
    # optimizer's parameter shapes from filling another's cache (and its recompile limit).
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledUpdate:
    """A multi-tensor update run through ``torch.compile``, with the eager function as fallback.

    The first call compiles (then torch caches the kernels on disk). Callers must pass tensors
    of the same shapes, dtypes and strides on every call: 0-d tensors as 1-element views, since
    Inductor treats 0-d CPU tensors as numbers and drops in-place updates to them. If compilation is unavailable or fails, a warning is given once and the eager function is
    used from then on.
    """

    def __init__(self, fn: Callable[..., None], name: str) -> None:
        self.eager = fn
        self.name = name
        self._compiled: Optional[Callable[..., None]] = None
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(_fresh_copy(self.eager), fullgraph=True,
                                                   dynamic=False, options={"size_asserts": False})
                self._compiled(*args, **kwargs)
                return
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back
                self.failed = True
                warnings.warn(
                    f"{self.name}: the compiled update failed ({type(error).__name__}: {error}); "
                    "using the eager update from now on.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.eager(*args, **kwargs)


def check_gradients(params: Sequence[Tensor], grads: Sequence[Tensor], optimizer: str) -> None:
    """Refuse sparse and complex gradients, naming the parameter's shape."""
    if not any(map(_is_sparse, grads)) and not any(map(Tensor.is_complex, grads)):
        return
    for p, grad in zip(params, grads):
        if grad.is_sparse:
            raise RuntimeError(
                f"{optimizer} does not support sparse gradients (a parameter of shape "
                f"{tuple(p.shape)} got one); use a dense embedding or torch.optim.SparseAdam."
            )
        if grad.is_complex():
            raise RuntimeError(
                f"{optimizer} does not support complex parameters or gradients (shape "
                f"{tuple(p.shape)}); view them as real with torch.view_as_real."
            )


_is_sparse = attrgetter("is_sparse")


def decay_(p: Tensor, lr: Any, weight_decay: float) -> None:
    """``p -= lr * weight_decay * p``; the eager form is the reference's exact operation."""
    if isinstance(lr, Tensor):
        p.sub_(p * (lr * weight_decay))
    else:
        p.add_(p, alpha=-lr * weight_decay)


def step_(p: Tensor, direction: Tensor, lr: Any, drive: Any, denom: Optional[Tensor] = None) -> None:
    """``p -= lr * drive * direction [/ denom]``; 0-d tensor scalars on the compiled path."""
    if isinstance(lr, Tensor) or isinstance(drive, Tensor):
        p.sub_((direction if denom is None else direction / denom) * (lr * drive))
    elif denom is None:
        p.add_(direction, alpha=-lr * drive)
    else:
        p.addcdiv_(direction, denom, value=-lr * drive)
