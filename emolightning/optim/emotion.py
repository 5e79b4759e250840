"""EmoTion: sign of a freshness-weighted gradient average at emoPulse ("Approx W-Ref Geometry",
reference v3.9.1)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from emolightning.optim._multi_tensor import step_


def total_l1_norm(params: list[Tensor]) -> Tensor:
    """``Σ ‖p‖₁`` over ``params`` as a 0-d tensor: per-tensor norms summed in parameter order
    (as the reference sums ``torch._foreach_norm(params, 1)``), mixed dtypes promoted."""
    norms = torch._foreach_norm([p.detach() for p in params], 1)
    total = norms[0]
    for norm in norms[1:]:
        total = total + norm.to(total.device)
    return total


def gradient_freshness(total: Tensor, previous: Optional[Tensor], floor: float) -> tuple[float, Tensor]:
    """EmoTion's freshness of the step and the norm to remember, from group 0's total L1 norm now
    (``total``) and the remembered one.

    The relative change ``r = |N - P| / (P + 1e-8)`` gives ``max(tanh(r / 0.03), floor)``. As in
    the reference, the value remembered is ``N * r`` (not ``N``): when the weights change
    slowly the remembered value alternates between tiny, huge and about ``N``, so the freshness
    follows a period-3 pattern (1, floor, 1, ...).
    """
    if previous is None:
        return 1.0, total
    if previous.device != total.device:
        previous = previous.to(total.device)
    ratio = (torch.abs(total - previous) / (previous + 1e-8)).item()
    return max(math.tanh(ratio / 0.03), floor), total * ratio


def tion_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], lr: Any,
                freshness: Any, beta1: float) -> None:
    """One tensor at a time: ``m = (1 - a) m + a g`` with ``a = (1 - beta1) * freshness``, then
    ``p -= lr * sign(m)``; no weight decay.

    The dispatcher's second per-step scalar (``drive`` for the other optimizers) carries the
    step's gradient freshness here. ``lr`` and ``freshness`` may be floats or 0-d tensors.
    """
    alpha = (1 - beta1) * freshness
    for p, g, m in zip(params, grads, exp_avgs):
        if isinstance(alpha, Tensor):
            m.mul_(1 - alpha).add_(g * alpha)
        else:
            m.mul_(1 - alpha).add_(g, alpha=alpha)
        step_(p, torch.sign(m), lr, 1.0)


def tion_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        lr: float, freshness: float, beta1: float) -> None:
    alpha = (1 - beta1) * freshness
    torch._foreach_mul_(exp_avgs, 1 - alpha)
    torch._foreach_add_(exp_avgs, grads, alpha=alpha)
    torch._foreach_add_(params, torch._foreach_sign(exp_avgs), alpha=-lr)
