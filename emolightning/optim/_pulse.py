"""The EmoSens family's emotion and emoPulse core (reference v3.9.1).

EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid and :class:`~emolightning.optim.EmoPulseScheduler`
share this core. It reads one loss per step and derives everything from the loss history alone:

* three running averages of the loss (short, medium, long) and the emotion scalar ``s`` of
  EmoNavi v3.6.1 (positive while the loss falls);
* ``trust = ±(1 - |s|)`` and the shadow blend ratio;
* slow estimates of the "noise" (``noise_est``, an average of ``|s|``), of the "distance"
  (``d_est``, an average of ``|trust|``) and of the trend (``c_est``, an average of ``s``);
* their ratio, ``dNR``, kept in ``dNR_hist`` by three rules (accelerate, reset, hold);
* **emoPulse**, the step size, ``dNR_hist * emoScope * 100**c_est * 1e-4``, clamped to
  ``[1e-8, emoScope * 3e-3]``: the optimizers use it instead of a learning rate;
* ``should_stop``: the run has gone quiet (``d_est - noise_est >= 0.3``) and the medium loss
  average is at most ``stopcoef``.

All of it is Python float (IEEE double) arithmetic in the reference's order and association,
so its branch choices are reproduced exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from emolightning.optim._emotion import emotion_scalar

BASE_SCALE = 1e-4  # emoPulse at the start, per unit of emoScope
MAX_LIMIT = 3e-3  # the largest emoPulse, per unit of emoScope (absolute for the scheduler)
MIN_LIMIT = 1e-8  # the smallest emoPulse, whatever emoScope
STOP_MARGIN = 0.3  # d_est - noise_est needed for should_stop
SHADOW_THRESHOLD = 0.625  # |s| above which the weights are blended toward the shadow

# initial values of the slow estimates (the reference's)
INITIAL = {"dNR_hist": 1.0, "noise_est": 1.0, "d_est": 0.02, "c_est": 0.0}
#: the keys of the reference's ``emo_internal`` block that every class writes
REFERENCE_KEYS = ("emoScope", "dNR_hist", "noise_est", "d_est", "c_est", "should_stop", "stopcoef")


def pulse_scalar(short: float, medium: float, long: float) -> tuple[float, float]:
    """The emotion scalar ``s`` (EmoNavi v3.6.1's) and the medium floor ``max(medium, 1e-5)``
    that the stop rule compares with ``stopcoef``."""
    scalar, _ = emotion_scalar(short, medium, long)
    return scalar, max(medium, 1e-5)


def emo_pulse(dnr_hist: float, c_est: float, scope: float, max_limit: float) -> float:
    """emoPulse from ``dNR_hist``, ``c_est`` and ``emoScope``, clamped to ``[1e-8, max_limit]``
    (``max_limit`` is ``emoScope * 3e-3`` for the optimizers, ``3e-3`` for the scheduler)."""
    chain = scope * max(100.0 ** c_est, 1e-2)
    return max(min(dnr_hist * (chain * BASE_SCALE), max_limit), MIN_LIMIT)


class PulseEmotion:
    """The loss averages, emotion scalar, slow estimates, emoPulse and stop rule of one
    optimizer (or scheduler).

    Call :meth:`observe` with each step's finite loss (or :meth:`observe_nothing` when no loss
    arrived, :meth:`observe_nonfinite` for a NaN/inf loss), use :attr:`pulse`, :attr:`trust` and
    :attr:`ratio` for the step, then :meth:`judge_stop` after the parameters moved.

    Args:
        scope: emoScope, the constructor's ``lr``.
        stopcoef: the medium loss average at or below which ``should_stop`` may turn on.
        use_shadow: whether a blend ratio is ever produced.
        absolute_cap: cap emoPulse at ``3e-3`` instead of ``emoScope * 3e-3`` (the scheduler).

    Example:
        >>> emotion = PulseEmotion(scope=1.0, stopcoef=0.04, use_shadow=False)
        >>> emotion.observe(1.0)
        >>> emotion.pulse
        0.0001
    """

    def __init__(self, *, scope: float, stopcoef: float, use_shadow: bool, absolute_cap: bool = False) -> None:
        self.emoScope = float(scope)
        self.stopcoef = float(stopcoef)
        self.use_shadow = bool(use_shadow)
        self.absolute_cap = bool(absolute_cap)
        self.step = 0
        self.steps_without_loss = 0
        self.nonfinite_losses = 0
        self.blend_count = 0
        self.reset()

    # --------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget the averages, estimates and ``should_stop``, keeping ``emoScope`` and
        ``stopcoef``: the next loss starts afresh, as in a new training session."""
        self.ema: Optional[dict[str, float]] = None
        self.dNR_hist = INITIAL["dNR_hist"]
        self.noise_est = INITIAL["noise_est"]
        self.d_est = INITIAL["d_est"]
        self.c_est = INITIAL["c_est"]
        self.should_stop = False
        self.loss: Optional[float] = None
        self.medium_floor: Optional[float] = None
        self.dnr_now: Optional[float] = None
        self.branch: Optional[str] = None
        self._neutral()

    def _neutral(self) -> None:
        self._set_scalar(0.0)
        self.pulse = self.current_pulse()

    @property
    def max_limit(self) -> float:
        return MAX_LIMIT if self.absolute_cap else self.emoScope * MAX_LIMIT

    @property
    def stop_base(self) -> float:
        """``d_est - noise_est``: at least 0.3 once the run has gone quiet."""
        return self.d_est - self.noise_est

    @property
    def drive(self) -> float:
        """Always 1: this family has no emoDrive (emoPulse is the whole step size)."""
        return 1.0

    def current_pulse(self) -> float:
        """emoPulse from the present estimates and ``emoScope`` (what a step without a loss
        uses, so a changed ``emoScope`` takes effect at once)."""
        return emo_pulse(self.dNR_hist, self.c_est, self.emoScope, self.max_limit)

    # --------------------------------------------------------------------------- stepping
    def observe(self, loss: float) -> None:
        """Take one finite loss: averages, scalar, trust and ratio, estimates, emoPulse."""
        self.step += 1
        self.loss = loss
        if self.ema is None:  # each average starts at the loss itself, as ``0.3 L + 0.7 L``
            self.ema = {"short": loss, "medium": loss, "long": loss}
        ema = self.ema
        ema["short"] = 0.3 * loss + 0.7 * ema["short"]
        ema["medium"] = 0.05 * loss + 0.95 * ema["medium"]
        ema["long"] = 0.01 * loss + 0.99 * ema["long"]
        scalar, self.medium_floor = pulse_scalar(ema["short"], ema["medium"], ema["long"])
        self._set_scalar(scalar)
        if self.ratio > 0:
            self.blend_count += 1
        trust = self.trust
        self.noise_est = 0.97 * self.noise_est + 0.03 * abs(scalar)
        self.d_est = 0.97 * self.d_est + 0.03 * abs(trust)
        self.c_est = 0.7 * self.c_est + 0.3 * scalar
        noise = max(self.noise_est, 1e-10)
        noise_base = abs(scalar - trust) + 0.1
        d_base = abs(noise - self.d_est) + 0.1
        self.dnr_now = (d_base / noise_base) ** 2
        if self.dnr_now >= self.dNR_hist and trust >= 0.5:
            self.dNR_hist = min(self.dnr_now, 1.5 * self.dNR_hist)
            self.branch = "A"  # accelerate (at most x1.5 per step)
        elif -0.5 <= trust <= 0.5:
            self.dNR_hist = 0.8 * self.dnr_now
            self.branch = "R"  # reset: set, not necessarily lowered
        else:
            self.branch = "H"  # hold
        self.pulse = self.current_pulse()

    def observe_nothing(self) -> None:
        """A step with no loss: averages and estimates untouched, neutral scalar (no blend),
        emoPulse from the present estimates, ``should_stop`` unchanged."""
        self.step += 1
        self.steps_without_loss += 1
        self.loss = None
        self.branch = self.dnr_now = None
        self._neutral()

    def observe_nonfinite(self) -> None:
        """A step whose loss was NaN/inf: counted; nothing else changes (the step is skipped)."""
        self.step += 1
        self.nonfinite_losses += 1

    def judge_stop(self) -> bool:
        """The stop rule, after a step that observed a loss. Returns whether ``should_stop``
        has just turned on (its rising edge)."""
        before = self.should_stop
        self.should_stop = self.stop_base >= STOP_MARGIN and self.medium_floor <= self.stopcoef
        return self.should_stop and not before

    def _set_scalar(self, scalar: float) -> None:
        self.scalar = scalar
        magnitude = abs(scalar)
        self.trust = math.copysign(1.0 - magnitude, scalar)
        self.ratio = 1.0 - magnitude if (self.use_shadow and magnitude > SHADOW_THRESHOLD) else 0.0

    # --------------------------------------------------------------------------- views
    @property
    def ema_view(self) -> dict[str, float]:
        return dict(self.ema) if self.ema is not None else {}

    def extras(self) -> dict[str, float]:
        """The family's numbers for telemetry: emoPulse, emoScope, trust and the estimates."""
        return {"emoPulse": self.pulse, "emoScope": self.emoScope, "trust": self.trust,
                "noise_est": self.noise_est, "d_est": self.d_est, "c_est": self.c_est,
                "dNR_hist": self.dNR_hist}

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The reference's ``emo_internal`` keys, then this implementation's own: the loss
        averages (the reference keeps them in ``optimizer.state['ema']``), the last emoPulse and
        the counters. Only floats, ints, bools, None and a dict of floats."""
        return {
            "emoScope": self.emoScope, "dNR_hist": self.dNR_hist, "noise_est": self.noise_est,
            "d_est": self.d_est, "c_est": self.c_est, "should_stop": self.should_stop,
            "stopcoef": self.stopcoef,
            "ema": self.ema_view or None, "last_pulse": self.pulse, "scalar": self.scalar,
            "medium_floor": self.medium_floor, "loss": self.loss, "step": self.step,
            "steps_without_loss": self.steps_without_loss, "nonfinite_losses": self.nonfinite_losses,
            "blend_count": self.blend_count,
        }

    def load_state_dict(self, state: dict[str, Any], ema: Optional[dict[str, Any]] = None) -> None:
        """Restore from :meth:`state_dict`, or from the reference's ``emo_internal`` block
        (missing keys take the reference's defaults: ``emoScope`` and ``stopcoef`` stay as
        they are) with its loss averages passed as ``ema``."""
        self.emoScope = float(state.get("emoScope", self.emoScope))
        self.stopcoef = float(state.get("stopcoef", self.stopcoef))
        for key, value in INITIAL.items():
            setattr(self, key, float(state.get(key, value)))
        self.should_stop = bool(state.get("should_stop", False))
        averages = state.get("ema", ema)
        self.ema = {k: float(averages.get(k, averages.get("long"))) for k in ("short", "medium", "long")} \
            if averages else None
        self.loss = state.get("loss")
        self.medium_floor = state.get("medium_floor")
        self.step = int(state.get("step", self.step))
        self.steps_without_loss = int(state.get("steps_without_loss", self.steps_without_loss))
        self.nonfinite_losses = int(state.get("nonfinite_losses", self.nonfinite_losses))
        self.blend_count = int(state.get("blend_count", self.blend_count))
        self._set_scalar(float(state.get("scalar", 0.0)))
        self.dnr_now = self.branch = None
        last = state.get("last_pulse")
        self.pulse = float(last) if last is not None else self.current_pulse()
