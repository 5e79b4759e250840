"""RunSummary: at the end of fit, one table of everything the run wrote."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from emolightning.callbacks._util import find_callback


class RunSummary(Callback):
    """Print, at the end of fit (rank 0), where each output of the run is: logs, checkpoints,
    stage checkpoints, shadow files, LoRA files, sample images and the emotion plot.

    Example:
        >>> trainer = pl.Trainer(callbacks=[RunSummary()])
    """

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        table = self.table(trainer, pl_module)  # on every rank: reading trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            Console().print(table)

    def outputs(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[tuple[str, str]]:
        """(what, where) rows. Call it on every process: it reads ``trainer.log_dir``, which
        every rank must join under DDP."""
        rows: list[tuple[str, str]] = []
        log_dir = trainer.log_dir
        if log_dir:
            kind = type(trainer.logger).__name__ if trainer.logger is not None else ""
            label = {"TensorBoardLogger": "logs (tensorboard --logdir)", "CSVLogger": "logs (metrics.csv)"}
            rows.append((label.get(kind, "logs"), log_dir))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            latest = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
            if latest:
                rows.append(("latest checkpoint", latest))
        plateau = find_callback(trainer, "PlateauContinuation")
        if plateau is not None:
            for record in plateau.stages:
                for key, label in (("checkpoint", "stage {} checkpoint"), ("lora", "stage {} LoRA")):
                    if key in record:
                        rows.append((label.format(record["stage"]), record[key]))
            if plateau.stop_reason:
                rows.append(("stopped because", plateau.stop_reason))
        shadow = find_callback(trainer, "ShadowCheckpoint")
        if shadow is not None:
            rows += [("shadow", path) for path in getattr(shadow, "written", [])]
        rows += [("LoRA", str(path)) for path in getattr(pl_module, "exported", [])]
        samples = Path(log_dir or trainer.default_root_dir) / "samples"
        if samples.is_dir():
            rows.append(("sample images", str(samples)))
        monitor = find_callback(trainer, "EmotionMonitor")
        if monitor is not None and monitor.plot_path is not None:
            rows.append(("emotion plot", str(monitor.plot_path)))
        return rows

    def table(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Table:
        table = Table(title=f"Run finished at step {trainer.global_step}: outputs")
        table.add_column("what", no_wrap=True)
        table.add_column("where", overflow="fold")
        for what, where in self.outputs(trainer, pl_module):
            table.add_row(what, where)
        return table
