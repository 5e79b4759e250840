"""Helpers shared by the callbacks."""

from __future__ import annotations

import atexit
import gc
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer


_release_registered = False


def release_gloo_group_at_exit() -> None:
    """At process exit, free unreachable objects (a DDP wrapper among them), then destroy a gloo
    process group, before the interpreter's own teardown.

    A ``DistributedDataParallel`` wrapper sits in a reference cycle, so after fit it is freed by
    the garbage collector, or not before the interpreter shuts down, and freed that late it
    sometimes aborts the process ("terminate called without an active exception"): a finished
    CPU DDP worker then fails the run. Lightning destroys NCCL groups at exit, not gloo ones.
    Safe to call many times; registers once per process."""
    global _release_registered
    if _release_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo":
        return
    _release_registered = True
    atexit.register(_release_process_group)


def _release_process_group() -> None:
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def emo_optimizers(trainer: "pl.Trainer") -> list[Optimizer]:
    """The Trainer's optimizers that carry an emotion (anything with ``snapshot()``)."""
    return [opt for opt in trainer.optimizers if callable(getattr(opt, "snapshot", None))]


def group_lrs(trainer: "pl.Trainer") -> list[list[float]]:
    return [[float(group["lr"]) for group in opt.param_groups] for opt in trainer.optimizers]


def scale_lrs(trainer: "pl.Trainer", factor: float) -> None:
    """Multiply every param group's LR by ``factor``, in the optimizers and in every attached
    scheduler's ``base_lrs``, so that closed-form schedulers (LambdaLR, OneCycleLR, cosine
    restarts) do not undo the change at their next step."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for config in trainer.lr_scheduler_configs:
        scheduler: Any = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def save_checkpoint_atomically(trainer: "pl.Trainer", path: Union[str, Path]) -> Path:
    """``trainer.save_checkpoint`` to a temporary name, renamed into place on rank 0.

    Call it on every rank (some strategies gather state for the save)."""
    path = Path(path)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    trainer.save_checkpoint(temporary, weights_only=False)  # full state: a stage checkpoint resumes
    if trainer.is_global_zero:
        os.replace(temporary, path)
    trainer.strategy.barrier("emolightning_checkpoint")
    return path


def trainable_parameters(pl_module: "pl.LightningModule") -> dict[str, Any]:
    """The parameters that train (LoRA weights, not a frozen base), by name."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


def find_callback(trainer: "pl.Trainer", name: str) -> Any:
    return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)


def undo_accumulation(trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> Tensor:
    """Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` in automatic
    optimization; this gives back the loss the training step returned."""
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        return loss * trainer.accumulate_grad_batches
    return loss


class StepLosses:
    """Collects each micro-batch's training loss from ``on_train_batch_end`` and hands over
    their mean once per optimizer step (once per accumulation window)."""

    def __init__(self) -> None:
        self.last_step = -1
        self._pending: list[Tensor] = []

    def observe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any) -> tuple[bool, Optional[Tensor]]:
        """Returns whether an optimizer step ended with this batch, and then the local mean loss
        of its micro-batches (``None`` if the training step returned no loss)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._pending.append(undo_accumulation(trainer, pl_module, loss.detach().float()))
        # global_step 0 at the end of a batch: the first accumulation window has not stepped yet
        if trainer.global_step == self.last_step or trainer.global_step == 0:
            return False, None
        self.last_step = trainer.global_step
        mean = torch.stack(self._pending).mean() if self._pending else None
        self._pending.clear()
        return True, mean
