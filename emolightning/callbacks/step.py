"""StepCallback: the base of the callbacks that act once per optimizer step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from emolightning.run import RunEvents, StepRecord, run_events


class StepCallback(Callback):
    """A callback that acts once per optimizer step, on a record shared with the other step
    callbacks, whatever their order in the Trainer.

    Lightning calls ``on_train_batch_end`` for every batch, micro-batches of gradient
    accumulation included, and each callback used to work out for itself whether a step had
    ended and what its loss was. A subclass instead implements :meth:`on_optimizer_step`, called
    once per optimizer step with the run's :class:`~emolightning.run.StepRecord` (the step, this
    process's mean loss over its micro-batches, the Emo optimizers' emotion before any callback
    acted). What it must do after every step callback has seen the step (save a checkpoint that
    holds their state) it hands to ``self.events(trainer).defer(action, save=True)``; it talks
    to other callbacks only through announced events (``events.announce`` /
    ``events.subscribe``, see :mod:`emolightning.run`), and reports its files with
    ``events.publish``.

    Subclasses that override ``setup`` or ``on_train_start`` call ``super()`` there.

    Example:
        >>> class PrintLoss(StepCallback):
        ...     def on_optimizer_step(self, trainer, pl_module, record):
        ...         print(record.step, None if record.loss is None else record.loss.item())
    """

    @staticmethod
    def events(trainer: "pl.Trainer") -> RunEvents:
        """The :class:`~emolightning.run.RunEvents` shared by ``trainer``'s callbacks."""
        return run_events(trainer)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        run_events(trainer).join(self)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        run_events(trainer).start(trainer)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        events = run_events(trainer)
        record = events.begin_batch(trainer, pl_module, outputs)
        if record is not None:
            self.on_optimizer_step(trainer, pl_module, record)
        events.end_batch(trainer, self)

    def on_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: StepRecord) -> None:
        """Called once per optimizer step, at the end of the batch that completed it."""
