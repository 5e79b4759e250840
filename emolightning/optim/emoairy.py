"""EmoAiry: sign update with factored (row/column) statistics at emoPulse (reference v3.9.1)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import step_
from emolightning.optim._pulse_base import EmoPulseOptimizer
from emolightning.optim.emofact import SHARED_LOOP_NUMEL, _with_shared_ones, init_factored_state


def _matrix_update(p: Tensor, g: Tensor, r: Tensor, c: Tensor, lr: Any, drive: Any, beta2: float,
                   weight_decay: float, one: Optional[Tensor] = None) -> None:
    """One matrix (``dim >= 2``); ``one``, if given, is a tensor of ones that multiplies ``g * g``
    and the step (see :func:`airy_update_fused`)."""
    squares = g * g if one is None else g * g * one
    r.mul_(beta2).add_(squares.mean(dim=tuple(range(1, g.dim())), keepdim=True), alpha=1 - beta2)
    c.mul_(beta2).add_(squares.mean(dim=0, keepdim=True), alpha=1 - beta2)
    p.mul_(1 - weight_decay * lr)
    step_(p, torch.sign(g) if one is None else torch.sign(g) * one, lr, drive)


def _vector_update(p: Tensor, g: Tensor, v: Tensor, lr: Any, drive: Any, beta2: float,
                   weight_decay: float) -> None:
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.mul_(1 - weight_decay * lr)
    step_(p, torch.sign(g), lr, drive)


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
        _matrix_update(p, g, r, c, lr, drive, beta2, weight_decay)
    for p, g, v in zip(params_1d, grads_1d, exp_avg_sqs):
        _vector_update(p, g, v, lr, drive, beta2, weight_decay)


def airy_update_fused(params: list[Tensor], grads: list[Tensor], rows: list[Tensor],
                      cols: list[Tensor], ones: list[Tensor], params_1d: list[Tensor],
                      grads_1d: list[Tensor], exp_avg_sqs: list[Tensor], lr: Any, drive: Any,
                      beta2: float, weight_decay: float) -> None:
    """:func:`airy_update` arranged for ``torch.compile`` as EmoFact's compiled update is (see
    :func:`~emolightning.optim.emofact.fact_update_fused`): matrices visited grouped by shape,
    the small ones multiplied by a shared tensor of ones so that Inductor fuses their loops."""
    one_for = {tuple(one.shape[1:]): one for one in ones}
    for i in sorted(range(len(params)), key=lambda i: tuple(params[i].shape)):
        p = params[i]
        one = one_for[tuple(p.shape[1:])] if p.numel() <= SHARED_LOOP_NUMEL else None
        _matrix_update(p, grads[i], rows[i], cols[i], lr, drive, beta2, weight_decay, one=one)
    for p, g, v in zip(params_1d, grads_1d, exp_avg_sqs):
        _vector_update(p, g, v, lr, drive, beta2, weight_decay)


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


AIRY = UpdateRule("airy", airy_update, state_keys=("exp_avg_r", "exp_avg_c"), vector_keys=("exp_avg_sq",),
                  foreach=airy_update_foreach, compiled=airy_update_fused, native="airy_step_",
                  compiled_inputs=_with_shared_ones)


class EmoAiry(EmoPulseOptimizer):
    """EmoAiry (v3.9.1): a sign step at emoPulse, with Adafactor-style factored state.

    The successor of EmoFact. The step is ``p *= 1 - weight_decay * emoPulse`` then
    ``p -= emoPulse * sign(g)``: signSGD with decoupled weight decay. As in the reference, it
    keeps β2-averages of the mean square of each matrix row and column (and of ``g²`` for
    vectors) that never change the direction, so its state is one row and one column vector
    per matrix. See :class:`~emolightning.optim.EmoSens` for emoPulse and the shared arguments.

    Args:
        params: parameters or param groups to optimize.
        lr: emoScope (1.0 for LoRA).
        eps: unused by the step (the reference adds it to a divisor that cannot change a sign).
        betas: ``betas[1]`` decays the factored statistics; ``betas[0]`` is unused.
        weight_decay: decoupled weight decay, applied every step.
        stopcoef, use_shadow, notify, sync_loss, foreach, fused, state_dtype: as for EmoSens.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoAiry(model.parameters())
    """

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        init_factored_state(p, state, self._state_dtype_for(p))

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return AIRY

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (group["betas"][1], group["weight_decay"])
