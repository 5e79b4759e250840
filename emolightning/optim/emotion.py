"""EmoTion: sign of a freshness-weighted gradient average at emoPulse ("Approx W-Ref Geometry",
reference v3.9.1)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from emolightning.optim import _native
from emolightning.optim._dispatch import NATIVE_DTYPES as _NATIVE_DTYPES
from emolightning.optim._dispatch import Bucket, UpdateRule
from emolightning.optim._multi_tensor import step_
from emolightning.optim._pulse_base import EmoPulseOptimizer


# Elements summed by one thread in :func:`l1_norm`: torch splits one long sum between its
# threads, so its last bits would depend on the thread count (and ranks of a distributed run
# could disagree); a sum over rows of this length is split by rows only.
L1_CHUNK = 1 << 14
# torch reduces a CPU tensor of at most this many elements on one thread (its grain size)
SERIAL_NUMEL = 1 << 15


def l1_norm(p: Tensor) -> Tensor:
    """``‖p‖₁`` as a 0-d tensor of ``p``'s dtype, with the same bits whatever torch's thread
    count (the reference's ``torch._foreach_norm(params, 1)`` differs in the last bits between
    thread counts for CPU tensors of more than 32768 elements)."""
    flat = p.detach().reshape(-1).abs()
    rows = flat.numel() // L1_CHUNK
    if rows <= 1:
        return flat.sum()
    split = rows * L1_CHUNK
    return flat[:split].view(rows, L1_CHUNK).sum(dim=1).sum() + flat[split:].sum()


def total_l1_norm(params: list[Tensor], native: bool = False) -> Tensor:
    """``Σ ‖p‖₁`` over ``params`` as a 0-d tensor (the reference sums per-tensor norms, mixed
    dtypes promoted), with the same bits whatever torch's thread count. With ``native`` (the
    fused path), CPU float32/float64 tensors are summed in one C++ call (in double within each
    tensor); otherwise small and non-CPU tensors take one ``torch._foreach_norm`` call, large
    CPU tensors :func:`l1_norm`."""
    if native and all(p.device.type == "cpu" and p.dtype in _NATIVE_DTYPES and p.is_contiguous() for p in params):
        ops = _native.native_kernels()
        if ops is not None:
            return ops.l1_total(params)
    norms: list[Optional[Tensor]] = [None] * len(params)
    batched = [i for i, p in enumerate(params) if p.device.type != "cpu" or p.numel() <= SERIAL_NUMEL]
    if batched:
        for i, norm in zip(batched, torch._foreach_norm([params[i].detach() for i in batched], 1)):
            norms[i] = norm
    norms = [norm if norm is not None else l1_norm(p) for p, norm in zip(params, norms)]
    if len({(n.dtype, n.device) for n in norms}) == 1:
        return torch.stack(norms).sum()
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


TION = UpdateRule("tion", tion_update, state_keys=("exp_avg",), foreach=tion_update_foreach, native="tion_step_")


class EmoTion(EmoPulseOptimizer):
    """EmoTion (v3.9.1, "Approx W-Ref Geometry"): the sign of a gradient average whose weight
    follows how fast the weights move, at emoPulse.

    Each step first measures the total L1 norm of param group 0's weights and its relative
    change ``r`` since the last step; the "freshness" ``max(tanh(r / 0.03), 1 - betas[0])``
    sets the weight of the new gradient in ``m = (1 - a) m + a g``, ``a = (1 - β1) *
    freshness``. The step is ``p -= emoPulse * sign(m)``. No weight decay (the reference
    accepts ``weight_decay`` and ignores it). One state tensor per parameter. See
    :class:`~emolightning.optim.EmoSens` for emoPulse and the shared arguments.

    As in the reference, the norm remembered for the next step is ``N * r`` rather than ``N``;
    when the weights change slowly the freshness therefore follows a period-3 pattern (1, the
    floor, 1, 1, the floor, ...). Only param group 0 is measured.

    Args:
        params: parameters or param groups to optimize.
        lr: emoScope (1.0 for LoRA).
        eps: unused.
        betas: ``betas[0]`` weighs the gradient average (per group) and, from the constructor,
            sets the freshness floor ``1 - betas[0]``; ``betas[1]`` is unused.
        weight_decay: accepted and ignored, as in the reference.
        stopcoef, use_shadow, notify, sync_loss, foreach, fused, state_dtype: as for EmoSens.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoTion(model.parameters())
    """

    def __init__(self, params: Iterable, lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
        self._freshness_floor = 1 - self.defaults["betas"][0]
        self._reset_geometry()

    def _reset_geometry(self) -> None:
        self.prev_gl1: Optional[Tensor] = None
        self.g_freshness = 1.0

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype_for(p), memory_format=torch.preserve_format)

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return TION

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (group["betas"][0],)

    def _drive(self, group: dict[str, Any]) -> float:
        return self.g_freshness  # the rule's second per-step scalar

    def _before_updates(self) -> None:
        super()._before_updates()
        total = total_l1_norm(self.param_groups[0]["params"], native=self.fused)
        self.g_freshness, self.prev_gl1 = gradient_freshness(total, self.prev_gl1, self._freshness_floor)

    def reset_emotion(self, *, moments: bool = False) -> None:
        """See :meth:`EmoOptimizer.reset_emotion`; ``moments`` also forgets the remembered norm."""
        super().reset_emotion(moments=moments)
        if moments:
            self._reset_geometry()

    def _snapshot_extras(self) -> dict[str, float]:
        return {**super()._snapshot_extras(), "g_freshness": self.g_freshness}

    def _geometry_state(self) -> dict[str, Any]:
        return {"prev_gl1": self.prev_gl1, "g_freshness": self.g_freshness}

    def _load_geometry_state(self, internal: dict[str, Any]) -> None:
        previous = internal.get("prev_gl1")
        self.prev_gl1 = None if previous is None else torch.as_tensor(previous).clone()
        self.g_freshness = float(internal.get("g_freshness", 1.0))
