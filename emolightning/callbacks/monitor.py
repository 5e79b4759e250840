"""EmotionMonitor: the Emo optimizers' emotion in the Trainer's logger, and a plot at the end."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from emolightning.callbacks._util import StepLosses, emo_optimizers, find_callback

_SERIES = ("step", "loss", "scalar", "drive", "lr", "effective_lr", "blend", "should_stop", "stage", "rollbacks")


class EmotionMonitor(Callback):
    """Log what the Emo optimizers feel, every optimizer step, and plot it at the end of fit.

    Logged (per optimizer ``i``; ``emotion/`` for the first, ``emotion_i/`` for others):
    ``loss`` (the loss the optimizer used), ``scalar``, ``drive`` (emoDrive), ``lr`` and
    ``effective_lr`` (``lr * drive``) of the first param group, ``blend_ratio`` (the shadow blend
    weight, 0 when no blend), ``should_stop``, plus ``plateau/stage`` and ``shadow/rollbacks``
    when :class:`PlateauContinuation` or :class:`ShadowCheckpoint` is in the Trainer. At the end
    of fit it writes ``emotion.png`` beside the logs: loss, scalar and drive, and LR over the
    steps, with stage changes and rollbacks marked. With other optimizers it logs the LR and
    the training loss only.

    Args:
        log_every_n_steps: log every N optimizer steps (the plot keeps every step).
        plot: write the PNG at the end of fit (needs matplotlib).
        filename: name of the PNG.

    Example:
        >>> trainer = pl.Trainer(callbacks=[EmoLossFeed(), EmotionMonitor()])
    """

    def __init__(self, log_every_n_steps: int = 1, plot: bool = True, filename: str = "emotion.png") -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"EmotionMonitor: log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps, self.plot, self.filename = log_every_n_steps, plot, filename
        self.history: dict[str, list[float]] = {key: [] for key in _SERIES}
        self.plot_path: Optional[Path] = None
        self._steps = StepLosses()

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        stepped, loss = self._steps.observe(trainer, pl_module, outputs)
        if not stepped:
            return
        step = trainer.global_step
        row = self._row(trainer, step, math.nan if loss is None else loss.item())
        for key in _SERIES:
            self.history[key].append(row[key])
        if trainer.logger is not None and step % self.log_every_n_steps == 0:
            trainer.logger.log_metrics(self._metrics(trainer, row), step=step)

    def _row(self, trainer: "pl.Trainer", step: int, local_loss: float) -> dict[str, float]:
        plateau = find_callback(trainer, "PlateauContinuation")
        shadow = find_callback(trainer, "ShadowCheckpoint")
        row = {"step": float(step), "stage": float(plateau.stage) if plateau is not None else 0.0,
               "rollbacks": float(len(shadow.rollbacks)) if shadow is not None else 0.0}
        emo = emo_optimizers(trainer)
        if emo:
            snap = emo[0].snapshot()
            # right after a stage change the emotion was reset: fall back to the training loss
            row.update(loss=local_loss if snap.loss is None else snap.loss, scalar=snap.scalar, drive=snap.drive,
                       lr=snap.lr[0], effective_lr=snap.effective_lr[0], blend=snap.blend_ratio,
                       should_stop=float(snap.should_stop))
        else:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
            row.update(loss=local_loss, scalar=math.nan, drive=math.nan, lr=lr, effective_lr=lr, blend=math.nan,
                       should_stop=math.nan)
        return row

    def _metrics(self, trainer: "pl.Trainer", row: dict[str, float]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        emo = emo_optimizers(trainer)
        for index, optimizer in enumerate(emo):
            snap = optimizer.snapshot()
            prefix = "emotion" if index == 0 else f"emotion_{index}"
            values = {"scalar": snap.scalar, "drive": snap.drive, "lr": snap.lr[0],
                      "effective_lr": snap.effective_lr[0], "blend_ratio": snap.blend_ratio,
                      "should_stop": float(snap.should_stop)}
            if snap.loss is not None:
                values["loss"] = snap.loss
            metrics.update({f"{prefix}/{k}": float(v) for k, v in values.items()})
        if not emo:
            metrics["emotion/lr"] = row["lr"]
            if not math.isnan(row["loss"]):
                metrics["emotion/loss"] = row["loss"]
        if find_callback(trainer, "PlateauContinuation") is not None:
            metrics["plateau/stage"] = row["stage"]
        if find_callback(trainer, "ShadowCheckpoint") is not None:
            metrics["shadow/rollbacks"] = row["rollbacks"]
        return metrics

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.plot or not self.history["step"]:
            return
        # every rank reads log_dir: under DDP it is a broadcast from rank 0, which hangs if only rank 0 asks
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        directory = Path(log_dir) if log_dir else Path(trainer.default_root_dir)
        self.plot_path = self.write_plot(directory / self.filename)
        rank_zero_info(f"EmotionMonitor: wrote {self.plot_path}")

    def write_plot(self, path: Path) -> Path:
        """Draw the recorded history into ``path`` (written to a temporary name, then renamed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        steps = h["step"]
        figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        axes[0].plot(steps, h["loss"], color="tab:blue", linewidth=1)
        axes[0].set_ylabel("loss")
        axes[1].plot(steps, h["scalar"], color="tab:purple", linewidth=1, label="emotion scalar")
        axes[1].plot(steps, h["drive"], color="tab:orange", linewidth=1, label="emoDrive")
        axes[1].axhline(0.0, color="grey", linewidth=0.5)
        axes[1].legend(loc="upper right", fontsize=8)
        axes[1].set_ylabel("scalar / drive")
        axes[2].plot(steps, h["lr"], color="tab:green", linewidth=1, label="lr")
        axes[2].plot(steps, h["effective_lr"], color="tab:olive", linewidth=0.8, alpha=0.7, label="lr x drive")
        axes[2].set_yscale("log")
        axes[2].legend(loc="upper right", fontsize=8)
        axes[2].set_ylabel("learning rate")
        axes[2].set_xlabel("optimizer step")
        for previous, current, step in zip(h["stage"], h["stage"][1:], steps[1:]):
            if current != previous:
                for axis in axes:
                    axis.axvline(step, color="tab:red", linestyle="--", linewidth=1)
                axes[0].annotate(f"stage {int(current)}", (step, 1), xycoords=("data", "axes fraction"),
                                 fontsize=8, color="tab:red", va="top")
        for previous, current, step in zip(h["rollbacks"], h["rollbacks"][1:], steps[1:]):
            if current != previous:
                for axis in axes:
                    axis.axvline(step, color="black", linestyle=":", linewidth=1)
        figure.suptitle("Emotion over training (red dashes: new stage; black dots: rollback)")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        figure.savefig(temporary, format="png", dpi=100)
        plt.close(figure)
        os.replace(temporary, path)
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._steps.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {key: list(state_dict["history"].get(key, [])) for key in _SERIES}
        self._steps.last_step = int(state_dict["last_step"])
