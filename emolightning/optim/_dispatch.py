"""How an optimizer's update rule is run: one rule, four forms, one dispatcher.

An optimizer declares its per-parameter update as an :class:`UpdateRule`: the per-tensor loop
(the reference's arithmetic), optionally a ``torch._foreach_*`` form, a form for
``torch.compile`` and the name of a C++ kernel (``torch.ops.emolightning.*``, see
:mod:`emolightning.optim._native`), and which state tensors it takes. The :class:`Dispatcher`
splits a param group into buckets of one device and dtype and runs the rule on each bucket:

* ``fused``: the native kernel on CPU float32/float64 buckets it accepts, else the compiled
  update (what CUDA runs), else the loop if compilation fails (each fallback warns once);
* ``foreach`` (default on CUDA): the foreach form;
* otherwise the loop.

Every form takes the same arguments: the tensor columns (parameters, gradients, then state
tensors), then ``lr`` and ``drive``, then the rule's hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from emolightning.optim import _native
from emolightning.optim._multi_tensor import CompiledUpdate, group_by_device_and_dtype, scalar_tensor

NATIVE_DTYPES = (torch.float32, torch.float64)

Columns = list[list[Tensor]]
Bucket = tuple[torch.device, torch.dtype]


def state_list(states: list[dict[str, Any]], key: str) -> list[Tensor]:
    """``key``'s tensor from each state dict, 0-d tensors as 1-element views."""
    tensors = list(map(itemgetter(key), states))
    if all(map(Tensor.dim, tensors)):
        return tensors
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer's per-parameter update, in every form the dispatcher can run.

    Attributes:
        name: names the rule in caches and warnings (e.g. ``"navi"``).
        loop: one tensor at a time; ``lr`` and ``drive`` may be floats or 0-d tensors.
        state_keys: the state tensors the rule takes after parameters and gradients, in order.
        vector_keys: for factored rules: matrices (``dim >= 2``) take ``state_keys`` and come
            first; vectors and scalars follow with their own ``vector_keys`` state
            (columns: matrices, their grads, ``state_keys``..., vectors, their grads,
            ``vector_keys``...).
        foreach: the ``torch._foreach_*`` form (``None``: the loop is used).
        compiled: the form given to ``torch.compile`` (default: ``loop``).
        native: the C++ kernel's name in ``torch.ops.emolightning`` (``None``: none).
        compiled_inputs: turns the columns into the compiled form's columns (e.g. adds
            constant helper tensors); called as ``compiled_inputs(dispatcher, key, columns)``.
    """

    name: str
    loop: Callable[..., None]
    state_keys: tuple[str, ...] = ()
    vector_keys: Optional[tuple[str, ...]] = None
    foreach: Optional[Callable[..., None]] = None
    compiled: Optional[Callable[..., None]] = None
    native: Optional[str] = None
    compiled_inputs: Optional[Callable[["Dispatcher", tuple, Columns], Columns]] = None

    def columns(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]) -> Columns:
        """The rule's tensor arguments for these parameters, gradients and state dicts."""
        if self.vector_keys is None:
            return [params, grads, *(state_list(states, key) for key in self.state_keys)]
        if all(map((2).__le__, map(Tensor.dim, params))):  # all matrices (LoRA): no split, no 0-d views
            return [params, grads, *(list(map(itemgetter(key), states)) for key in self.state_keys),
                    [], [], *([] for _ in self.vector_keys)]
        columns: Columns = []
        for is_matrix, keys in ((True, self.state_keys), (False, self.vector_keys)):
            picked = [i for i, p in enumerate(params) if (p.dim() >= 2) == is_matrix]
            columns += [[params[i] for i in picked], [grads[i] for i in picked]]
            columns += [state_list([states[i] for i in picked], key) for key in keys]
        return columns


class Dispatcher:
    """Runs update rules on buckets of one device and dtype, on the fused, foreach or loop path.

    It remembers, per param group, how the group splits into buckets (while its parameters stay
    the same), the compiled updates it made, the buckets a native kernel refused and what a
    rule derived from a bucket (:attr:`plan_cache`); all of it is dropped for a group whose
    parameters change.

    Args:
        owner: the optimizer's name, for warnings.
        foreach: ``True``/``False`` forces the foreach form on or off; ``None``: on for CUDA.
        fused: run native kernels / compiled updates.
    """

    def __init__(self, owner: str, *, foreach: Optional[bool], fused: bool) -> None:
        self.owner, self.foreach, self.fused = owner, foreach, fused
        self.compiled: dict[tuple, CompiledUpdate] = {}  # (group index, bucket, rule name)
        self.native_refused: set[tuple] = set()  # (group index, bucket, kernel name)
        self.plan_cache: dict[tuple, Any] = {}  # (group index, bucket, what)
        self._plans: dict[int, tuple] = {}

    def buckets(self, index: int, params: list[Tensor], lists: list[list]) -> dict[Bucket, list[list]]:
        """``lists`` (parallel to group ``index``'s ``params``; the first holds the tensors the
        rule updates) split by the device and dtype of the first list's tensors. The split is
        remembered while the group's parameters stay the same."""
        key = tuple((id(p), p.shape, p.dtype) for p in params)
        cached = self._plans.get(index)
        if cached is None or cached[0] != key:
            # new parameters (or shapes): forget what was made for the old ones
            self.compiled = {k: v for k, v in self.compiled.items() if k[0] != index}
            self.native_refused = {k for k in self.native_refused if k[0] != index}
            self.plan_cache = {k: v for k, v in self.plan_cache.items() if k[0] != index}
            kinds = {(t.device, t.dtype) for t in lists[0]}
            cached = (key, next(iter(kinds)) if len(kinds) == 1 else None)
            self._plans[index] = cached
        if cached[1] is not None:
            return {cached[1]: lists}
        return group_by_device_and_dtype(lists)

    def run(self, rule: UpdateRule, index: int, bucket: Bucket, columns: Columns, lr: float, drive: float,
            args: tuple) -> None:
        """Update one bucket of group ``index`` with ``rule``."""
        if self.fused:
            if rule.native is not None and self._run_native(rule.native, index, bucket, columns, lr, drive, args):
                return
            key = (index, bucket, rule.name)
            update = self.compiled.get(key)
            if update is None:
                update = self.compiled[key] = CompiledUpdate(rule.compiled or rule.loop, self.owner)
            if rule.compiled_inputs is not None:
                columns = rule.compiled_inputs(self, key, columns)
            like = next(t for column in columns for t in column)
            update(*columns, scalar_tensor(lr, like), scalar_tensor(drive, like), *args)
        elif rule.foreach is not None and self._use_foreach(bucket[0]):
            rule.foreach(*columns, lr, drive, *args)
        else:
            rule.loop(*columns, lr, drive, *args)

    def _run_native(self, kernel: str, index: int, bucket: Bucket, columns: Columns, lr: float, drive: float,
                    args: tuple) -> bool:
        """The C++ kernel on a CPU float32/float64 bucket, when the kernels are available and
        did not refuse this bucket before. Returns whether it ran."""
        device, dtype = bucket
        key = (index, bucket, kernel)
        if device.type != "cpu" or dtype not in NATIVE_DTYPES or key in self.native_refused:
            return False
        ops = _native.native_kernels()
        if ops is None:
            return False
        try:
            getattr(ops, kernel)(*columns, float(lr), float(drive), *args)
        except RuntimeError:  # the kernel checks every tensor before it changes any
            self.native_refused.add(key)
            return False
        return True

    def _use_foreach(self, device: torch.device) -> bool:
        if self.foreach is not None:
            return self.foreach
        # torch's foreach kernels are fused on CUDA; on the CPU they loop, and the plain
        # per-tensor update is faster (see docs/results.md).
        return device.type == "cuda"
