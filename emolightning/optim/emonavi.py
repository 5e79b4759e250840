"""EmoNavi: Adam-type update driven by the emotion of the loss (reference v3.6.1)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import decay_, floored_eps, step_


def navi_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], lr: Any, drive: Any, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """One tensor at a time. ``lr`` and ``drive`` may be floats or 0-d tensors (compiled path)."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        if weight_decay != 0:
            decay_(p, lr, weight_decay)
        step_(p, m, lr, drive, denom)


def navi_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], lr: float, drive: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float) -> None:
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * drive)


NAVI = UpdateRule("navi", navi_update, state_keys=("exp_avg", "exp_avg_sq"), foreach=navi_update_foreach,
                  native="navi_step_")


class EmoNavi(EmoOptimizer):
    """EmoNavi (v3.6.1): Adam without bias correction, with emoDrive, brake and shadow.

    Every step reads the training loss. Short, medium and long running averages of it give the
    emotion scalar ``s`` (positive while the loss falls). The step is boosted 4-6x while
    ``0.25 < |s| < 0.5``, braked to ``1 - |s|`` beyond 0.75, and with ``use_shadow`` the weights
    are blended toward a slow shadow copy when ``|s| > 0.625``. ``should_stop`` turns True when
    the scalar has stayed quiet for 32 steps.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (the author recommends 6e-5 for LoRA).
        betas: decay of the first and second moments.
        eps: added to the root of the second moment.
        weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p`` (not boosted).
        use_shadow: keep a shadow copy of each parameter and blend toward it on big swings.
        sync_loss: average the loss across ``torch.distributed`` processes before use, so all
            ranks take identical steps.
        foreach: multi-tensor ``torch._foreach_*`` update (default: on for CUDA, where it is
            fused; on the CPU the per-tensor update is faster).
        fused: the fastest path. On the CPU (float32/float64) one C++ multi-tensor kernel call
            per step, built in seconds on first use; elsewhere a ``torch.compile``-d
            multi-tensor update. Each falls back to the next (kernels, compiled, eager) with a
            warning if it cannot be built.
        state_dtype: dtype of the optimizer state (default: the parameter's); ``torch.float32``
            keeps fp32 moments for fp16/bf16 parameters.
        writer: optional TensorBoard ``SummaryWriter``, as in the reference.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoNavi(model.parameters(), lr=1e-3)
        >>> loss = model(torch.ones(2, 4)).pow(2).mean()
        >>> loss.backward()
        >>> optimizer.step(loss=loss)
        tensor(...)
    """

    _history_source = "early"

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
        dtype = self._state_dtype_for(p)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return NAVI

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        beta1, beta2 = group["betas"]
        return beta1, beta2, floored_eps(group["eps"], bucket[1]), group["weight_decay"]
