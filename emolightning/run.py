"""What the callbacks and the LightningModule of one Trainer share while it runs.

:func:`run_events` gives the :class:`RunEvents` of a Trainer: the one record of each optimizer
step that every step callback reads (:class:`StepRecord`), the events callbacks announce to each
other instead of reading each other's attributes (:class:`StageChanged`, :class:`RolledBack`),
actions deferred until every step callback has seen the step, and the files and facts the run
published for :class:`~emolightning.callbacks.RunSummary`. Nothing here depends on which
callbacks are present or in which order they run.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import Tensor

from emolightning.optim import EmotionalOptimizer, EmotionSnapshot

__all__ = ["LoraWriter", "Output", "RolledBack", "RunEvents", "StageChanged", "StepRecord", "emo_optimizers",
           "feed_emotion", "loss_readers", "run_events", "undo_accumulation"]


def emo_optimizers(trainer: "pl.Trainer") -> list[EmotionalOptimizer]:
    """The Trainer's optimizers that carry an emotion (:class:`EmotionalOptimizer`)."""
    return [opt for opt in trainer.optimizers if isinstance(opt, EmotionalOptimizer)]


def loss_readers(trainer: "pl.Trainer") -> list[Any]:
    """What reads the training loss each step: the Emo optimizers, and LR schedulers with a
    ``feed_loss`` method (:class:`~emolightning.optim.EmoPulseScheduler`)."""
    return [*emo_optimizers(trainer), *loss_reading_schedulers(trainer)]


def loss_reading_schedulers(trainer: "pl.Trainer") -> list[Any]:
    """The LR schedulers attached to the Trainer that read the training loss (have a
    ``feed_loss`` method, as :class:`~emolightning.optim.EmoPulseScheduler` does)."""
    return [config.scheduler for config in trainer.lr_scheduler_configs
            if callable(getattr(config.scheduler, "feed_loss", None))]


def feed_emotion(trainer: "pl.Trainer", value: Tensor) -> None:
    """Feed ``value`` to the :func:`loss_readers` as this micro-batch's loss, in place of the
    training loss: a LightningModule whose emotion should read another signal (SDLoRAModule's
    ``emotion_signal``) calls it in ``training_step``, and
    :class:`~emolightning.callbacks.EmoLossFeed` then feeds nothing for the micro-batch."""
    for reader in loss_readers(trainer):
        reader.feed_loss(value)
    run_events(trainer).emotion_fed = True


def undo_accumulation(trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> Tensor:
    """Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` in automatic
    optimization; this gives back the loss the training step returned."""
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        return loss * trainer.accumulate_grad_batches
    return loss


@runtime_checkable
class LoraWriter(Protocol):
    """A LightningModule that writes LoRA files (:class:`~emolightning.SDLoRAModule` does): the
    callbacks then write their stage and shadow files through it, in LoRA formats, instead of
    plain tensor files."""

    def export_lora(self, path: Union[str, Path], weights: Optional[dict[str, Tensor]] = None) -> Path:
        """Write the trainable weights, or ``weights`` (the same names, e.g. a shadow), to ``path``."""


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the step callbacks see it, taken once, before any of them acts.

    Attributes:
        step: ``trainer.global_step`` after the step.
        loss: this process's mean training loss over the step's micro-batches (float32,
            detached), or ``None`` when the training step returned none.
        snapshots: each Emo optimizer's emotion right after the step (before a callback
            resets it), in ``trainer.optimizers`` order.
    """

    step: int
    loss: Optional[Tensor]
    snapshots: tuple[EmotionSnapshot, ...] = ()


@dataclass(frozen=True)
class StageChanged:
    """A continuation stage began (announced by :class:`~emolightning.callbacks.PlateauContinuation`).

    Attributes:
        step: the optimizer step at whose end the stage changed.
        stage: the new stage (1 for the first continuation stage).
        lr_name: what was lowered (``"lr"``, or ``"emoScope"``).
        before, after: the first param group's value of it before and after.
        reason: what the plateau was judged by.
    """

    step: int
    stage: int
    lr_name: str
    before: float
    after: float
    reason: str


@dataclass(frozen=True)
class RolledBack:
    """The live weights were restored from the shadow (announced by
    :class:`~emolightning.callbacks.ShadowCheckpoint`).

    Attributes:
        step: the optimizer step at whose end the rollback happened.
        count: rollbacks so far in the run.
        reason: why.
    """

    step: int
    count: int
    reason: str


Event = Union[StageChanged, RolledBack]


@dataclass(frozen=True)
class Output:
    """Something the run wrote or concluded, for the run summary: ``what`` (e.g. ``"LoRA"``) and
    ``where`` (a path, or a sentence for ``"stopped because"``)."""

    what: str
    where: str


@dataclass
class _Batch:
    key: tuple
    record: Optional[StepRecord]
    finished: set = field(default_factory=set)
    closed: bool = False  # every step callback has finished it


class RunEvents:
    """The shared state of one Trainer's runs (get it with :func:`run_events`).

    Step callbacks (:class:`~emolightning.callbacks.StepCallback`) :meth:`join` at setup. At the
    end of each training batch the first of them to ask builds the :class:`StepRecord`
    (:meth:`begin_batch`); actions :meth:`defer`-red during the batch run when the last of them
    has finished it (:meth:`end_batch`): first state changes, then saves, so a checkpoint written
    then holds every callback's state after the step whatever the callbacks' order.
    """

    def __init__(self) -> None:
        self._participants: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._listeners: dict[type, list[Callable[[Any], None]]] = defaultdict(list)
        self._announcers: dict[type, "weakref.WeakSet[Any]"] = defaultdict(weakref.WeakSet)
        self._batch: Optional[_Batch] = None
        self._deferred: list[tuple[bool, Callable[[], None]]] = []
        self._last_step = -1
        self._pending: list[Tensor] = []
        self.outputs: list[Output] = []
        self.emotion_fed = False  # the module fed the current micro-batch's loss (feed_emotion)

    def take_emotion_fed(self) -> bool:
        """Whether the LightningModule fed the current micro-batch's emotion signal itself
        (:func:`feed_emotion`); clears the mark."""
        fed, self.emotion_fed = self.emotion_fed, False
        return fed

    # ------------------------------------------------------------------------ step records
    def join(self, participant: Any) -> None:
        """Count ``participant`` (a callback) among those every batch waits for."""
        self._participants.add(participant)

    def start(self, trainer: "pl.Trainer") -> None:
        """A fit starts or resumes at ``trainer.global_step``: that step has been taken."""
        self._last_step = trainer.global_step
        self._pending.clear()
        self._batch = None
        self._deferred.clear()

    def begin_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any) -> Optional[StepRecord]:
        """The record of the optimizer step this training batch ended, or ``None`` when it ended
        none (a micro-batch of gradient accumulation). The same for every caller of a batch."""
        key = (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx, trainer.global_step)
        if self._batch is not None and self._batch.key == key:
            return self._batch.record
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._pending.append(undo_accumulation(trainer, pl_module, loss.detach().float()))
        record = None
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            mean = torch.stack(self._pending).mean() if self._pending else None
            self._pending.clear()
            record = StepRecord(trainer.global_step, mean, tuple(opt.snapshot() for opt in emo_optimizers(trainer)))
        self._batch = _Batch(key, record)
        return record

    def end_batch(self, trainer: "pl.Trainer", participant: Any) -> None:
        """``participant`` is done with this batch; the last one runs the deferred actions."""
        batch = self._batch
        if batch is None or batch.closed:
            return
        batch.finished.add(id(participant))
        if all(id(cb) in batch.finished for cb in trainer.callbacks if cb in self._participants):
            batch.closed = True
            deferred, self._deferred = self._deferred, []
            for save in (False, True):
                for is_save, action in deferred:
                    if is_save == save:
                        action()

    def defer(self, action: Callable[[], None], *, save: bool = False) -> None:
        """Run ``action`` when every step callback has finished the current batch (at once
        outside a batch). Saving actions (``save=True``) run after the others."""
        if self._batch is None or self._batch.closed:
            action()
        else:
            self._deferred.append((save, action))

    # ------------------------------------------------------------------------------ events
    def subscribe(self, event_type: type, handler: Callable[[Any], None]) -> None:
        """Call ``handler(event)`` for every announced event of ``event_type`` (once per handler)."""
        if handler not in self._listeners[event_type]:
            self._listeners[event_type].append(handler)

    def declare(self, event_type: type, announcer: Any) -> None:
        """``announcer`` (a callback) may announce events of ``event_type`` in this run."""
        self._announcers[event_type].add(announcer)

    def declared(self, event_type: type) -> bool:
        """Whether some callback declared it announces ``event_type``: subscribers may then
        show its series even before the first event."""
        return len(self._announcers[event_type]) > 0

    def announce(self, event: Event) -> None:
        """Hand ``event`` to its subscribers, in the order they subscribed."""
        for handler in list(self._listeners[type(event)]):
            handler(event)

    # ----------------------------------------------------------------------------- outputs
    def publish(self, what: str, where: Union[str, "Any"]) -> None:
        """Record an output of the run (once per ``where``; a later ``what`` replaces it)."""
        where = str(where)
        self.outputs = [o for o in self.outputs if o.where != where] + [Output(what, where)]

    def withdraw(self, where: Union[str, "Any"]) -> None:
        """Forget an output (e.g. a file that was deleted)."""
        self.outputs = [o for o in self.outputs if o.where != str(where)]


_RUNS: "weakref.WeakKeyDictionary[pl.Trainer, RunEvents]" = weakref.WeakKeyDictionary()


def run_events(trainer: "pl.Trainer") -> RunEvents:
    """The :class:`RunEvents` of ``trainer`` (made on first use, kept as long as the Trainer)."""
    events = _RUNS.get(trainer)
    if events is None:
        events = _RUNS[trainer] = RunEvents()
    return events
