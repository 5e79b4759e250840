"""EmotionMonitor: the Emo optimizers' emotion in the Trainer's logger, and a plot at the end."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from emolightning.callbacks.step import StepCallback
from emolightning.run import RolledBack, StageChanged, StepRecord

_SERIES = ("step", "loss", "train_loss", "scalar", "drive", "lr", "effective_lr", "blend", "should_stop", "stage",
           "rollbacks")


class EmotionMonitor(StepCallback):
    """Log what the Emo optimizers feel, every optimizer step, and plot it at the end of fit.

    Logged (per optimizer ``i``; ``emotion/`` for the first, ``emotion_i/`` for others):
    ``loss`` (the loss the optimizer used: the training loss, or the signal the LightningModule
    fed it instead, such as SDLoRAModule's calibrated ``emotion_signal``), ``scalar``, ``drive`` (emoDrive), ``lr`` and
    ``effective_lr`` (``lr * drive``) of the first param group, ``blend_ratio`` (the shadow blend
    weight, 0 when no blend), ``should_stop`` and any family-specific numbers the optimizer
    reports (:attr:`EmotionSnapshot.extras`, e.g. the EmoSens family's emoPulse), all as they
    were right after the step; plus ``plateau/stage`` and ``shadow/rollbacks`` when a callback
    in the Trainer announces stage changes or rollbacks (:class:`PlateauContinuation`,
    :class:`ShadowCheckpoint`), counted after the step's decisions. At the end of fit it writes
    ``emotion.png`` beside the logs: the training loss and, when it differs, the signal the
    optimizer read (on its own axis), scalar and drive, and LR over the steps, with stage
    changes and rollbacks marked. With other optimizers it logs the LR and the training loss
    only.

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
        self._stage = 0
        self._rollbacks = 0

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        events = self.events(trainer)
        events.subscribe(StageChanged, self._on_stage_changed)
        events.subscribe(RolledBack, self._on_rolled_back)

    def _on_stage_changed(self, event: StageChanged) -> None:
        self._stage = event.stage

    def _on_rolled_back(self, event: RolledBack) -> None:
        self._rollbacks = event.count

    @override
    def on_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: StepRecord) -> None:
        # written once every step callback has seen the step: the stage and rollback count then
        # include this step's decisions, whatever the callbacks' order
        self.events(trainer).defer(lambda: self._write(trainer, record))

    def _write(self, trainer: "pl.Trainer", record: StepRecord) -> None:
        row = self._row(trainer, record)
        for key in _SERIES:
            self.history[key].append(row[key])
        if trainer.logger is not None and record.step % self.log_every_n_steps == 0:
            trainer.logger.log_metrics(self._metrics(trainer, record, row), step=record.step)

    def _row(self, trainer: "pl.Trainer", record: StepRecord) -> dict[str, float]:
        local_loss = math.nan if record.loss is None else record.loss.item()
        row = {"step": float(record.step), "stage": float(self._stage), "rollbacks": float(self._rollbacks),
               "train_loss": local_loss}
        if record.snapshots:
            snap = record.snapshots[0]
            row.update(loss=local_loss if snap.loss is None else snap.loss, scalar=snap.scalar, drive=snap.drive,
                       lr=snap.lr[0], effective_lr=snap.effective_lr[0], blend=snap.blend_ratio,
                       should_stop=float(snap.should_stop))
        else:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
            row.update(loss=local_loss, scalar=math.nan, drive=math.nan, lr=lr, effective_lr=lr, blend=math.nan,
                       should_stop=math.nan)
        return row

    def _metrics(self, trainer: "pl.Trainer", record: StepRecord, row: dict[str, float]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, snap in enumerate(record.snapshots):
            prefix = "emotion" if index == 0 else f"emotion_{index}"
            values = {"scalar": snap.scalar, "drive": snap.drive, "lr": snap.lr[0],
                      "effective_lr": snap.effective_lr[0], "blend_ratio": snap.blend_ratio,
                      "should_stop": float(snap.should_stop), **snap.extras}
            if snap.loss is not None:
                values["loss"] = snap.loss
            metrics.update({f"{prefix}/{k}": float(v) for k, v in values.items()})
        if not record.snapshots:
            metrics["emotion/lr"] = row["lr"]
            if not math.isnan(row["loss"]):
                metrics["emotion/loss"] = row["loss"]
        events = self.events(trainer)
        if events.declared(StageChanged):
            metrics["plateau/stage"] = row["stage"]
        if events.declared(RolledBack):
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
        self.events(trainer).publish("emotion plot", self.plot_path)
        rank_zero_info(f"EmotionMonitor: wrote {self.plot_path}")

    def write_plot(self, path: Path) -> Path:
        """Draw the recorded history into ``path`` (written to a temporary name, then renamed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        steps = h["step"]
        figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        axes[0].plot(steps, h["train_loss"], color="tab:blue", linewidth=1, label="training loss")
        axes[0].set_ylabel("training loss")
        fed = any(not (math.isnan(a) or a == b) for a, b in zip(h["loss"], h["train_loss"]))
        if fed:  # the optimizer read another signal than the training loss (e.g. a calibrated one)
            twin = axes[0].twinx()
            twin.plot(steps, h["loss"], color="tab:red", linewidth=1, alpha=0.8, label="emotion signal")
            twin.set_ylabel("emotion signal (what the optimizer read)")
            lines = axes[0].get_lines() + twin.get_lines()
            twin.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
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
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["history"]
        length = len(saved.get("step", []))
        # a series that an older version did not record is NaN over the saved steps
        self.history = {key: list(saved.get(key, [math.nan] * length)) for key in _SERIES}
        self._stage = int(self.history["stage"][-1]) if self.history["stage"] else 0
        self._rollbacks = int(self.history["rollbacks"][-1]) if self.history["rollbacks"] else 0
