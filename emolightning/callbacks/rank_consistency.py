"""RankConsistency: a cheap guard that the processes of a distributed run have not drifted."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from emolightning._distributed import is_sharded
from emolightning.callbacks.step import StepCallback
from emolightning.run import StepRecord, emo_optimizers


class RankConsistency(StepCallback):
    """Every N optimizer steps, check that every process holds the same trainable weights and
    the same optimizer emotion; stop with an error naming the first difference otherwise.

    Data-parallel replicas must stay identical. They drift apart silently when something
    rank-local leaks into the update (a loss that was not averaged, a rank-dependent random
    draw, a non-deterministic kernel). Each check sums every trainable parameter in float64
    (two numbers per tensor), adds the Emo optimizers' emotion state (their snapshot, extras
    included), and compares them across
    processes with one small ``all_gather``. In a single process it does nothing. Under
    sharded strategies (FSDP, DeepSpeed) each rank holds different shards, so it disables
    itself with a warning.

    Args:
        every_n_steps: check after every N optimizer steps.

    Example:
        >>> trainer = pl.Trainer(strategy="ddp", devices=2, callbacks=[RankConsistency(every_n_steps=200)])
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"RankConsistency: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.checks = 0
        self._enabled = True

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if is_sharded(trainer.strategy):
            self._enabled = False
            rank_zero_warn(f"RankConsistency is off under {type(trainer.strategy).__name__}: each rank "
                           "holds different shards of the weights, so there is nothing to compare.")

    @override
    def on_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", record: StepRecord) -> None:
        if self._enabled and trainer.world_size > 1 and record.step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def _fingerprint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[list[str], torch.Tensor]:
        names, values = [], []
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if p.requires_grad:
                    flat = p.detach().to(torch.float64).flatten()
                    names.append(f"parameter '{name}'")
                    values.append(torch.stack([flat.sum(), flat.square().sum()]).cpu())
        for index, optimizer in enumerate(emo_optimizers(trainer)):
            snap = optimizer.snapshot()
            ema = [snap.ema.get(k, 0.0) for k in ("short", "medium", "long")]
            extras = [(f"extras.{name}", value) for name, value in sorted(snap.extras.items())]
            for label, value in (("scalar", snap.scalar), ("drive", snap.drive),
                                 ("should_stop", float(snap.should_stop)), *zip(("ema.short", "ema.medium", "ema.long"), ema),
                                 *extras):
                names.append(f"optimizer {index} emotion '{label}'")
                values.append(torch.tensor([value, 0.0], dtype=torch.float64))
        return names, torch.stack(values) if values else torch.zeros(0, 2, dtype=torch.float64)

    def check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Compare now; raises ``RuntimeError`` naming the first entry that differs."""
        names, local = self._fingerprint(trainer, pl_module)
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).cpu()
        self.checks += 1
        for rank in range(1, gathered.shape[0]):
            differs = (gathered[rank] != gathered[0]).any(dim=1)
            if differs.any():
                first = int(differs.nonzero()[0])
                raise RuntimeError(
                    f"RankConsistency: at step {trainer.global_step} rank {rank} differs from rank 0 in "
                    f"{names[first]} (sum {gathered[rank][first][0].item():.17g} vs "
                    f"{gathered[0][first][0].item():.17g}). The replicas have drifted apart: check that "
                    "every rank gets the same loss (Emo optimizers: sync_loss=True), seeds and kernels.")
