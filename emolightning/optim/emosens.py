"""EmoSens: Adam-type update at emoPulse, the step size read from the loss (reference v3.9.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import floored_eps, step_
from emolightning.optim._pulse_base import EmoPulseOptimizer
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


SENS = UpdateRule("sens", sens_update, state_keys=("exp_avg", "exp_avg_sq"), foreach=sens_update_foreach,
                  native="sens_step_")


class EmoSens(EmoPulseOptimizer):
    """EmoSens (v3.9.1): Adam without bias correction, at a step size read from the loss.

    The successor of EmoNavi. Every step reads the training loss; its running averages give
    the emotion scalar and the step size **emoPulse** (see :mod:`emolightning.optim._pulse`),
    which replaces the learning rate: ``lr`` is **emoScope**, a multiplier of emoPulse.
    emoPulse starts at ``emoScope * 1e-4``, grows (at most x1.5 per step) while the loss falls
    steadily, is reset on sharp swings, and stays within ``[1e-8, emoScope * 3e-3]``. After
    every step each param group's ``lr`` shows the emoPulse used; LR schedulers and per-group
    LRs have no effect (a warning says so). With ``use_shadow`` the weights are blended toward
    a slow shadow copy when ``|s| > 0.625``. ``should_stop`` turns True when the run has gone
    quiet and the medium loss average is at most ``stopcoef``.

    Args:
        params: parameters or param groups to optimize.
        lr: emoScope (the author: 1.0 for LoRA, 0.1 for full UNet fine-tuning, 0.01 for full
            Transformer fine-tuning).
        eps: added to the root of the second moment.
        betas: decay of the first and second moments.
        weight_decay: decoupled, ``p *= 1 - weight_decay * emoPulse`` (skipped when 0).
        stopcoef: the medium loss average at or below which ``should_stop`` may turn on (an
            absolute loss level: tune it to your loss's scale).
        use_shadow: keep a shadow copy of each parameter and blend toward it on big swings.
        notify: log (on rank 0) when ``should_stop`` turns on.
        sync_loss: average the loss across ``torch.distributed`` processes before use, so all
            ranks take identical steps.
        foreach: multi-tensor ``torch._foreach_*`` update (default: on for CUDA).
        fused: the fastest path: one C++ kernel call per step on the CPU (float32/float64),
            a ``torch.compile``-d update elsewhere; each falls back with a warning.
        state_dtype: dtype of the optimizer state (default: the parameter's); ``torch.float32``
            keeps fp32 moments for fp16/bf16 parameters.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoSens(model.parameters())  # lr is emoScope, 1.0 for LoRA
        >>> loss = model(torch.ones(2, 4)).pow(2).mean()
        >>> loss.backward()
        >>> optimizer.step(loss=loss)
        tensor(...)
        >>> optimizer.param_groups[0]["lr"]  # the emoPulse just used
        0.0001
    """

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        dtype = self._state_dtype_for(p)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return SENS

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (*group["betas"], floored_eps(group["eps"], bucket[1]), group["weight_decay"])
