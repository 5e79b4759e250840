"""EmoPulseScheduler: the EmoSens family's emoPulse as the learning rate of any optimizer
(reference v1.0.0, shipped with EmoSens v3.9.1)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from emolightning.optim._loss import LossIntake, LossLike
from emolightning.optim._pulse import PulseEmotion

logger = logging.getLogger("emolightning.optim")


class EmoPulseScheduler(LRScheduler):
    """Set every param group's learning rate of ``optimizer`` to emoPulse, read from the loss.

    The step size of the EmoSens family (see :class:`~emolightning.optim.EmoSens`) for any
    optimizer, e.g. ``AdamW``: after each optimizer step, hand the scheduler that step's loss;
    it updates its loss averages and estimates and sets the LR the next optimizer step uses.
    The LR is set to ``base_lr * 1e-4`` at construction, so the first step already uses it.

    As in the reference, the largest LR is **3e-3 whatever** ``base_lr`` (the optimizers' own
    cap is ``emoScope * 3e-3``); the smallest is 1e-8. The loss comes from ``step(loss)`` or
    from :meth:`feed_loss` since the last step (their mean; :class:`emolightning.callbacks.EmoLossFeed`
    feeds schedulers that have ``feed_loss``), averaged across processes with ``sync_loss``.
    A step without a loss keeps the LR; a NaN/inf loss is skipped. Unlike the reference, it
    never reads a globally recorded loss. Lower ``emoScope`` (or ``base_lrs``, which
    PlateauContinuation scales) to take smaller steps.

    In Lightning, return it with ``"interval": "step"``.

    Args:
        optimizer: the optimizer whose learning rates it sets.
        base_lr: emoScope, the multiplier of emoPulse.
        stopcoef: the medium loss average at or below which ``should_stop`` may turn on.
        notify: log (on rank 0) when ``should_stop`` turns on.
        sync_loss: average the loss across ``torch.distributed`` processes.
        last_epoch: as for torch's schedulers (``-1``: a fresh start).

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> scheduler = EmoPulseScheduler(optimizer, base_lr=1.0)
        >>> loss.backward(); optimizer.step(); scheduler.step(loss)
    """

    def __init__(self, optimizer: Optimizer, base_lr: float = 1.0, stopcoef: float = 0.04, notify: bool = True,
                 *, sync_loss: bool = True, last_epoch: int = -1) -> None:
        if not isinstance(base_lr, (int, float)) or isinstance(base_lr, bool) or not base_lr >= 0.0:
            raise ValueError(f"base_lr must be a non-negative number, got {base_lr!r}")
        self._emotion = PulseEmotion(scope=base_lr, stopcoef=stopcoef, use_shadow=False, absolute_cap=True)
        self._loss = LossIntake(sync=sync_loss)
        self.notify = bool(notify)
        self._warned_no_loss = False
        self._started = False
        super().__init__(optimizer, last_epoch)

    # ------------------------------------------------------------------------- the knobs
    @property
    def emoScope(self) -> float:  # noqa: N802 - the reference's name
        """``base_lr``: the multiplier of emoPulse."""
        return self._emotion.emoScope

    @emoScope.setter
    def emoScope(self, value: float) -> None:  # noqa: N802
        self._emotion.emoScope = float(value)

    @property
    def base_lrs(self) -> list[float]:
        """emoScope for each param group. Setting it (as PlateauContinuation does with every
        scheduler's ``base_lrs`` at a new stage) sets emoScope to its first value."""
        return [self._emotion.emoScope] * len(self.optimizer.param_groups)

    @base_lrs.setter
    def base_lrs(self, values: list[float]) -> None:
        if self._started:  # torch's constructor sets it to the optimizer's own LRs: not emoScope
            self.emoScope = float(values[0])

    @property
    def should_stop(self) -> bool:
        """The loss has settled (see :class:`~emolightning.optim.EmoSens`); recomputed each step."""
        return self._emotion.should_stop

    @property
    def last_pulse(self) -> float:
        """The emoPulse set by the latest step."""
        return self._emotion.pulse

    @property
    def last_loss(self) -> Optional[float]:
        """The (rank-mean) loss the latest step used; ``None`` if it had none."""
        return self._emotion.loss

    def reset_emotion(self) -> None:
        """Forget the loss averages, the estimates and ``should_stop``, keeping ``emoScope``:
        the next loss starts afresh, as after a new training session (PlateauContinuation does
        this at a stage change). The LR stays at the present emoPulse until the next step."""
        self._emotion.reset()

    def reset_should_stop(self) -> None:
        """Clear ``should_stop`` only (the averages are kept)."""
        self._emotion.should_stop = False

    def feed_loss(self, loss: LossLike) -> None:
        """Hand over a loss for the next :meth:`step` (it uses the mean of those fed)."""
        self._loss.feed(loss)

    # ------------------------------------------------------------------------- stepping
    def get_lr(self) -> list[float]:
        return [self._emotion.pulse] * len(self.optimizer.param_groups)

    def step(self, loss: Optional[LossLike] = None) -> float:  # type: ignore[override]
        """Take this step's loss (or what was fed) and set the optimizer's LR to the new
        emoPulse, which is returned."""
        if not self._started:  # called once by the constructor: set the starting emoPulse
            self._started = True
            self._step_count = 0
            self.last_epoch += 1  # as torch's schedulers count: 0 after construction
            self._write()
            return self._emotion.pulse
        self._step_count += 1
        self.last_epoch += 1
        value = self._loss.take(loss, None)
        emotion = self._emotion
        if value is None:
            emotion.observe_nothing()
            self._warn_no_loss()
        elif not math.isfinite(value):
            emotion.observe_nonfinite()
        else:
            emotion.observe(value)
            if emotion.judge_stop() and self.notify and (not dist.is_available() or not dist.is_initialized()
                                                        or dist.get_rank() == 0):
                logger.info("EmoPulseScheduler: ready to stop (should_stop) at step %d, emoPulse %.3g.",
                            emotion.step, emotion.pulse)
        self._write()
        return emotion.pulse

    def _write(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self._emotion.pulse
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _warn_no_loss(self) -> None:
        if self._warned_no_loss:
            return
        self._warned_no_loss = True
        warnings.warn("EmoPulseScheduler.step() received no loss, so the learning rate stays where it is. Pass "
                      "step(loss) after each optimizer step, or feed_loss() (EmoLossFeed does so in Lightning).",
                      RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The reference's layout (``emo_internal`` and ``scheduler_state['ema']``) plus torch's
        step counters; numbers only, so ``torch.load(..., weights_only=True)`` reads it."""
        internal = self._emotion.state_dict()
        ema = internal.pop("ema")
        return {"emo_internal": internal, "scheduler_state": {"ema": ema},
                "last_epoch": self.last_epoch, "_step_count": self._step_count, "_last_lr": list(self._last_lr)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output or the reference scheduler's (the argument is not
        changed); the optimizer's LR is set to the restored emoPulse."""
        ema = (state_dict.get("scheduler_state") or {}).get("ema")
        self._emotion.load_state_dict(dict(state_dict.get("emo_internal", {})), ema=ema)
        self.last_epoch = int(state_dict.get("last_epoch", self.last_epoch))
        self._step_count = int(state_dict.get("_step_count", self._step_count))
        self._write()
