"""EmoPulseScheduler against the spec's S10, its state and its Lightning use."""

import io

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed
from emolightning.optim import EmoPulseScheduler
from tests.optim.pulse_vectors import S5_LOSSES, S10_PULSES


def _sgd():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    return p, torch.optim.SGD([p], lr=0.123)


def test_s10_pulses_and_the_absolute_cap():
    p, sgd = _sgd()
    scheduler = EmoPulseScheduler(sgd, base_lr=10.0, notify=False)
    assert sgd.param_groups[0]["lr"] == 10.0 * 1e-4  # set at construction (the reference leaves 0.123)
    returned = []
    for loss in S5_LOSSES:
        p.grad = torch.ones(3, dtype=torch.float64)
        sgd.step()
        returned.append(scheduler.step(loss))
    assert returned == S10_PULSES  # 3e-3 at most, whatever base_lr
    assert sgd.param_groups[0]["lr"] == 0.003 and scheduler.get_last_lr() == [0.003]
    assert scheduler.last_pulse == 0.003 and not scheduler.should_stop


def test_fed_losses_and_a_missing_loss():
    p, sgd = _sgd()
    scheduler = EmoPulseScheduler(sgd, base_lr=10.0, notify=False)
    for loss in S5_LOSSES[:8]:
        scheduler.feed_loss(loss)
        scheduler.feed_loss(torch.tensor(loss))
        scheduler.step()
    assert scheduler.last_pulse == S10_PULSES[7]
    with pytest.warns(RuntimeWarning, match="received no loss"):
        scheduler.step()
    assert sgd.param_groups[0]["lr"] == S10_PULSES[7]
    scheduler.step(float("nan"))  # skipped
    assert sgd.param_groups[0]["lr"] == S10_PULSES[7]


@pytest.mark.parametrize("layout", ["ours", "reference"])
def test_state_round_trip(layout):
    p, sgd = _sgd()
    straight = EmoPulseScheduler(sgd, base_lr=10.0, notify=False)
    for loss in S5_LOSSES:
        straight.step(loss)
    p, sgd = _sgd()
    first = EmoPulseScheduler(sgd, base_lr=10.0, notify=False)
    for loss in S5_LOSSES[:6]:
        first.step(loss)
    state = first.state_dict()
    if layout == "reference":  # what the reference's scheduler writes
        state = {"emo_internal": {k: state["emo_internal"][k] for k in
                                  ("emoScope", "dNR_hist", "noise_est", "d_est", "c_est", "should_stop", "stopcoef")},
                 "scheduler_state": state["scheduler_state"]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    p, sgd = _sgd()
    second = EmoPulseScheduler(sgd, base_lr=1.0, notify=False)
    second.load_state_dict(loaded)
    assert second.emoScope == 10.0 and sgd.param_groups[0]["lr"] == S10_PULSES[5]
    for loss in S5_LOSSES[6:]:
        second.step(loss)
    assert second.last_pulse == straight.last_pulse
    assert second.state_dict()["scheduler_state"] == straight.state_dict()["scheduler_state"]


def test_scaling_base_lrs_scales_emoscope():
    _, sgd = _sgd()
    scheduler = EmoPulseScheduler(sgd, base_lr=2.0, notify=False)
    assert scheduler.base_lrs == [2.0]
    scheduler.base_lrs = [lr * 0.5 for lr in scheduler.base_lrs]
    assert scheduler.emoScope == 1.0
    scheduler.step(1.0)
    assert sgd.param_groups[0]["lr"] == 1.0 * 1e-4


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters())
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": EmoPulseScheduler(optimizer, notify=False), "interval": "step"}}


def test_in_lightning_the_loss_feed_reaches_the_scheduler(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
    module = Regression()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=2, callbacks=[EmoLossFeed()])
    trainer.fit(module, loader)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    windows = [sum(module.losses[i:i + 2]) / 2 for i in range(0, 8, 2)]
    assert scheduler.last_loss == pytest.approx(windows[-1], rel=1e-6)  # the window's mean
    assert scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == scheduler.last_pulse
