"""EmoFact: sign update with factored (row/column) statistics (reference v3.6.1)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._dispatch import Bucket, Columns, Dispatcher, UpdateRule
from emolightning.optim._multi_tensor import decay_, floored_eps, step_


# Matrices of up to this many elements share loops on the fused path (fact_update_fused): 16
# of them (Inductor's horizontal-fusion limit) take 4 MiB in float32, so a group stays in cache
# between its row, column and step passes. Larger matrices are memory-bound; each keeps its own
# loops, which reread it from cache (grouping 8 matrices of 2048x2048 made the step 20-40 %
# slower).
SHARED_LOOP_NUMEL = 1 << 16


def _matrix_update(p: Tensor, g: Tensor, r: Tensor, c: Tensor, lr: Any, drive: Any, beta1: float,
                   eps: float, weight_decay: float, one: Optional[Tensor] = None) -> None:
    """One matrix (``dim >= 2``); ``one``, if given, is a tensor of ones that multiplies ``g * g``
    and the step (see :func:`fact_update_fused`)."""
    g2 = g * g if one is None else g * g * one
    r_sq = g2.mean(dim=tuple(range(1, g.dim())), keepdim=True) + eps
    c_sq = g2.mean(dim=0, keepdim=True) + eps
    r.mul_(beta1).add_(r_sq.sqrt(), alpha=1 - beta1)
    c.mul_(beta1).add_(c_sq.sqrt(), alpha=1 - beta1)
    decay_(p, lr, weight_decay)
    step_(p, torch.sign(g) if one is None else torch.sign(g) * one, lr, drive)


def _vector_update(p: Tensor, g: Tensor, v: Tensor, lr: Any, drive: Any, beta1: float,
                   beta2: float, weight_decay: float) -> None:
    # beta1 decay with a (1 - beta2) increment, as in the reference; it never reaches the update.
    v.mul_(beta1).addcmul_(g, g, value=1 - beta2)
    decay_(p, lr, weight_decay)
    step_(p, torch.sign(g), lr, drive)


def fact_update(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], cols: list[Tensor],
                params_1d: list[Tensor], grads_1d: list[Tensor],
                exp_avg_sqs: list[Tensor], lr: Any, drive: Any, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """One tensor at a time; ``lr`` and ``drive`` may be 0-d tensors.

    The reference steps with ``sign(g / denom)``. ``denom`` is positive (``eps`` is kept
    representable), so that is ``sign(g)``; the factored statistics are still kept, as the
    reference keeps them, so states stay interchangeable.
    """
    for p, g, r, c in zip(params, grads, rows, cols):
        _matrix_update(p, g, r, c, lr, drive, beta1, eps, weight_decay)
    for p, g, v in zip(params_1d, grads_1d, exp_avg_sqs):
        _vector_update(p, g, v, lr, drive, beta1, beta2, weight_decay)


def fact_update_fused(params: list[Tensor], grads: list[Tensor], rows: list[Tensor],
                      cols: list[Tensor], ones: list[Tensor], params_1d: list[Tensor],
                      grads_1d: list[Tensor], exp_avg_sqs: list[Tensor], lr: Any, drive: Any,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`fact_update` in the form the compiled (``fused=True``) path runs.

    The same values, arranged for Inductor. Left to itself, Inductor compiles each matrix into
    its own loops (row mean, row update, column mean and update, step: about four parallel
    loops per matrix, each ending in a thread barrier); on many small LoRA matrices those
    loops cost more than the arithmetic. Here the matrices are visited grouped by shape, and
    ``g * g`` and the sign step are multiplied by a tensor of ones shaped like one row of the
    matrix, ``(1, *shape[1:])``: ``ones`` holds one per distinct row shape of the matrices with
    at most :data:`SHARED_LOOP_NUMEL` elements (larger ones are left alone). Multiplying by one
    changes no value, but same-shaped matrices then read a common input, which is what
    Inductor looks for before it computes several reductions or steps in one loop: up to 16
    same-shaped matrices share one loop for their row sums, one for their column sums and
    updates, and one for their steps; only the small row-statistic updates stay per matrix.
    On 256 LoRA matrices that is 320 parallel loops instead of 1,024 (see
    docs/results.md).
    """
    one_for = {tuple(one.shape[1:]): one for one in ones}
    for i in sorted(range(len(params)), key=lambda i: tuple(params[i].shape)):
        p = params[i]
        one = one_for[tuple(p.shape[1:])] if p.numel() <= SHARED_LOOP_NUMEL else None
        _matrix_update(p, grads[i], rows[i], cols[i], lr, drive, beta1, eps, weight_decay, one=one)
    for p, g, v in zip(params_1d, grads_1d, exp_avg_sqs):
        _vector_update(p, g, v, lr, drive, beta1, beta2, weight_decay)


def fact_update_foreach(params: list[Tensor], grads: list[Tensor], rows: list[Tensor],
                        cols: list[Tensor], params_1d: list[Tensor],
                        grads_1d: list[Tensor], exp_avg_sqs: list[Tensor], lr: float,
                        drive: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float) -> None:
    if params:
        squares = torch._foreach_mul(grads, grads)
        r_sq = [s.mean(dim=tuple(range(1, s.dim())), keepdim=True) for s in squares]
        c_sq = [s.mean(dim=0, keepdim=True) for s in squares]
        for stats, sq in ((rows, r_sq), (cols, c_sq)):
            torch._foreach_add_(sq, eps)
            torch._foreach_sqrt_(sq)
            torch._foreach_mul_(stats, beta1)
            torch._foreach_add_(stats, sq, alpha=1 - beta1)
    if params_1d:
        torch._foreach_mul_(exp_avg_sqs, beta1)
        torch._foreach_addcmul_(exp_avg_sqs, grads_1d, grads_1d, value=1 - beta2)
    every_param, every_grad = params + params_1d, grads + grads_1d
    # p + (-lr * wd) * p, the reference's rounding: sign steps amplify any difference.
    torch._foreach_add_(every_param, torch._foreach_mul(every_param, -lr * weight_decay))
    signs = torch._foreach_sign(every_grad)
    torch._foreach_add_(every_param, signs, alpha=-lr * drive)


def init_factored_state(p: Tensor, state: dict[str, Any], dtype: torch.dtype) -> None:
    """A factored rule's state: a row (``exp_avg_r``, shape ``(d0, 1, ...)``) and a column
    (``exp_avg_c``, ``(1, d1, ...)``) statistic for a matrix or conv kernel, ``exp_avg_sq``
    shaped like ``p`` for vectors and scalars (EmoFact and EmoAiry)."""
    if p.dim() >= 2:
        state["exp_avg_r"] = torch.zeros((p.shape[0],) + (1,) * (p.dim() - 1), dtype=dtype, device=p.device)
        state["exp_avg_c"] = torch.zeros((1,) + tuple(p.shape[1:]), dtype=dtype, device=p.device)
    else:
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _with_shared_ones(dispatcher: Dispatcher, key: tuple, columns: Columns) -> Columns:
    """The columns of :func:`fact_update_fused`: :func:`fact_update`'s, with one ``(1, *shape[1:])``
    tensor of ones per distinct row shape among the matrices of at most ``SHARED_LOOP_NUMEL``
    elements inserted after the column statistics. Kept with the bucket's plan; not state."""
    matrices = columns[0]
    index, bucket, _ = key
    cache_key = (index, bucket, "ones")
    ones = dispatcher.plan_cache.get(cache_key)
    if ones and ones[0].device != matrices[0].device:  # parameters moved after the plan was made
        ones = None
    if ones is None:
        rows = {tuple(m.shape[1:]): m for m in matrices if m.numel() <= SHARED_LOOP_NUMEL}
        ones = dispatcher.plan_cache[cache_key] = [torch.ones((1, *row), dtype=m.dtype, device=m.device)
                                                   for row, m in rows.items()]
    return [*columns[:4], ones, *columns[4:]]


FACT = UpdateRule("fact", fact_update, state_keys=("exp_avg_r", "exp_avg_c"), vector_keys=("exp_avg_sq",),
                  foreach=fact_update_foreach, compiled=fact_update_fused, native="fact_step_",
                  compiled_inputs=_with_shared_ones)


class EmoFact(EmoOptimizer):
    """EmoFact (v3.6.1): a sign step scaled by emoDrive, with Adafactor-style factored state.

    The update is ``p -= lr * emoDrive * sign(g)`` plus decoupled weight decay: as in the
    reference, the row/column statistics it keeps never change the direction. Its state is a
    row and a column vector per matrix (or conv kernel), so it is the lightest of the family.
    See :class:`~emolightning.optim.EmoNavi` for the emotion mechanism and the shared arguments.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (the author recommends 1e-4 for LoRA).
        betas: ``betas[0]`` decays the factored statistics.
        eps: added inside and outside the statistics' square roots.
        weight_decay: decoupled weight decay (applied every step, not boosted).
        use_shadow, sync_loss, foreach, fused, state_dtype, writer: as for EmoNavi.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = EmoFact(model.parameters(), lr=1e-4)
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
        init_factored_state(p, state, self._state_dtype_for(p))

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        return FACT

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        return (*group["betas"], floored_eps(group["eps"], bucket[1]), group["weight_decay"])
