"""The emotion core shared by every Emo optimizer.

The Emo optimizers read the training loss once per step. Running averages of the loss give an
"emotion" scalar that scales the step, decides when parameters are blended back toward a slow
shadow copy, and raises ``should_stop`` when learning has gone quiet. The arithmetic here is done
in Python floats (IEEE double) in the same order as the reference, so that its floating-point
branch choices are reproduced exactly.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

HISTORY_LENGTH = 32
_QUIET_MEAN = 0.05
_QUIET_VARIANCE = 0.005


def _is_quiet(history: "deque[float] | list[float]") -> bool:
    """The reference's early-stop test: a full window whose values stay small and steady."""
    if len(history) < HISTORY_LENGTH:
        return False
    values = list(history)[-HISTORY_LENGTH:]
    mean_abs = sum(abs(v) for v in values) / len(values)
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return mean_abs < _QUIET_MEAN and variance < _QUIET_VARIANCE


def emo_drive(scalar: float) -> float:
    """The v3.6 step multiplier ("emoDrive") for an emotion scalar.

    A boost between 3.9 and 6.4 when ``0.25 < |s| < 0.5``, an emergency brake ``1 - |s|`` when
    ``|s| > 0.75``, and 1 elsewhere.
    """
    magnitude = abs(scalar)
    trust = math.copysign(1.0 - magnitude, scalar)
    if 0.25 < magnitude < 0.5:
        return 8.0 * abs(trust) * (1.0 + 0.1 * trust)
    if magnitude > 0.75:
        return 1.0 - magnitude
    return 1.0


def emotion_scalar(short: float, medium: float, long: float) -> tuple[float, float]:
    """The v3.6.1 emotion scalar ``s`` and the "early" scalar from the three loss averages.

    ``s > 0`` while the recent loss is below the long-run average (improving).
    """
    base_long = max(long, 1e-5)
    base_medium = max(medium, 1e-5)
    d_long = (long - short) / base_long
    d_medium = (long - short) / base_medium
    early = math.tanh(d_long)
    # In exact arithmetic both sides are |long - short|: the medium branch is taken only
    # through rounding, exactly as in the reference.
    if abs(d_long) < 0.05:
        return math.tanh(d_long), early
    if abs(d_medium) * base_medium < abs(d_long) * base_long:
        return math.tanh(d_medium), early
    return math.tanh(d_long), early


@dataclass(frozen=True)
class EmotionSnapshot:
    """A read-only view of an optimizer's emotion after its latest step.

    Attributes:
        step: optimizer steps taken (non-finite-loss steps included, since they were asked for).
        loss: the (rank-mean) loss the last step used, or ``None`` if none arrived.
        scalar: the emotion scalar ``s`` (v3.6: ``s > 0`` means the loss is falling).
        drive: the factor applied to the learning rate this step (emoDrive, or ``1 - |S|`` for
            EmoClan).
        blend_ratio: the weight of the shadow in this step's blend; 0.0 when no blend happened.
        blend_count: how many steps blended the weights toward the shadow.
        should_stop: the sticky "learning has gone quiet" signal.
        lr: the learning rate of each param group.
        effective_lr: ``lr * drive`` for each param group.
        branch: EmoClan's update rule for the last step (``"navi"``, ``"fact"``, ``"lynx"``), else
            ``None``.
        steps_without_loss: steps that received no loss and so left the emotion neutral.
        nonfinite_losses: steps skipped because the loss was NaN or infinite.
        ema: the loss running averages (``short``, ``medium``, ``long``; EmoClan has no medium).
        extras: numbers particular to an optimizer family (e.g. the EmoSens family's emoPulse),
            by name; logged and compared across processes like the fields above.
    """

    step: int
    loss: Optional[float]
    scalar: float
    drive: float
    blend_ratio: float
    blend_count: int
    should_stop: bool
    lr: tuple[float, ...]
    effective_lr: tuple[float, ...]
    branch: Optional[str]
    steps_without_loss: int
    nonfinite_losses: int
    ema: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)


class Emotion:
    """Modern (v3.6.1) emotion: relative loss EMAs, emoDrive, shadow ratio and history.

    Args:
        use_shadow: whether a blend ratio is ever produced.
        history_source: what the history records each step: ``"early"`` (EmoNavi) or
            ``"scalar"`` (EmoFact, EmoLynx).
    """

    def __init__(self, *, use_shadow: bool, history_source: str = "scalar") -> None:
        self.use_shadow = use_shadow
        self.history_source = history_source
        self.reset()
        self.step = 0
        self.steps_without_loss = 0
        self.nonfinite_losses = 0
        self.blend_count = 0

    def reset(self) -> None:
        """Forget the loss averages, history and ``should_stop``: the next loss starts afresh."""
        self.ema: Optional[dict[str, float]] = None
        self.history: deque[float] = deque(maxlen=HISTORY_LENGTH)
        self.should_stop = False
        self._neutral()
        self.loss: Optional[float] = None

    def _neutral(self) -> None:
        self.scalar = 0.0
        self.early = 0.0
        self.trust = 1.0
        self.ratio = 0.0
        self.drive = 1.0

    def observe(self, loss: float) -> None:
        """Take one finite loss: update the averages, the scalar and what follows from it."""
        self.step += 1
        self.loss = loss
        if self.ema is None:
            self.ema = {"short": loss, "medium": loss, "long": loss}
        ema = self.ema
        ema["short"] = 0.3 * loss + 0.7 * ema["short"]
        ema["medium"] = 0.05 * loss + 0.95 * ema["medium"]
        ema["long"] = 0.01 * loss + 0.99 * ema["long"]
        self._set_scalar(*emotion_scalar(ema["short"], ema["medium"], ema["long"]))
        if self.ratio > 0:
            self.blend_count += 1
        self.history.append(self.early if self.history_source == "early" else self.scalar)
        if _is_quiet(self.history):
            self.should_stop = True

    def observe_nothing(self) -> None:
        """A step with no loss: averages and history untouched, neutral drive, no blend."""
        self.step += 1
        self.loss = None
        self.steps_without_loss += 1
        self._neutral()

    def observe_nonfinite(self) -> None:
        """A step whose loss was NaN/inf: it is skipped and counted, nothing else changes."""
        self.step += 1
        self.nonfinite_losses += 1

    @property
    def ema_view(self) -> dict[str, float]:
        return dict(self.ema) if self.ema is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema_view or None,
            "history": list(self.history),
            "should_stop": self.should_stop,
            "scalar": self.scalar,
            "early": self.early,
            "loss": self.loss,
            "step": self.step,
            "steps_without_loss": self.steps_without_loss,
            "nonfinite_losses": self.nonfinite_losses,
            "blend_count": self.blend_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state.get("ema")
        self.ema = {k: float(v) for k, v in ema.items()} if ema else None
        self.history = deque((float(v) for v in state.get("history", [])), maxlen=HISTORY_LENGTH)
        self.should_stop = bool(state.get("should_stop", False))
        self.loss = state.get("loss")
        self.step = int(state.get("step", 0))
        self.steps_without_loss = int(state.get("steps_without_loss", 0))
        self.nonfinite_losses = int(state.get("nonfinite_losses", 0))
        self.blend_count = int(state.get("blend_count", 0))
        self._set_scalar(float(state.get("scalar", 0.0)), float(state.get("early", 0.0)))

    def _set_scalar(self, scalar: float, early: float) -> None:
        self.scalar, self.early = scalar, early
        magnitude = abs(scalar)
        self.trust = math.copysign(1.0 - magnitude, scalar)
        self.ratio = 1.0 - magnitude if (self.use_shadow and magnitude > 0.625) else 0.0
        self.drive = emo_drive(scalar)

    def load_reference(self, ema: Optional[dict], history: Any) -> None:
        """Accept the reference's own layout (``state['ema']`` and ``state['scalar_hist']``)."""
        if ema:
            self.ema = {k: float(ema.get(k, ema.get("long"))) for k in ("short", "medium", "long")}
        if history is not None:
            self.history = deque((float(v) for v in history), maxlen=HISTORY_LENGTH)


def legacy_scalar(short: float, long: float) -> float:
    """The v3.0 scalar: ``tanh(5 * (short - long))`` in absolute loss units (``> 0`` = rising)."""
    return math.tanh(5 * (short - long))


def legacy_shadow_ratio(scalar: float) -> float:
    """The v2.0/v3.0 shadow ratio, written as the reference writes it (it reduces to ``|s|``)."""
    magnitude = abs(scalar)
    if magnitude > 0.6:
        return 0.6 + (magnitude - 0.6) / 0.4 * 0.4
    if magnitude > 0.1:
        return 0.1 + (magnitude - 0.1) / 0.5 * 0.5
    return 0.0


def update_legacy_ema(ema: dict[str, float], loss: float) -> None:
    ema["short"] = 0.3 * loss + 0.7 * ema["short"]
    ema["long"] = 0.01 * loss + 0.99 * ema["long"]


class LegacyEmotion(Emotion):
    """EmoClan's v3.0 emotion: one global short/long pair, absolute scalar, ``(1 - |S|)`` scaling."""

    def __init__(self) -> None:
        super().__init__(use_shadow=False, history_source="scalar")

    def observe(self, loss: float) -> None:
        self.step += 1
        self.loss = loss
        if self.ema is None:
            self.ema = {"short": loss, "long": loss}
        update_legacy_ema(self.ema, loss)
        self._set_scalar(legacy_scalar(self.ema["short"], self.ema["long"]), 0.0)
        self.history.append(self.scalar)
        if _is_quiet(self.history):
            self.should_stop = True

    def _set_scalar(self, scalar: float, early: float) -> None:
        self.scalar = self.early = scalar
        self.trust, self.ratio = 1.0, 0.0
        self.drive = 1.0 - abs(scalar)

    def load_reference(self, ema: Optional[dict], history: Any) -> None:
        if ema:
            self.ema = {"short": float(ema["short"]), "long": float(ema["long"])}
        if history is not None:
            self.history = deque((float(v) for v in history), maxlen=HISTORY_LENGTH)
