"""RunSummary: at the end of fit, one table of everything the run wrote."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from emolightning.run import run_events


class RunSummary(Callback):
    """Print, once fit has finished (rank 0), where each output of the run is: the logs, the
    latest checkpoint, and everything the callbacks and the LightningModule published through
    :meth:`emolightning.run.RunEvents.publish` (stage checkpoints and LoRA files, shadow files,
    the exported LoRA, sample images, the emotion plot, why training stopped).

    It prints after every callback's ``on_fit_end`` (in ``teardown``), so files written there
    are listed wherever it sits among the callbacks.

    Example:
        >>> trainer = pl.Trainer(callbacks=[RunSummary()])
    """

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        table = self.table(trainer)  # on every rank: reading trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            Console().print(table)

    def outputs(self, trainer: "pl.Trainer", pl_module: Optional["pl.LightningModule"] = None) -> list[tuple[str, str]]:
        """(what, where) rows. Call it on every process: it reads ``trainer.log_dir``, which
        every rank must join under DDP. (``pl_module`` is not needed; kept for old callers.)"""
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
        rows += [(output.what, output.where) for output in run_events(trainer).outputs]
        return rows

    def table(self, trainer: "pl.Trainer", pl_module: Optional["pl.LightningModule"] = None) -> Table:
        table = Table(title=f"Run finished at step {trainer.global_step}: outputs")
        table.add_column("what", no_wrap=True)
        table.add_column("where", overflow="fold")
        for what, where in self.outputs(trainer):
            table.add_row(what, where)
        return table
