"""The loss signal the Emo optimizers' emotion reads in a diffusion run.

A diffusion training loss is mostly decided by the timestep each image happens to draw, not by
how far the model has learned: on a trained denoiser an image's error at a timestep below 100
is more than a hundred times its error beyond 900. The Emo optimizers compare a short and a long running
average of the loss they are fed; fed the batch loss, their emotion follows which timesteps the
last few batches drew. ``"calibrated"`` feeds them instead each image's loss divided by the
running mean loss of its timestep bin (:class:`TimestepBaseline`), averaged over the batch and
multiplied by how the mean over all bins has moved since every bin first had a baseline: the
loss the model has now, averaged over the timesteps, relative to the start (1.0 at the start,
0.8 once it is 20 % lower), without the swing between batches that drew easy or hard
timesteps. The optimizer's own arithmetic is unchanged; only what it is fed changes.
docs/optimizers.md and docs/results.md (the measurements) say more.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

EMOTION_SIGNALS = ("raw", "calibrated")
"""What the Emo optimizers read (``SDLoRAModule(emotion_signal=...)``): ``"raw"``, the batch
loss (the reference behaviour), or ``"calibrated"``, each image's loss measured against its
timestep bin's running mean, on the scale of the loss at the start
(:meth:`TimestepBaseline.calibrate`)."""

Reduce = Callable[[Tensor], Tensor]


def check_emotion_signal(value: str) -> str:
    if value not in EMOTION_SIGNALS:
        raise ValueError(f"model.emotion_signal must be one of {EMOTION_SIGNALS}, got {value!r}")
    return value


class TimestepBaseline:
    """A running mean of the per-image loss in each timestep bin (the loss *profile* over the
    timesteps), and each image's loss measured against it.

    The ``num_train_timesteps`` timesteps are split into ``bins`` equal bins. Every update adds
    a batch's losses to its bins' sums and counts after multiplying all the sums and counts by
    ``1 - 1 / horizon``; a bin's baseline is its sum over its count, so it weighs the losses of
    the last ``horizon`` updates or so (all of them while fewer have come, with no start-up
    bias) however rarely the bin is drawn. The sums and counts of a batch are summed across
    processes before they are added (``reduce``), so every rank holds the same baseline.

    :meth:`relative` and :meth:`calibrate` use the baseline from *before* the batch: an image's
    value never contains itself. A bin that has seen fewer than ``min_count`` (decayed) images
    so far has no baseline yet. The first time every bin has one, the :meth:`level` (the mean
    of the bins' baselines) is kept as :attr:`reference`: :meth:`calibrate` measures the level
    against it.

    Args:
        num_train_timesteps: the noise schedule's number of timesteps.
        bins: how many timestep bins.
        horizon: how many updates the running means remember (the decay's time constant).
        min_count: the decayed count a bin needs before its baseline is used.

    Example:
        >>> baseline = TimestepBaseline(1000, bins=10)
        >>> baseline.observe(torch.tensor([0.5, 0.02]), torch.tensor([30, 940]))  # no baseline yet: neutral
        tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, num_train_timesteps: int = 1000, *, bins: int = 10, horizon: float = 1000.0,
                 min_count: float = 1.5) -> None:
        if bins < 1 or num_train_timesteps < bins:
            raise ValueError(f"TimestepBaseline: need 1 <= bins <= num_train_timesteps, got bins={bins}, "
                             f"num_train_timesteps={num_train_timesteps}")
        if horizon < 1:
            raise ValueError(f"TimestepBaseline: horizon must be >= 1, got {horizon!r}")
        self.num_train_timesteps, self.bins = num_train_timesteps, bins
        self.horizon, self.min_count = horizon, min_count
        self.sums = torch.zeros(bins, dtype=torch.float64)
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.reference: Optional[float] = None

    def bin_of(self, timesteps: Tensor) -> Tensor:
        """Each timestep's bin index."""
        return (timesteps.detach().long().cpu() * self.bins // self.num_train_timesteps).clamp(0, self.bins - 1)

    def baseline(self) -> Tensor:
        """Each bin's running mean loss (float64; NaN for a bin below ``min_count``)."""
        ready = self.counts >= self.min_count
        return torch.where(ready, self.sums / self.counts.clamp(min=1e-300), torch.full_like(self.sums, float("nan")))

    def relative(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """Each loss divided by its bin's baseline (float64, on the CPU); 1 where a bin has none."""
        reference = self.baseline()[self.bin_of(timesteps)]
        values = losses.detach().double().cpu()
        return torch.where(torch.isnan(reference), torch.ones_like(values), values / reference)

    def level(self) -> float:
        """The mean of the bins' baselines (those that have one): the loss averaged over the
        timesteps; NaN while no bin has a baseline."""
        baseline = self.baseline()
        ready = baseline[~torch.isnan(baseline)]
        return ready.mean().item() if ready.numel() else float("nan")

    def calibrate(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """Each loss over its bin's baseline, times :meth:`level` over :attr:`reference` (1
        until every bin has a baseline): the loss with its timestep's cost taken out, relative
        to the level at the start (float64, on the CPU)."""
        ratios = self.relative(losses, timesteps)
        return ratios if self.reference is None else ratios * (self.level() / self.reference)

    def update(self, losses: Tensor, timesteps: Tensor, reduce: Optional[Reduce] = None) -> None:
        """Add one batch's losses (this process's; ``reduce`` sums a tensor across processes)."""
        bins = self.bin_of(timesteps)
        step = torch.stack([torch.bincount(bins, weights=losses.detach().double().cpu(), minlength=self.bins),
                            torch.bincount(bins, minlength=self.bins).double()])
        if reduce is not None:
            step = reduce(step).to(device="cpu", dtype=torch.float64)
        keep = 1.0 - 1.0 / self.horizon
        self.sums = self.sums * keep + step[0]
        self.counts = self.counts * keep + step[1]
        if self.reference is None and bool((self.counts >= self.min_count).all()):
            self.reference = self.level()

    def observe(self, losses: Tensor, timesteps: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
        """:meth:`calibrate` with the baseline so far, then :meth:`update`."""
        calibrated = self.calibrate(losses, timesteps)
        self.update(losses, timesteps, reduce)
        return calibrated

    def state_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "horizon": self.horizon, "min_count": self.min_count,
                "num_train_timesteps": self.num_train_timesteps, "sums": self.sums.clone(),
                "counts": self.counts.clone(), "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["bins"]) != self.bins or int(state["num_train_timesteps"]) != self.num_train_timesteps:
            raise ValueError(f"the checkpoint's emotion-signal baseline has {state['bins']} bins over "
                             f"{state['num_train_timesteps']} timesteps, this model {self.bins} over "
                             f"{self.num_train_timesteps}; resume with the same settings")
        self.sums = state["sums"].to(dtype=torch.float64, device="cpu").clone()
        self.counts = state["counts"].to(dtype=torch.float64, device="cpu").clone()
        self.reference = None if state.get("reference") is None else float(state["reference"])


class EmotionSignal:
    """What a diffusion module feeds the Emo optimizers each micro-batch (see the module's
    docstring): ``"raw"``, the batch's training loss, or ``"calibrated"``, the batch mean of
    :meth:`TimestepBaseline.observe`.

    Args:
        kind: one of :data:`EMOTION_SIGNALS`.
        num_train_timesteps: the noise schedule's number of timesteps.
        bins, horizon, min_count: the :class:`TimestepBaseline`'s settings.

    Example:
        >>> signal = EmotionSignal("calibrated", 1000)
        >>> value = signal(loss, per_image_losses, timesteps)  # a 0-d float64 tensor
    """

    def __init__(self, kind: str = "calibrated", num_train_timesteps: int = 1000, *, bins: int = 10,
                 horizon: float = 1000.0, min_count: float = 1.5) -> None:
        self.kind = check_emotion_signal(kind)
        self.baseline = TimestepBaseline(num_train_timesteps, bins=bins, horizon=horizon, min_count=min_count)

    def __call__(self, loss: Tensor, per_image: Tensor, timesteps: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
        """The value to feed for one micro-batch: ``loss`` (detached) for ``"raw"``, else the
        mean of the images' calibrated losses (updating the baseline)."""
        if self.kind == "raw":
            return loss.detach()
        return self.baseline.observe(per_image, timesteps, reduce).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state["baseline"])


class DiffusionTerms(NamedTuple):
    """One batch's diffusion loss and what it is made of.

    Attributes:
        loss: the training loss (what the gradient comes from).
        per_image: each image's detached share of it (its masked error, times its min-SNR
            weight when one is set); ``loss`` is their mean.
        timesteps: the timestep each image was noised to.
    """

    loss: Tensor
    per_image: Tensor
    timesteps: Tensor
