"""EmoAiry: sign update with factored (row/column) statistics at emoPulse (reference v3.9.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from emolightning.optim._multi_tensor import step_


def airy_update(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], cols: list[Tensor],
                params_1d: list[Tensor], grads_1d: list[Tensor], exp_avg_sqs: list[Tensor],
                lr: Any, drive: Any, beta2: float, weight_decay: float) -> None:
    """One tensor at a time; ``lr`` and ``drive`` may be 0-d tensors.

    Matrices (``dim >= 2``) keep β2-averages of the mean square of each row and each column,
    vectors and scalars a β2-average of ``g²``. The reference steps with
    ``sign(g / (sqrt(row * col) + eps))``: the divisor is positive, so that is ``sign(g)``, and
    the statistics never reach the step (they are kept so that states stay interchangeable).
    Weight decay ``p *= 1 - weight_decay * lr`` comes first, every step.
    """
    for p, g, r, c in zip(params, grads, rows, cols):
        squares = g * g
        r.mul_(beta2).add_(squares.mean(dim=tuple(range(1, g.dim())), keepdim=True), alpha=1 - beta2)
        c.mul_(beta2).add_(squares.mean(dim=0, keepdim=True), alpha=1 - beta2)
        p.mul_(1 - weight_decay * lr)
        step_(p, torch.sign(g), lr, drive)
    for p, g, v in zip(params_1d, grads_1d, exp_avg_sqs):
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.mul_(1 - weight_decay * lr)
        step_(p, torch.sign(g), lr, drive)


def airy_update_foreach(params: list[Tensor], grads: list[Tensor], rows: list[Tensor],
                        cols: list[Tensor], params_1d: list[Tensor], grads_1d: list[Tensor],
                        exp_avg_sqs: list[Tensor], lr: float, drive: float, beta2: float,
                        weight_decay: float) -> None:
    if params:
        squares = torch._foreach_mul(grads, grads)
        for stats, means in ((rows, [s.mean(dim=tuple(range(1, s.dim())), keepdim=True) for s in squares]),
                             (cols, [s.mean(dim=0, keepdim=True) for s in squares])):
            torch._foreach_mul_(stats, beta2)
            torch._foreach_add_(stats, means, alpha=1 - beta2)
    if params_1d:
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads_1d, grads_1d, value=1 - beta2)
    every_param, every_grad = params + params_1d, grads + grads_1d
    torch._foreach_mul_(every_param, 1 - weight_decay * lr)
    torch._foreach_add_(every_param, torch._foreach_sign(every_grad), alpha=-lr * drive)
