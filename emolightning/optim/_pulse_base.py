"""What the EmoSens family (EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid) shares on top of
:class:`~emolightning.optim.EmoOptimizer`: emoScope and emoPulse, the ``group["lr"]`` contract,
the stop rule's notice and the reference's ``emo_internal`` checkpoint block.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from emolightning.optim._base import EmoOptimizer
from emolightning.optim._loss import LossLike
from emolightning.optim._pulse import PulseEmotion

logger = logging.getLogger("emolightning.optim")

# an emoScope below this is far under the author's smallest (0.01): most likely a learning rate
SMALL_SCOPE = 1e-3


class EmoPulseOptimizer(EmoOptimizer):
    """The EmoSens family's base: the step size is emoPulse, computed from the loss history.

    ``lr`` is **emoScope**, a multiplier of emoPulse (default 1.0, the author's choice for
    LoRA). emoPulse starts at ``emoScope * 1e-4`` and stays within ``[1e-8, emoScope * 3e-3]``.
    After every step each param group's ``lr`` shows the emoPulse just used (so learning-rate
    monitors plot it); values written into ``group["lr"]`` from outside, by an LR scheduler or
    per-group LRs, have no effect, and a warning says so once. Lower ``emoScope`` (the
    attribute, or :meth:`scale_lr`) to take smaller steps.

    ``should_stop`` is recomputed after every step with a loss: the slow estimates say the run
    has gone quiet (``d_est - noise_est >= 0.3``, at the earliest after 35 steps) and the
    medium loss average is at most ``stopcoef``. With ``notify`` its rising edge is logged
    once (on rank 0).

    The five optimizers take the same arguments (the reference's, ``eps`` before ``betas``,
    keyword-only after ``lr``); see :class:`~emolightning.optim.EmoSens` for what they mean.
    Not meant to be used directly.

    Example:
        >>> optimizer = EmoSens(model.parameters(), lr=1.0)
        >>> isinstance(optimizer, EmoPulseOptimizer), optimizer.lr_name
        (True, 'emoScope')
    """

    lr_name = "emoScope"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        *,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.995),
        weight_decay: float = 0.01,
        stopcoef: float = 0.04,
        use_shadow: bool = False,
        notify: bool = True,
        sync_loss: bool = True,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_dtype: Union[None, str, torch.dtype] = None,
    ) -> None:
        if not isinstance(stopcoef, (int, float)) or isinstance(stopcoef, bool):
            raise ValueError(f"stopcoef must be a number, got {stopcoef!r}")
        self._initial_stopcoef = float(stopcoef)  # read by _make_emotion during the base's __init__
        self.notify = bool(notify)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, use_shadow=use_shadow, sync_loss=sync_loss,
                         foreach=foreach, fused=fused, state_dtype=state_dtype)
        # what each group's lr held when this optimizer last looked: a difference is a write
        # from outside (a scheduler, a callback), which has no effect
        self._lr_seen = [group["lr"] for group in self.param_groups]
        self._warned_lr = False
        self._warned_nonpositive = False
        self._warned_nonfinite = False
        if any(lr_value != lr for lr_value in self._lr_seen):
            self._warn_lr("param groups were given their own 'lr'")
        if 0 < lr < SMALL_SCOPE:
            warnings.warn(
                f"{type(self).__name__}: lr={lr:g} is emoScope, a multiplier of the step size the "
                f"optimizer computes (emoPulse, {lr * 1e-4:.2g} at the start), not a learning rate; "
                "the author uses 1.0 for LoRA, 0.1 for full UNet and 0.01 for full Transformer "
                "fine-tuning. Was a learning rate passed by mistake?",
                UserWarning,
                stacklevel=2,
            )

    def _make_emotion(self) -> PulseEmotion:
        return PulseEmotion(scope=self.defaults["lr"], stopcoef=self._initial_stopcoef, use_shadow=self.use_shadow)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_lr_seen"):
            self._lr_seen.append(self.param_groups[-1]["lr"])
            if self._lr_seen[-1] != self.defaults["lr"]:
                self._warn_lr("a param group was added with its own 'lr'")

    # ------------------------------------------------------------------------- emoScope
    @property
    def emoScope(self) -> float:  # noqa: N802 - the reference's name
        """The multiplier of emoPulse (the constructor's ``lr``); the only step-size knob."""
        return self._emotion.emoScope

    @emoScope.setter
    def emoScope(self, value: float) -> None:  # noqa: N802
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
            raise ValueError(f"emoScope must be a non-negative number, got {value!r}")
        self._emotion.emoScope = float(value)

    emo_scope = emoScope

    @property
    def stopcoef(self) -> float:
        """The medium loss average at or below which ``should_stop`` may turn on."""
        return self._emotion.stopcoef

    @stopcoef.setter
    def stopcoef(self, value: float) -> None:
        self._emotion.stopcoef = float(value)

    @property
    def last_pulse(self) -> float:
        """The emoPulse of the latest step (before any step: the one the first step will use
        if it gets no loss, ``emoScope * 1e-4``)."""
        return self._emotion.pulse

    # the slow estimates, read-only, under the reference's names
    @property
    def dNR_hist(self) -> float:  # noqa: N802
        """The held ratio ``((|noise - d| + 0.1) / (|s - trust| + 0.1))²`` emoPulse is proportional to."""
        return self._emotion.dNR_hist

    @property
    def noise_est(self) -> float:
        """The slow running average of ``|s|`` (starts at 1.0)."""
        return self._emotion.noise_est

    @property
    def d_est(self) -> float:
        """The slow running average of ``|trust| = 1 - |s|`` (starts at 0.02)."""
        return self._emotion.d_est

    @property
    def c_est(self) -> float:
        """The running average of ``s``; emoPulse scales with ``100 ** c_est``."""
        return self._emotion.c_est

    def scale_lr(self, factor: float) -> None:
        """Multiply emoScope by ``factor`` (a lower-"LR" continuation stage takes smaller steps).
        ``group["lr"]`` is left alone: it shows the emoPulse of the latest step."""
        self.emoScope = self.emoScope * factor

    def lr_values(self) -> list[float]:
        """emoScope, once per param group (it applies to all of them)."""
        return [self.emoScope] * len(self.param_groups)

    # ------------------------------------------------------------------------- the step
    def step(self, closure: Optional[Callable[[], Any]] = None, *, loss: Optional[LossLike] = None,
             **kwargs: Any) -> Any:
        """Take one optimization step; see :meth:`EmoOptimizer.step`. A NaN or infinite loss
        skips the step (parameters, state and estimates untouched) and warns once."""
        skipped = self._emotion.nonfinite_losses
        result = super().step(closure, loss=loss, **kwargs)
        if self._emotion.nonfinite_losses != skipped and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__} received a non-finite loss at step {self._emotion.step} and "
                "skipped that step: parameters, moments and the emotion are left as they were. "
                "Later non-finite losses are skipped silently (see snapshot().nonfinite_losses).",
                RuntimeWarning,
                stacklevel=3,  # the caller of torch's step wrapper
            )
        return result

    def _step_size(self, group: dict[str, Any]) -> float:
        return self._emotion.pulse

    def _before_updates(self) -> None:
        for index, group in enumerate(self.param_groups):
            if group["lr"] != self._lr_seen[index] or "initial_lr" in group:
                self._warn_lr("an LR scheduler is attached" if "initial_lr" in group
                              else "param_groups[%d]['lr'] was changed from outside" % index)
                self._lr_seen[index] = group["lr"]
        loss = self._emotion.loss
        if loss is not None and loss <= 0 and not self._warned_nonpositive:
            self._warned_nonpositive = True
            warnings.warn(
                f"{type(self).__name__} received a loss of {loss:g}: the EmoSens family assumes "
                "positive losses (its emotion compares ratios of loss averages). With losses at "
                "or below zero the emotion saturates and emoPulse shrinks toward its 1e-8 floor; "
                "feed a positive quantity (for example the loss plus a constant).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _after_updates(self) -> None:
        pulse = self._emotion.pulse
        for group in self.param_groups:
            group["lr"] = pulse
        self._lr_seen = [pulse] * len(self.param_groups)
        if self._emotion.loss is not None and self._emotion.judge_stop():
            self._stop_rose()

    def _stop_rose(self) -> None:
        """``should_stop`` has just turned on."""
        if self.notify and (not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0):
            logger.info("%s: ready to stop (should_stop) at step %d: the loss has settled (medium "
                        "average %.4g <= stopcoef %.4g).", type(self).__name__, self._emotion.step,
                        self._emotion.medium_floor, self.stopcoef)

    def _warn_lr(self, what: str) -> None:
        if self._warned_lr:
            return
        self._warned_lr = True
        name = type(self).__name__
        warnings.warn(
            f"{name}: {what}, but {name} ignores param_groups' 'lr': it computes its step size "
            "(emoPulse) from the loss every step and writes it into every group's 'lr' afterwards. "
            "LR schedulers and per-group LRs have no effect. To take smaller or larger steps, set "
            f"emoScope (the constructor's lr, or optimizer.emoScope; PlateauContinuation lowers it).",
            UserWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------------- telemetry
    def reset_should_stop(self) -> None:
        """Clear ``should_stop`` (the next step with a loss judges it afresh)."""
        self._emotion.should_stop = False

    def _snapshot_extras(self) -> dict[str, float]:
        return self._emotion.extras()

    # ------------------------------------------------------------------------- state dict
    def _geometry_state(self) -> dict[str, Any]:
        """EmoTion's and EmoVoid's extra ``emo_internal`` entries."""
        return {}

    def _load_geometry_state(self, internal: dict[str, Any]) -> None:
        """Restore what :meth:`_geometry_state` wrote (with the reference's defaults)."""

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus the reference's ``emo_internal`` block (emoScope,
        dNR_hist, noise_est, d_est, c_est, should_stop, stopcoef, and EmoTion's/EmoVoid's
        extras), extended with the loss averages (``ema``), the last emoPulse and counters.
        Only tensors, numbers, bools and dicts: ``torch.load(..., weights_only=True)`` reads it.
        :func:`~emolightning.optim.reference_state_dict` gives the reference's own layout."""
        state = torch.optim.Optimizer.state_dict(self)
        state["emo_internal"] = {**self._emotion.state_dict(), **self._geometry_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class or by the reference (its loss averages under
        ``state['ema']``). The argument is not changed. ``emoScope`` and ``stopcoef`` come from
        the checkpoint, as in the reference: set ``emoScope`` afterwards to resume at another."""
        state_dict = dict(state_dict)
        internal = dict(state_dict.pop("emo_internal", None) or {})
        per_param = dict(state_dict.get("state", {}))
        reference_ema = per_param.pop("ema", None)
        state_dict["state"] = per_param
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        self._restore_state_dtypes(state_dict)
        self._emotion.load_state_dict(internal, ema=reference_ema)
        self._load_geometry_state(internal)
        self._lr_seen = [group["lr"] for group in self.param_groups]


def reference_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an EmoSens-family ``state_dict()`` laid out as the reference (v3.9.1) keeps
    it, for loading into the reference's optimizers: the loss averages under
    ``state['ema']`` and ``emo_internal`` with the reference's keys only.

    Example:
        >>> torch.save(reference_state_dict(optimizer.state_dict()), "for_the_reference.pt")
    """
    internal = dict(state_dict["emo_internal"])
    ema = internal.get("ema")
    keep = ("emoScope", "dNR_hist", "noise_est", "d_est", "c_est", "should_stop", "stopcoef",
            "prev_gl1", "g_freshness", "_step_count")
    out = {key: value for key, value in state_dict.items() if key != "emo_internal"}
    out["emo_internal"] = {key: internal[key] for key in keep if key in internal}
    if ema is not None:
        out["state"] = {**state_dict["state"], "ema": dict(ema)}
    return out
