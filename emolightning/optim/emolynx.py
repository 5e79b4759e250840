"""EmoLynx: Lion-type sign update driven by the emotion of the loss (reference v3.6.1)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import step_


def lynx_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], lr: Any,
                drive: Any, beta1: float, beta2: float, weight_decay: float) -> None:
    """One tensor at a time; ``lr`` and ``drive`` may be 0-d tensors (compiled path)."""
    for p, g, m in zip(params, grads, exp_avgs):
        p.mul_(1 - lr * weight_decay)
        step_(p, torch.sign(g * (1 - beta1) + m * beta1), lr, drive)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def lynx_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        lr: float, drive: float, beta1: float, beta2: float,
                        weight_decay: float) -> None:
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    direction = torch._foreach_mul(grads, 1 - beta1)
    torch._foreach_add_(direction, exp_avgs, alpha=beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=-lr * drive)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


LYNX = UpdateRule("lynx", lynx_update, state_keys=("exp_avg",), foreach=lynx_update_foreach, native="lynx_step_")


class EmoLynx(EmoOptimizer):
    """EmoLynx (v3.6.1): the Lion update, scaled by emoDrive, with optional shadow.

    ``p -= lr * emoDrive * sign((1 - b1) g + b1 m)``, then ``m = b2 m + (1 - b2) g``; weight
    decay multiplies ``p`` by ``1 - lr * weight_decay`` first. One state tensor per parameter.
    See :class:`~emolightning.optim.EmoNavi` for the emotion mechanism and the shared arguments.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (the author recommends 8e-5 for LoRA).
        betas: interpolation and momentum decay, as in Lion.
        eps: unused by the update; kept for signature compatibility with the reference.
        weight_decay: decoupled weight decay.
        use_shadow, sync_loss, foreach, fused, state_dtype, writer: as for EmoNavi.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoLynx(model.parameters(), lr=8e-5)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.995),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        use_shadow: bool = False,
        sync_loss: bool = True,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_dtype: Union[None, str, torch.dtype] = None,
        writer: Any = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, use_shadow=use_shadow, sync_loss=sync_loss,
                         foreach=foreach, fused=fused, state_dtype=state_dtype, writer=writer)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype_for(p),
                                            memory_format=torch.preserve_format)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return LYNX

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (*group["betas"], group["weight_decay"])
