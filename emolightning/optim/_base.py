"""The base class of the Emo optimizers: loss intake, distributed mean, state and telemetry.

Each optimizer subclass supplies only its update rule (``_update``) and the state it needs.
"""

from __future__ import annotations

import math
import warnings
from operator import itemgetter
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from emolightning.optim import _native
from emolightning.optim._emotion import Emotion, EmotionSnapshot
from emolightning.optim._multi_tensor import (
    CompiledUpdate,
    check_gradients,
    group_by_device_and_dtype,
    scalar_tensor,
)

LossLike = Union[float, int, Tensor]
_NATIVE_DTYPES = (torch.float32, torch.float64)
_STRING_STATE_KEYS = ("ema", "scalar_hist", "global_ema", "global_scalar_hist")


def _validate(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
              name: str = "betas") -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if len(tuple(betas)) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {betas!r}")


def _parse_state_dtype(state_dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if state_dtype is None or isinstance(state_dtype, torch.dtype):
        dtype = state_dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16}
        dtype = names.get(str(state_dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"state_dtype must be None or one of {sorted(names)}, got {state_dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"state_dtype must be a floating-point dtype, got {dtype}")
    return dtype


class EmoOptimizer(Optimizer):
    """What every Emo optimizer shares. Not meant to be used directly.

    The loss reaches the optimizer in one of three ways, first match wins:
    ``step(loss=...)``, the losses given to :meth:`feed_loss` since the last step (their mean),
    or the value returned by ``step(closure)``. With ``sync_loss`` and an initialised
    ``torch.distributed`` group of more than one process, the loss is averaged across processes
    before it touches the emotion state, so every rank takes the same step.
    """

    _history_source = "scalar"

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        use_shadow: bool,
        sync_loss: bool,
        foreach: Optional[bool],
        fused: Optional[bool],
        state_dtype: Union[None, str, torch.dtype],
        writer: Any = None,
    ) -> None:
        _validate(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        if foreach and fused:
            raise ValueError("foreach and fused are alternatives: set at most one of them to True")
        super().__init__(params, defaults)
        self.use_shadow = bool(use_shadow)
        self.sync_loss = bool(sync_loss)
        self.foreach = foreach
        self.fused = bool(fused)
        self.state_dtype = _parse_state_dtype(state_dtype)
        self.writer = writer
        self._init_lr = defaults["lr"]
        self._emotion = self._make_emotion()
        self._fed_sum: Optional[Tensor] = None
        self._fed_count = 0
        self._warned_no_loss = False
        self._compiled: dict[Any, CompiledUpdate] = {}
        self._plans: dict[int, tuple] = {}
        # (group index, bucket, kernel) whose tensors the native kernel refused (e.g. mixed
        # dtypes): those take the compiled update
        self._native_refused: set[tuple] = set()
        # what a subclass derives from a bucket's parameters, keyed (group index, bucket, name);
        # dropped with the group's plan when its parameters change
        self._plan_cache: dict[tuple, Any] = {}

    def _make_emotion(self) -> Emotion:
        return Emotion(use_shadow=self.use_shadow, history_source=self._history_source)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group} if hasattr(self, "defaults") else param_group
        if "lr" in merged:
            _validate(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------- loss
    def feed_loss(self, loss: LossLike) -> None:
        """Hand the optimizer a loss for the next step (for example one per micro-batch).

        The next :meth:`step` uses the mean of everything fed since the previous step, unless
        ``step(loss=...)`` is given. Tensors are kept on their device: nothing is synchronised
        here. :class:`emolightning.callbacks.EmoLossFeed` calls this from Lightning.
        """
        value = loss.detach().reshape(()).to(torch.float64) if isinstance(loss, Tensor) else \
            torch.tensor(float(loss), dtype=torch.float64)
        if self._fed_sum is not None and self._fed_sum.device != value.device:
            value = value.to(self._fed_sum.device)
        self._fed_sum = value if self._fed_sum is None else self._fed_sum + value
        self._fed_count += 1

    def _take_local_loss(self, loss: Optional[LossLike], closure_loss: Any) -> tuple[Any, int]:
        fed_sum, fed_count = self._fed_sum, self._fed_count
        self._fed_sum, self._fed_count = None, 0
        if loss is not None:
            return loss, 1
        if fed_count:
            return fed_sum, fed_count
        if closure_loss is not None:
            return closure_loss, 1
        return None, 0

    def _distributed(self) -> bool:
        return (self.sync_loss and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def _resolve_loss(self, loss: Optional[LossLike], closure_loss: Any) -> Optional[float]:
        total, count = self._take_local_loss(loss, closure_loss)
        if isinstance(total, Tensor) and total.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(total.shape)}")
        if not self._distributed():
            if count == 0:
                return None
            value = total.item() if isinstance(total, Tensor) else float(total)
            return value / count if count > 1 else value
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        if count == 0:
            pair = torch.zeros(2, dtype=torch.float64, device=device)
        else:
            value = total.detach().reshape(()) if isinstance(total, Tensor) else torch.tensor(float(total))
            pair = torch.stack([value.to(device=device, dtype=torch.float64),
                                torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(pair, op=dist.ReduceOp.SUM)
        total_sum, total_count = pair.tolist()
        if total_count == 0:
            return None
        return total_sum / total_count

    # ----------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,
             loss: Optional[LossLike] = None, **_: Any) -> Any:
        """Take one optimization step.

        Args:
            closure: optional; re-evaluates the model and returns the loss. It runs with
                gradients enabled, so a closure that calls ``backward()`` works.
            loss: optional; this step's loss as a float or a 0-d tensor. Takes precedence over
                fed losses and the closure's return value.

        Returns:
            The closure's return value, else ``loss``.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        value = self._resolve_loss(loss, closure_loss)
        if value is None:
            self._emotion.observe_nothing()
            self._warn_no_loss()
        elif not math.isfinite(value):
            self._emotion.observe_nonfinite()
            return closure_loss if closure_loss is not None else loss
        else:
            self._emotion.observe(value)
        self._apply_updates()
        if self.writer is not None:
            self._write_telemetry()
        return closure_loss if closure_loss is not None else loss

    def _warn_no_loss(self) -> None:
        if self._warned_no_loss:
            return
        self._warned_no_loss = True
        warnings.warn(
            f"{type(self).__name__}.step() received no loss, so the emotion mechanism stays "
            "neutral (emoDrive 1, no shadow blend, no should_stop) until one arrives. Pass "
            "step(closure) or step(loss=...), or call feed_loss(); under Lightning with "
            "precision='16-mixed' or gradient accumulation, add the "
            "emolightning.callbacks.EmoLossFeed callback.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _params_with_grad(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, and their gradients (checked)."""
        pairs = [(p, g) for p in group["params"] if (g := p.grad) is not None]
        if not pairs:
            return [], []
        params, grads = map(list, zip(*pairs))
        check_gradients(params, grads, type(self).__name__)
        return params, grads

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        return self.state_dtype or p.dtype

    def _apply_updates(self) -> None:
        # Each parameter's gradient and state dict are fetched once per step and handed down:
        # on hundreds of small LoRA tensors the per-parameter Python work is a visible share
        # of a compiled step.
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group)
            if not params:
                continue
            states = [self.state[p] for p in params]
            if not all(states):
                for p, state in zip(params, states):
                    if not state:
                        self._init_state(p, state)
            if self.use_shadow:
                self._apply_shadow(params)
            self._update_group(index, group, params, grads, states)

    def _compute_views(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list]:
        """Parameters and gradients as the update kernels take them: in the state dtype (copies
        only where the dtypes differ), 0-d tensors as 1-element views, gradients laid out like
        their parameters."""
        if self.state_dtype is None and all(map(Tensor.is_contiguous, grads)) and all(
                map(Tensor.is_contiguous, params)) and all(map(Tensor.dim, params)):
            return params, grads, []  # the common case, checked cheaply
        work, views, writeback = [], [], []
        for p, g in zip(params, grads):
            dtype = self._state_dtype_for(p)
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
            if p.dtype != dtype:
                copy = p.detach().to(dtype)
                writeback.append((p, copy))
                p, g = copy, g.to(dtype)
            if p.dim() == 0:
                p, g = p.view(1), g.view(1)
            work.append(p)
            views.append(g)
        return work, views, writeback

    @staticmethod
    def _state_list(states: list[dict[str, Any]], key: str) -> list[Tensor]:
        """``key``'s tensor from each state dict, 0-d tensors as 1-element views."""
        tensors = list(map(itemgetter(key), states))
        if all(map(Tensor.dim, tensors)):
            return tensors
        return [t.view(1) if t.dim() == 0 else t for t in tensors]

    def _factored_columns(self, ps: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]],
                          matrix_keys: tuple[str, ...], vector_keys: tuple[str, ...]) -> list[list[Tensor]]:
        """Columns for a factored update: matrices (``dim >= 2``) with their ``matrix_keys``
        state, then vectors and scalars with their ``vector_keys`` state."""
        if all(map((2).__le__, map(Tensor.dim, ps))):  # all matrices (LoRA): no split, no 0-d views
            return [ps, gs, *(list(map(itemgetter(key), states)) for key in matrix_keys),
                    [], [], *([] for _ in vector_keys)]
        columns: list[list[Tensor]] = []
        for is_matrix, keys in ((True, matrix_keys), (False, vector_keys)):
            picked = [i for i, p in enumerate(ps) if (p.dim() >= 2) == is_matrix]
            columns += [[ps[i] for i in picked], [gs[i] for i in picked]]
            columns += [self._state_list([states[i] for i in picked], key) for key in keys]
        return columns

    @staticmethod
    def _write_back(writeback: list) -> None:
        for p, copy in writeback:
            p.copy_(copy)

    def _buckets(self, index: int, params: list[Tensor], lists: list[list]) -> dict[tuple[torch.device, torch.dtype], list[list]]:
        """``lists`` (parallel to ``params``) split by the device and dtype of the first list's
        tensors; the split is remembered while the group's parameters stay the same."""
        key = tuple((id(p), p.shape, p.dtype) for p in params)
        cached = self._plans.get(index)
        if cached is None or cached[0] != key:
            # new parameters (or shapes): forget compiled updates made for the old ones
            self._compiled = {k: v for k, v in self._compiled.items() if k[0] != index}
            self._native_refused = {k for k in self._native_refused if k[0] != index}
            self._plan_cache = {k: v for k, v in self._plan_cache.items() if k[0] != index}
            kinds = {(t.device, t.dtype) for t in lists[0]}
            cached = (key, next(iter(kinds)) if len(kinds) == 1 else None)
            self._plans[index] = cached
        if cached[1] is not None:
            return {cached[1]: lists}
        return group_by_device_and_dtype(lists)

    def _run_native(self, index: int, bucket: tuple, kernel: str, lists: list[list], lr: float,
                    drive: float, *args: Any) -> bool:
        """On the fused path, run one bucket's update as the C++ ``kernel`` (see
        :mod:`emolightning.optim._native`) when the bucket is on the CPU in float32 or float64
        and the kernels are available. Returns whether it ran."""
        device, dtype = bucket
        key = (index, bucket, kernel)
        if device.type != "cpu" or dtype not in _NATIVE_DTYPES or key in self._native_refused:
            return False
        ops = _native.native_kernels()
        if ops is None:
            return False
        try:
            getattr(ops, kernel)(*lists, float(lr), float(drive), *args)
        except RuntimeError:  # the kernel checks every tensor before it changes any
            self._native_refused.add(key)
            return False
        return True

    def _dispatch(self, index: int, bucket: tuple, name: str, fn: Callable[..., None],
                  foreach_fn: Optional[Callable[..., None]], lists: list[list], lr: float,
                  drive: float, *args: Any, native: Optional[str] = None) -> None:
        """Run one bucket's update on the fused (native kernel ``native``, else compiled),
        foreach or per-tensor path."""
        device = bucket[0]
        if self.fused and native is not None and self._run_native(index, bucket, native, lists,
                                                                   lr, drive, *args):
            return
        if self.fused:
            update = self._compiled.get((index, bucket, name))
            if update is None:
                update = self._compiled[(index, bucket, name)] = CompiledUpdate(fn, type(self).__name__)
            like = next(t for column in lists for t in column)
            update(*lists, scalar_tensor(lr, like), scalar_tensor(drive, like), *args)
        elif foreach_fn is not None and self._use_foreach(device):
            foreach_fn(*lists, lr, drive, *args)
        else:
            fn(*lists, lr, drive, *args)

    def _use_foreach(self, device: torch.device) -> bool:
        if self.foreach is not None:
            return self.foreach
        # torch's foreach kernels are fused on CUDA; on the CPU they loop, and the plain
        # per-tensor update is faster (see docs/results.md).
        return device.type == "cuda"

    # ------------------------------------------------------------------------------- shadow
    def _apply_shadow(self, params: list[Tensor]) -> None:
        emotion = self._emotion
        shadows = []
        for p in params:
            state = self.state[p]
            if "shadow" not in state:
                state["shadow"] = p.detach().to(self._state_dtype_for(p), copy=True)
            shadows.append(state["shadow"])
        trust = abs(emotion.trust)
        if emotion.ratio > 0:
            for p, shadow in zip(params, shadows):
                p.mul_(1 - emotion.ratio).add_(shadow.to(p.dtype), alpha=trust)
        else:
            for p, shadow in zip(params, shadows):
                shadow.lerp_(p.to(shadow.dtype), 0.1 * trust)

    # --------------------------------------------------------------------- subclass contract
    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update_group(self, index: int, group: dict[str, Any], params: list[Tensor],
                      grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Update ``params`` (those of ``group`` with a gradient), given their gradients and
        their (initialised) state dicts."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- observability
    @property
    def should_stop(self) -> bool:
        """True once the emotion history has stayed quiet for 32 steps (sticky until reset)."""
        return self._emotion.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self._emotion.should_stop = bool(value)

    def reset_should_stop(self) -> None:
        """Clear ``should_stop`` and the history it was computed from."""
        self._emotion.should_stop = False
        self._emotion.history.clear()

    def reset_emotion(self, *, moments: bool = False) -> None:
        """Start the emotion afresh, as a new training session would ("additional training").

        Args:
            moments: also drop every per-parameter state (moments, factors, shadow), the
                author's "fresh start" variant.
        """
        self._emotion.reset()
        self._fed_sum, self._fed_count = None, 0
        if moments:
            self.state.clear()

    def _branch(self) -> Optional[str]:
        return None

    def snapshot(self) -> EmotionSnapshot:
        """The current emotion as a read-only :class:`EmotionSnapshot`."""
        e = self._emotion
        lrs = tuple(float(g["lr"]) for g in self.param_groups)
        return EmotionSnapshot(
            step=e.step, loss=e.loss, scalar=e.scalar, drive=e.drive,
            blend_ratio=e.ratio, blend_count=e.blend_count, should_stop=e.should_stop,
            lr=lrs, effective_lr=tuple(lr * e.drive for lr in lrs), branch=self._branch(),
            steps_without_loss=e.steps_without_loss, nonfinite_losses=e.nonfinite_losses,
            ema=e.ema_view,
        )

    def _write_telemetry(self) -> None:
        snap = self.snapshot()
        base = snap.lr[-1]
        self.writer.add_scalar("emoLR/base", base, snap.step)
        self.writer.add_scalar("emoLR/Turbo", base * snap.drive, snap.step)
        self.writer.add_scalar("emostate/emoDrive", snap.drive, snap.step)
        self.writer.add_scalar("emostate/scalar", snap.scalar, snap.step)

    # ---------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus ``"emo"``: the emotion state, history and
        ``should_stop``. Only tensors, numbers, strings, lists and dicts, so
        ``torch.load(..., weights_only=True)`` reads it."""
        state = super().state_dict()
        state["emo"] = self._emotion.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class, or by the reference implementation (whose emotion
        lives under string keys such as ``'ema'`` and ``'scalar_hist'`` inside ``state``)."""
        state_dict = dict(state_dict)
        emo = state_dict.pop("emo", None)
        per_param = dict(state_dict.get("state", {}))
        reference = {k: per_param.pop(k) for k in _STRING_STATE_KEYS if k in per_param}
        state_dict["state"] = per_param
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        if emo is not None:
            self._emotion.load_state_dict(emo)
        elif reference:
            self._emotion.load_reference(
                reference.get("ema", reference.get("global_ema")),
                reference.get("scalar_hist", reference.get("global_scalar_hist")),
            )

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded state to the parameter's dtype; fp32 state of low-precision (or
        # EmoClan's fp32 second moments of float64) parameters must keep its saved dtype.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved or p not in self.state:
                continue
            for key, value in saved.items():
                loaded = self.state[p].get(key)
                if isinstance(value, Tensor) and isinstance(loaded, Tensor) and loaded.dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)
