"""Helpers shared by the callbacks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl

from emolightning._files import temporary_path
from emolightning.optim import EmotionalOptimizer


def lr_values(optimizer: Any) -> list[float]:
    """What a continuation stage lowers, per param group: the Emo optimizer's own
    (:meth:`~emolightning.optim.EmotionalOptimizer.lr_values`), else each group's ``lr``."""
    if isinstance(optimizer, EmotionalOptimizer):
        return list(optimizer.lr_values())
    return [float(group["lr"]) for group in optimizer.param_groups]


def lr_name(trainer: "pl.Trainer") -> str:
    """What the first optimizer calls its learning rate (``"lr"`` or ``"emoScope"``)."""
    first = trainer.optimizers[0] if trainer.optimizers else None
    return first.lr_name if isinstance(first, EmotionalOptimizer) else "lr"


def group_lrs(trainer: "pl.Trainer") -> list[list[float]]:
    return [lr_values(opt) for opt in trainer.optimizers]


def scale_lrs(trainer: "pl.Trainer", factor: float) -> None:
    """Multiply every optimizer's learning rate by ``factor`` (an Emo optimizer scales what it
    calls its learning rate, :meth:`~emolightning.optim.EmotionalOptimizer.scale_lr`), and every
    attached scheduler's ``base_lrs``, so that closed-form schedulers (LambdaLR, OneCycleLR,
    cosine restarts) do not undo the change at their next step."""
    for optimizer in trainer.optimizers:
        if isinstance(optimizer, EmotionalOptimizer):
            optimizer.scale_lr(factor)
            continue
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


def output_dir(trainer: "pl.Trainer", dirpath: Optional[Path], fallback: str) -> Path:
    """Where a callback writes: ``dirpath`` if given, else the ModelCheckpoint's folder (beside
    the other checkpoints), else ``<default_root_dir>/<fallback>``."""
    if dirpath is not None:
        return dirpath
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        return Path(checkpoint.dirpath)
    return Path(trainer.default_root_dir) / fallback


def save_checkpoint_atomically(trainer: "pl.Trainer", path: Union[str, Path]) -> Path:
    """``trainer.save_checkpoint`` to a temporary name, renamed into place on rank 0.

    Call it on every rank (some strategies gather state for the save)."""
    path = Path(path)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)  # a killed save leaves it; the next run removes it (remove_stale_partials)
    trainer.save_checkpoint(temporary, weights_only=False)  # full state: a stage checkpoint resumes
    if trainer.is_global_zero:
        os.replace(temporary, path)
    trainer.strategy.barrier("emolightning_checkpoint")
    return path


def trainable_parameters(pl_module: "pl.LightningModule") -> dict[str, Any]:
    """The parameters that train (LoRA weights, not a frozen base), by name."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
