"""Inside a Lightning Trainer: a run resumed from a checkpoint ends exactly where an
uninterrupted run does, emotion state included."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed
from emolightning.optim import EmoClan, EmoFact, EmoLynx, EmoNavi
from tests.optim.conftest import SENS_FAMILY


class Model(pl.LightningModule):
    def __init__(self, optimizer_class):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.optimizer_class = optimizer_class

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        lr = 1.0 if self.optimizer_class in SENS_FAMILY else 1e-2  # the EmoSens family's lr is emoScope
        return self.optimizer_class(self.parameters(), lr=lr, use_shadow=True)


def _loader():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=generator)
    return DataLoader(TensorDataset(x, torch.sin(x.sum(dim=1, keepdim=True))), batch_size=8)


def _trainer(tmp_path, epochs, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accumulate_grad_batches=2, callbacks=[EmoLossFeed(), *kwargs.pop("callbacks", [])],
                      **kwargs)


@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoFact, EmoLynx, EmoClan, *SENS_FAMILY],
                         ids=lambda c: c.__name__)
def test_resume_equals_uninterrupted(tmp_path, optimizer_class):
    straight = Model(optimizer_class)
    _trainer(tmp_path / "straight", 4, enable_checkpointing=False).fit(straight, _loader())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = Model(optimizer_class)
    _trainer(tmp_path / "first", 2, callbacks=[checkpoint]).fit(first, _loader())
    ckpt_path = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    assert ckpt_path.exists()
    saved = torch.load(ckpt_path, weights_only=True)
    assert {"emo", "emo_internal"} & set(saved["optimizer_states"][0])

    resumed = Model(optimizer_class)
    trainer = _trainer(tmp_path / "resumed", 4, enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt_path)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert trainer.optimizers[0].snapshot().step == 12
