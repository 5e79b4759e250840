"""EmoVoid: ``sign(g)`` at emoPulse, with the weights' total L1 norm held during a warm-up
(reference v3.9.1)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from emolightning.optim._multi_tensor import step_

#: steps 2 to WARMUP_LAST + 1 start by rescaling param group 0 to the remembered L1 norm
WARMUP_LAST = 55


def renormalize_(params: list[Tensor], total: Tensor, previous: Optional[Tensor], count: int) -> Tensor:
    """EmoVoid's warm-up: while ``count`` (steps taken before this one) is at most 55, multiply
    every one of ``params`` (param group 0, with or without gradients) in place by
    ``previous / (total + 1e-8)``, so their total L1 norm returns to the remembered one. Returns
    the norm to remember."""
    if previous is None or count > WARMUP_LAST:
        return total
    if previous.device != total.device:
        previous = previous.to(total.device)
    ratio = (previous / (total + 1e-8)).item()
    for p in params:
        p.mul_(ratio)
    return total * ratio


def void_update(params: list[Tensor], grads: list[Tensor], lr: Any, drive: Any) -> None:
    """``p -= lr * drive * sign(g)``, one tensor at a time (the gradients are left as they are;
    the reference overwrote them with their sign)."""
    for p, g in zip(params, grads):
        step_(p, torch.sign(g), lr, drive)


def void_update_foreach(params: list[Tensor], grads: list[Tensor], lr: float, drive: float) -> None:
    torch._foreach_add_(params, torch._foreach_sign(grads), alpha=-lr * drive)
