"""A test-only callback: each process of a run writes what it decided and what it holds, so a test
can compare the ranks of a CLI run it started in a subprocess."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from emolightning.callbacks import PlateauContinuation, RankConsistency
from emolightning.run import emo_optimizers, undo_accumulation

STAGE_KEYS = ("stage", "start_step", "end_step", "lrs", "loss_in", "loss_out")


def _first(trainer: "pl.Trainer", kind: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


class RankRecord(Callback):
    """Writes ``rank{R}.json`` (per optimizer step: the emotion snapshot, the plateau stage, the
    local training loss; the stage history and stop reason at the end) and ``rank{R}.safetensors``
    (the final trainable weights) into ``dirpath``, on every rank.

    Args:
        dirpath: the folder the files go to.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.steps: list[dict[str, Any]] = []
        self._last_step = 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # a micro-batch inside an accumulation window: no optimizer step yet
        self._last_step = trainer.global_step
        plateau = _first(trainer, PlateauContinuation)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({
            "step": trainer.global_step,
            "stage": plateau.stage if plateau is not None else None,
            "lrs": [group["lr"] for group in trainer.optimizers[0].param_groups],
            "emotion": asdict(emo_optimizers(trainer)[0].snapshot()),
            # this rank's own last micro-batch loss: it differs between ranks, which see different images
            "local_loss": float(undo_accumulation(trainer, pl_module, loss.detach())),
        })

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        weights = {name: p.detach().cpu().contiguous() for name, p in pl_module.named_parameters() if p.requires_grad}
        save_file(weights, str(self.dirpath / f"rank{rank}.safetensors"))
        plateau = _first(trainer, PlateauContinuation)
        consistency = _first(trainer, RankConsistency)
        record = {
            "rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "strategy": type(trainer.strategy).__name__, "steps": self.steps,
            "stages": [{k: r.get(k) for k in STAGE_KEYS} for r in plateau.stages] if plateau is not None else [],
            "stop_reason": plateau.stop_reason if plateau is not None else None,
            "rank_consistency_checks": consistency.checks if consistency is not None else 0,
            "log_dir": trainer.log_dir,
        }
        (self.dirpath / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
