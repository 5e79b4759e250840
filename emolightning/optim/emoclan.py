"""EmoClan: one global emotion picks a Navi, Fact or Lynx update each step (reference v3.0)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from emolightning.optim._base import EmoOptimizer, _validate
from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._emotion import Emotion, LegacyEmotion, legacy_scalar, legacy_shadow_ratio, update_legacy_ema
from emolightning.optim._multi_tensor import step_
from emolightning.optim.emolynx import LYNX

_FP32 = torch.float32


def clan_navi_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], lr: Any, scale: Any, beta1: float, beta2: float,
                     eps: float, weight_decay: float) -> None:
    """Adam without bias correction; the second moment is float32 whatever the parameter."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g32 = g.to(_FP32)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        step_(p, m, lr, scale, denom)


def clan_fact_update(params: list[Tensor], grads: list[Tensor], rows: list[Tensor],
                     cols: list[Tensor], params_1d: list[Tensor], grads_1d: list[Tensor],
                     exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], lr: Any, scale: Any,
                     beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """v3.0 EmoFact: ``g / sqrt(row_rms * col_rms)`` for matrices, Adam for vectors."""
    for p, g, r, c in zip(params, grads, rows, cols):
        g2 = g.to(_FP32) ** 2
        r.mul_(beta1).add_((g2.mean(dim=tuple(range(1, g.dim())), keepdim=True) + eps).sqrt(), alpha=1 - beta1)
        c.mul_(beta1).add_((g2.mean(dim=0, keepdim=True) + eps).sqrt(), alpha=1 - beta1)
        p.mul_(1 - weight_decay * lr)
        step_(p, g, lr, scale, (r * c).sqrt().add_(eps))
    for p, g, m, v in zip(params_1d, grads_1d, exp_avgs, exp_avg_sqs):
        g32 = g.to(_FP32)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        p.mul_(1 - weight_decay * lr)
        step_(p, m, lr, scale, v.sqrt().add_(eps))


CLAN_RULES = {
    "navi": UpdateRule("navi", clan_navi_update, state_keys=("exp_avg_navi", "exp_avg_sq_navi"), native="navi_step_"),
    # v3.0's factored rule has no native kernel
    "fact": UpdateRule("fact", clan_fact_update, state_keys=("exp_avg_r_fact", "exp_avg_c_fact"),
                       vector_keys=("exp_avg_fact", "exp_avg_sq_fact")),
    "lynx": UpdateRule("lynx", LYNX.loop, state_keys=("exp_avg_lynx",), foreach=LYNX.foreach, native=LYNX.native),
}


class EmoClan(EmoOptimizer):
    """EmoClan (v3.0): a global emotion scalar chooses the update rule every step.

    The scalar is ``S = tanh(5 * (short - long))`` of the loss averages (``S > 0`` while the
    loss rises). ``|S| <= 0.3`` takes an EmoNavi (Adam) step, ``0.3 < |S| <= 0.6`` an EmoFact
    (factored) step and ``|S| > 0.6`` an EmoLynx (Lion) step, each scaled by ``1 - |S|``. Each
    rule keeps its own state, created the first time it runs; second moments are float32.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate.
        betas: moment decays of the Navi and Fact rules.
        eps: added to the roots of the second moments.
        weight_decay: decoupled weight decay.
        lynx_betas: betas of the Lynx rule.
        decoupled_weight_decay: Lynx rule only: divide ``weight_decay`` by the constructor's
            lr (lion-pytorch's convention), as in the reference. That lr stays fixed: a lower
            continuation-stage LR lowers the decay in proportion, as a schedule does in
            lion-pytorch.
        use_shadow: per-parameter shadow blended in proportion to the parameter's own scalar.
        sync_loss, foreach, fused, state_dtype, writer: as for EmoNavi (``foreach`` applies
            to the Lynx rule; the others run per tensor unless ``fused``).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoClan(model.parameters(), lr=1e-4)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        lynx_betas: tuple[float, float] = (0.9, 0.99),
        decoupled_weight_decay: bool = False,
        use_shadow: bool = False,
        sync_loss: bool = True,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_dtype: Union[None, str, torch.dtype] = None,
        writer: Any = None,
    ) -> None:
        _validate(lr, lynx_betas, eps, weight_decay, name="lynx_betas")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lynx_betas=tuple(lynx_betas), decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, use_shadow=use_shadow, sync_loss=sync_loss,
                         foreach=foreach, fused=fused, state_dtype=state_dtype, writer=writer)

    def _make_emotion(self) -> Emotion:
        return LegacyEmotion()

    def _branch(self) -> str:
        magnitude = abs(self._emotion.scalar)
        if magnitude > 0.6:
            return "lynx"
        if magnitude > 0.3:
            return "fact"
        return "navi"

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Clan creates each rule's state when that rule first runs (see ``_branch_state``)."""

    def _branch_state(self, p: Tensor, state: dict[str, Any], branch: str) -> None:
        dtype = self._state_dtype_for(p)

        def zeros(shape: Any = None, dtype: torch.dtype = dtype) -> Tensor:
            if shape is None:
                return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            return torch.zeros(shape, dtype=dtype, device=p.device)

        if branch == "lynx" and "exp_avg_lynx" not in state:
            state["exp_avg_lynx"] = zeros()
        elif branch == "navi" and "exp_avg_navi" not in state:
            state["exp_avg_navi"] = zeros()
            state["exp_avg_sq_navi"] = zeros(dtype=_FP32)
        elif branch == "fact" and p.dim() >= 2 and "exp_avg_r_fact" not in state:
            state["exp_avg_r_fact"] = zeros((p.shape[0],) + (1,) * (p.dim() - 1), _FP32)
            state["exp_avg_c_fact"] = zeros((1,) + tuple(p.shape[1:]), _FP32)
        elif branch == "fact" and p.dim() < 2 and "exp_avg_fact" not in state:
            state["exp_avg_fact"] = zeros()
            state["exp_avg_sq_fact"] = zeros(dtype=_FP32)

    def _apply_shadow(self, params: list[Tensor]) -> None:
        loss = self._emotion.loss
        if loss is None:  # no loss this step: nothing to judge the parameters by
            return
        for p in params:
            state = self.state[p]
            ema = state.setdefault("ema", {"short": loss, "long": loss})
            update_legacy_ema(ema, loss)
            ratio = legacy_shadow_ratio(legacy_scalar(ema["short"], ema["long"]))
            if ratio <= 0:
                continue
            if "shadow" not in state:
                state["shadow"] = p.detach().to(self._state_dtype_for(p), copy=True)
            else:
                p.mul_(1 - ratio).add_(state["shadow"].to(p.dtype), alpha=ratio)
            state["shadow"].lerp_(p.to(state["shadow"].dtype), 0.05)

    def _update_group(self, index: int, group: dict[str, Any], params: list[Tensor],
                      grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        branch = self._branch()
        for p, state in zip(params, states):
            self._branch_state(p, state, branch)
        super()._update_group(index, group, params, grads, states)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return CLAN_RULES[self._branch()]

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        wd = group["weight_decay"]
        if rule.name == "lynx":
            if group["decoupled_weight_decay"]:
                wd = wd / self._init_lr
            return (*group["lynx_betas"], wd)
        return (*group["betas"], group["eps"], wd)
