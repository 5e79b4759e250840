"""EmoCats: Lion-type sign update at emoPulse (reference v3.9.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._pulse_base import EmoPulseOptimizer
from emolightning.optim.emolynx import lynx_update, lynx_update_foreach

#: EmoCats's update is EmoLynx's (Lion's), operation for operation: ``p *= 1 - lr * wd``,
#: ``p -= lr * sign((1 - b1) g + b1 m)``, ``m = b2 m + (1 - b2) g``, here with emoPulse as ``lr``
#: and a drive of 1. Its native kernel is EmoLynx's too.
cats_update = lynx_update
cats_update_foreach = lynx_update_foreach

CATS = UpdateRule("cats", cats_update, state_keys=("exp_avg",), foreach=cats_update_foreach, native="lynx_step_")


class EmoCats(EmoPulseOptimizer):
    """EmoCats (v3.9.1): the Lion update at emoPulse.

    The successor of EmoLynx. ``p *= 1 - weight_decay * emoPulse``, then
    ``p -= emoPulse * sign((1 - b1) g + b1 m)`` and ``m = b2 m + (1 - b2) g``. One state tensor
    per parameter. See :class:`~emolightning.optim.EmoSens` for emoPulse and the shared
    arguments.

    Args:
        params: parameters or param groups to optimize.
        lr: emoScope (1.0 for LoRA).
        eps: unused (kept for signature compatibility with the reference).
        betas: interpolation and momentum decay, as in Lion (the reference's default β2 is
            0.995; Lion's own is 0.99).
        weight_decay: decoupled weight decay, applied every step.
        stopcoef, use_shadow, notify, sync_loss, foreach, fused, state_dtype: as for EmoSens.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoCats(model.parameters())
    """

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype_for(p), memory_format=torch.preserve_format)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return CATS

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (*group["betas"], group["weight_decay"])
