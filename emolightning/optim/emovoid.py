"""EmoVoid: ``sign(g)`` at emoPulse, with the weights' total L1 norm held during a warm-up
(reference v3.9.1)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import step_
from emolightning.optim._pulse_base import EmoPulseOptimizer
from emolightning.optim.emotion import total_l1_norm

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
    torch._foreach_mul_(params, ratio)
    return total * ratio


def void_update(params: list[Tensor], grads: list[Tensor], lr: Any, drive: Any) -> None:
    """``p -= lr * drive * sign(g)``, one tensor at a time (the gradients are left as they are;
    the reference overwrote them with their sign)."""
    for p, g in zip(params, grads):
        step_(p, torch.sign(g), lr, drive)


def void_update_foreach(params: list[Tensor], grads: list[Tensor], lr: float, drive: float) -> None:
    torch._foreach_add_(params, torch._foreach_sign(grads), alpha=-lr * drive)


VOID = UpdateRule("void", void_update, foreach=void_update_foreach, native="void_step_")


class EmoVoid(EmoPulseOptimizer):
    """EmoVoid (v3.9.1): ``sign(g)`` at emoPulse, holding the weights' total L1 norm during a
    warm-up. No state (besides an optional shadow).

    Steps 2 to 56 each begin by rescaling every parameter of param group 0 (those without a
    gradient too) so that the group's total L1 norm returns to the one remembered at the
    previous step; after that the norm is left free. Each time ``should_stop`` turns on, one
    more rescaling happens at the next step (and a warm-up still running ends). The step is
    ``p -= emoPulse * sign(g)``; no weight decay, no moments. See
    :class:`~emolightning.optim.EmoSens` for emoPulse and the shared arguments.

    Unlike the reference, the gradients are left as they are (it overwrote ``p.grad`` with its
    sign).

    Args:
        params: parameters or param groups to optimize.
        lr: emoScope (1.0 for LoRA).
        eps, betas, weight_decay: accepted and unused, as in the reference.
        stopcoef, use_shadow, notify, sync_loss, foreach, fused, state_dtype: as for EmoSens.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoVoid(model.parameters())
    """

    def __init__(self, params: Iterable, lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
        self._reset_geometry()

    def _reset_geometry(self) -> None:
        self.prev_gl1: Optional[Tensor] = None
        # the reference's _step_count (the name LR schedulers of torch <= 2.1 also set on an
        # optimizer): steps taken, lowered to 55 when should_stop turns on
        self.warmup_count = 0

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """EmoVoid keeps no per-parameter state."""

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return VOID

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return ()

    def _before_updates(self) -> None:
        super()._before_updates()
        count, self.warmup_count = self.warmup_count, self.warmup_count + 1
        params = self.param_groups[0]["params"]
        self.prev_gl1 = renormalize_(params, total_l1_norm(params, native=self.fused), self.prev_gl1, count)

    def _stop_rose(self) -> None:
        super()._stop_rose()
        self.warmup_count = WARMUP_LAST

    def reset_emotion(self, *, moments: bool = False) -> None:
        """See :meth:`EmoOptimizer.reset_emotion`; ``moments`` also restarts the warm-up."""
        super().reset_emotion(moments=moments)
        if moments:
            self._reset_geometry()

    def _geometry_state(self) -> dict[str, Any]:
        return {"prev_gl1": self.prev_gl1, "_step_count": self.warmup_count}

    def _load_geometry_state(self, internal: dict[str, Any]) -> None:
        previous = internal.get("prev_gl1")
        self.prev_gl1 = None if previous is None else torch.as_tensor(previous).clone()
        self.warmup_count = int(internal.get("_step_count", 0))
