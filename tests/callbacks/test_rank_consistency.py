"""RankConsistency: silent in agreement, a clear error naming the first drifted parameter."""

import os
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed, RankConsistency
from emolightning.optim import EmoNavi, EmoSens


class Model(pl.LightningModule):
    def __init__(self, optimizer_class=EmoNavi):
        super().__init__()
        self.optimizer_class = optimizer_class
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.encoder(x))), y)

    def configure_optimizers(self):
        if self.optimizer_class is EmoSens:
            return EmoSens(self.parameters(), lr=1.0)  # lr is emoScope
        return EmoNavi(self.parameters(), lr=1e-2)


class PerRankData(pl.LightningDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.trainer.global_rank)
        x = torch.randn(32, 4, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


class Perturb(pl.Callback):
    """Nudges one weight on rank 1 only, as a rank-local bug would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 3:
            with torch.no_grad():
                pl_module.head.bias.add_(1e-6)


class CountChecks(pl.Callback):
    def __init__(self, guard):
        self.guard = guard

    def on_train_end(self, trainer, pl_module):
        assert self.guard.checks == 4  # steps 2, 4, 6, 8


class RecordedRankConsistency(RankConsistency):
    """Writes each rank's error to a file before raising it: when one process fails, the other may
    be torn down mid-collective (SIGABRT), so what the parent process sees depends on timing."""

    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def check(self, trainer, pl_module):
        try:
            super().check(trainer, pl_module)
        except RuntimeError as error:
            (self.folder / f"rank{trainer.global_rank}.txt").write_text(str(error))
            raise


def _fit(tmp_path, callbacks, optimizer_class=EmoNavi):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=2,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(Model(optimizer_class), datamodule=PerRankData())
    return trainer


@pytest.mark.distributed
def test_agreeing_ranks_pass_and_a_drift_is_named(tmp_path):
    guard = RankConsistency(every_n_steps=2)
    trainer = _fit(tmp_path / "ok", [EmoLossFeed(), guard, CountChecks(guard)])
    assert trainer.state.finished
    with pytest.raises(Exception):
        _fit(tmp_path / "drift", [EmoLossFeed(), RecordedRankConsistency(tmp_path, every_n_steps=2), Perturb()])
    messages = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert messages and all("rank 1 differs from rank 0 in parameter 'head.bias'" in m for m in messages)


@pytest.mark.distributed
def test_the_emosens_family_agrees_across_ranks_emopulse_included(tmp_path):
    guard = RankConsistency(every_n_steps=2)
    trainer = _fit(tmp_path, [EmoLossFeed(), guard, CountChecks(guard)], optimizer_class=EmoSens)
    assert trainer.state.finished  # parameters, snapshot and extras (emoPulse, trust, ...) compared


def test_single_process_does_nothing(tmp_path):
    guard = RankConsistency(every_n_steps=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[guard])
    x = torch.randn(16, 4)
    trainer.fit(Model(), DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4))
    assert guard.checks == 0


def test_bad_interval_is_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        RankConsistency(every_n_steps=0)
