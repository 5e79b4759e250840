"""EmoSens: Adam-type update at emoPulse, the step size read from the loss (reference v3.9.1)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from emolightning.optim._multi_tensor import step_
from emolightning.optim.emonavi import navi_update_foreach


def sens_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], lr: Any, drive: Any, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """Adam without bias correction, then ``p *= 1 - weight_decay * lr`` and the step, one tensor
    at a time in the reference's order. ``lr`` (emoPulse) and ``drive`` (1 for this family) may
    be floats or 0-d tensors (compiled path)."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        if weight_decay != 0:
            p.mul_(1 - weight_decay * lr)
        step_(p, m, lr, drive, denom)


#: the multi-tensor form: EmoNavi's foreach update decays multiplicatively too, so it is EmoSens's
sens_update_foreach = navi_update_foreach
