"""The base class of the Emo optimizers: the step, the shadow, the public interface and state.

A subclass declares three things (see :class:`EmoOptimizer`): its emotion core
(``_make_emotion``), each parameter's state (``_init_state``) and its update rule
(``_rule`` and ``_rule_args``, see :mod:`emolightning.optim._dispatch`). Loss intake lives in
:mod:`emolightning.optim._loss`, the emotion arithmetic in :mod:`emolightning.optim._emotion`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from emolightning.optim._dispatch import Bucket, Dispatcher, UpdateRule
from emolightning.optim._emotion import Emotion, EmotionSnapshot
from emolightning.optim._loss import LossIntake, LossLike
from emolightning.optim._multi_tensor import check_gradients

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

    Its public methods are the :class:`~emolightning.optim.EmotionalOptimizer` interface that
    the callbacks use. A new optimizer subclasses it and provides:

    * ``_make_emotion()``: the emotion core (default: the v3.6.1 :class:`Emotion`);
    * ``_init_state(p, state)``: a parameter's state, created on its first step with a gradient;
    * ``_rule(group)``: the :class:`~emolightning.optim._dispatch.UpdateRule` to run, and
      ``_rule_args(rule, group, bucket)``: its hyperparameters after ``(lr, drive)``;
    * optionally ``_step_size(group)`` (default ``group["lr"]``), ``_drive(group)`` (default
      emoDrive), ``_before_updates()`` and
      ``_after_updates()`` (run around the parameter updates of a step with a loss or none),
      ``_apply_shadow(params)`` and ``_snapshot_extras()``.
    """

    _history_source = "scalar"
    lr_name = "lr"

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
        # The constructor's lr, never changed afterwards (EmoClan's decoupled weight decay divides
        # by it, as lion-pytorch does: a lower stage LR then lowers the decay in proportion).
        self._init_lr = defaults["lr"]
        self._emotion = self._make_emotion()
        self._loss = LossIntake(sync=self.sync_loss)
        self._warned_no_loss = False
        self._dispatcher = Dispatcher(type(self).__name__, foreach=foreach, fused=self.fused)

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
        self._loss.feed(loss)

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
        value = self._loss.take(loss, closure_loss)
        if value is None:
            self._emotion.observe_nothing()
            self._warn_no_loss()
        elif not math.isfinite(value):
            self._emotion.observe_nonfinite()
            return closure_loss if closure_loss is not None else loss
        else:
            self._emotion.observe(value)
        self._before_updates()
        self._apply_updates()
        self._after_updates()
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
        # of a fused step.
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

    def _update_group(self, index: int, group: dict[str, Any], params: list[Tensor],
                      grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Run the group's rule on ``params`` (those with a gradient), bucket by bucket."""
        rule = self._rule(group)
        work, views, writeback = self._compute_views(params, grads)
        lr, drive = self._step_size(group), self._drive(group)
        for bucket, (ps, gs, sts) in self._dispatcher.buckets(index, params, [work, views, states]).items():
            self._dispatcher.run(rule, index, bucket, rule.columns(ps, gs, sts), lr, drive,
                                 self._rule_args(rule, group, bucket))
        for p, copy in writeback:
            p.copy_(copy)

    def _compute_views(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list]:
        """Parameters and gradients as the update rules take them: in the state dtype (copies
        only where the dtypes differ, written back after the update), 0-d tensors as
        1-element views, gradients laid out like their parameters."""
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

    # ------------------------------------------------------------------ what a subclass gives
    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        """The update rule that runs on ``group`` this step."""
        raise NotImplementedError

    def _rule_args(self, rule: UpdateRule, group: dict[str, Any], bucket: Bucket) -> tuple:
        """``rule``'s arguments after ``(lr, drive)`` for ``group``'s ``bucket``."""
        raise NotImplementedError

    def _step_size(self, group: dict[str, Any]) -> float:
        """The learning rate the rule gets for ``group`` (before emoDrive)."""
        return group["lr"]

    def _drive(self, group: dict[str, Any]) -> float:
        """The rule's second per-step scalar for ``group``, given after ``lr`` (default: emoDrive;
        EmoTion: its gradient freshness). Floats here become 0-d tensors on the compiled path,
        so a new value each step does not recompile."""
        return self._emotion.drive

    def _before_updates(self) -> None:
        """Runs after the emotion took this step's loss, before any parameter changes."""

    def _after_updates(self) -> None:
        """Runs after every param group was updated."""

    def _snapshot_extras(self) -> dict[str, float]:
        """Family-specific numbers for :attr:`EmotionSnapshot.extras`."""
        return {}

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

    def shadow_weights(self, params: Sequence[Tensor]) -> Optional[list[Tensor]]:
        """This optimizer's shadow of each of ``params`` (the tensors it keeps, not copies), or
        ``None`` unless it was built with ``use_shadow=True`` and holds one for every one of
        them (a parameter gets its shadow on its first step with a gradient)."""
        if not self.use_shadow:
            return None
        shadows = [self.state[p].get("shadow") if p in self.state else None for p in params]
        return None if any(s is None for s in shadows) else shadows

    @torch.no_grad()
    def restore_from_shadow(self, params: Sequence[Tensor]) -> bool:
        """Copy this optimizer's shadow into ``params`` (a rollback). Returns ``False`` and
        changes nothing when :meth:`shadow_weights` has none for them."""
        shadows = self.shadow_weights(params)
        if shadows is None:
            return False
        for p, shadow in zip(params, shadows):
            p.copy_(shadow.to(p.device, p.dtype))
        return True

    def drop_moments(self, params: Iterable[Tensor]) -> None:
        """Forget the state of ``params`` (moments, factors); a shadow is kept. They start
        afresh at their next step, as in a new training session."""
        for p in params:
            if p in self.state:
                kept = {k: v for k, v in self.state[p].items() if k == "shadow"}
                if kept:  # a state that is not empty is not initialised at the next step
                    self._init_state(p, kept)
                self.state[p] = kept

    # --------------------------------------------------------------------------- learning rate
    def scale_lr(self, factor: float) -> None:
        """Multiply every param group's ``lr`` (and ``initial_lr``, which schedulers start from)
        by ``factor``: what a lower-LR continuation stage does."""
        for group in self.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor

    def lr_values(self) -> list[float]:
        """Each param group's ``lr``."""
        return [float(group["lr"]) for group in self.param_groups]

    # ------------------------------------------------------------------------- observability
    @property
    def should_stop(self) -> bool:
        """The optimizer's "learning has gone quiet" signal: for EmoNavi's family, True once the
        emotion history has stayed quiet for 32 steps (sticky until reset); for EmoSens's,
        recomputed after every step with a loss."""
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
        self._loss.clear()
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
            ema=e.ema_view, extras=self._snapshot_extras(),
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
