"""The optimizer receives the (rank-mean, window-mean) loss in every Lightning precision."""

import os
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed
from emolightning.optim import EmoClan, EmoLynx, EmoNavi, EmoSens, EmoVoid


class Regression(pl.LightningModule):
    def __init__(self, optimizer_class=EmoNavi):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.optimizer_class = optimizer_class
        self.micro_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x).float(), y)
        self.micro_losses.append(loss.detach().float().item())
        return loss

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), lr=1e-2)


def _data(rank=0, n=24):
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True) * 3), batch_size=4)


class StepRecorder(pl.Callback):
    """Records, after each optimizer step, the loss the optimizer used."""

    def __init__(self):
        self.used = []
        self._last_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        snap = trainer.optimizers[0].snapshot()
        if snap.step != self._last_step:
            self._last_step = snap.step
            self.used.append(snap.loss)


def _fit(tmp_path, callbacks, **trainer_kwargs):
    module = Regression(trainer_kwargs.pop("optimizer_class", EmoNavi))
    recorder = StepRecorder()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, recorder], **trainer_kwargs)
    trainer.fit(module, _data())
    return module, recorder


@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoSens])
@pytest.mark.parametrize("callbacks", [[], [EmoLossFeed()]], ids=["closure", "feed"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_closure_and_feed_deliver_the_training_loss(tmp_path, callbacks, precision, optimizer_class):
    module, recorder = _fit(tmp_path, callbacks, precision=precision, optimizer_class=optimizer_class)
    assert len(recorder.used) == 6
    assert recorder.used == pytest.approx(module.micro_losses, rel=1e-6)


@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoLynx, EmoClan, EmoSens, EmoVoid])
def test_gradient_accumulation_uses_the_mean_of_the_window(tmp_path, optimizer_class):
    module, recorder = _fit(tmp_path, [EmoLossFeed()], accumulate_grad_batches=2,
                            optimizer_class=optimizer_class)
    windows = [module.micro_losses[i:i + 2] for i in range(0, 6, 2)]
    assert recorder.used == pytest.approx([sum(w) / 2 for w in windows], rel=1e-6)
    # the closure alone would hand over only the last micro-batch's loss, halved
    assert recorder.used != pytest.approx([w[-1] / 2 for w in windows], rel=1e-3)


@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoSens])
def test_gradscaler_path_receives_the_unscaled_loss(tmp_path, optimizer_class):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module, recorder = _fit(tmp_path, [EmoLossFeed()], plugins=[plugin], optimizer_class=optimizer_class)
    # a modest scale never overflows here, so every batch steps with its own loss
    assert recorder.used == pytest.approx(module.micro_losses, rel=1e-6)


@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoSens])
def test_gradscaler_path_with_accumulation_receives_the_window_mean(tmp_path, optimizer_class):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module, recorder = _fit(tmp_path, [EmoLossFeed()], plugins=[plugin], accumulate_grad_batches=2,
                            optimizer_class=optimizer_class)
    windows = [module.micro_losses[i:i + 2] for i in range(0, 6, 2)]
    assert recorder.used == pytest.approx([sum(w) / 2 for w in windows], rel=1e-6)


def test_gradscaler_path_without_the_feed_warns_and_stays_neutral(tmp_path):
    plugin = MixedPrecision("16-mixed", "cpu")
    with pytest.warns(RuntimeWarning, match="EmoLossFeed"):
        module, recorder = _fit(tmp_path, [], plugins=[plugin])
    assert all(loss is None for loss in recorder.used)


def test_other_optimizers_are_left_alone(tmp_path):
    class SGDRegression(Regression):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EmoLossFeed()])
    module = SGDRegression()
    trainer.fit(module, _data())
    assert trainer.global_step == 6


class RankCheck(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
        snap = trainer.optimizers[0].snapshot()
        losses = trainer.strategy.all_gather(torch.tensor([snap.loss, snap.scalar], dtype=torch.float64))
        assert torch.equal(losses[0], losses[1])
        local = torch.tensor(pl_module.micro_losses[-2:], dtype=torch.float64).mean()
        both = trainer.strategy.all_gather(local)
        assert snap.loss == pytest.approx(both.mean().item(), rel=1e-6)
        assert not torch.equal(both[0], both[1])  # the ranks really saw different losses


class PerRankData(pl.LightningDataModule):
    def train_dataloader(self):
        return _data(rank=self.trainer.global_rank)


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer_class", [EmoNavi, EmoSens])
def test_ddp_spawn_rank_mean_loss_and_identical_parameters(tmp_path, optimizer_class):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=2,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
                         accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[EmoLossFeed(), RankCheck()])
    trainer.fit(Regression(optimizer_class), datamodule=PerRankData())
    assert trainer.state.finished


_EXIT_SCRIPT = r"""
import atexit, sys
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from emolightning.callbacks import EmoLossFeed
from emolightning.optim import EmoNavi

import gc, weakref
gc.disable()  # only an explicit collection frees cycles (a DDP wrapper is one)
class Cycle:
    pass
cycle = Cycle()
cycle.me = cycle
cycle_ref = weakref.ref(cycle)
del cycle
# registered before the Trainer's setup, so it runs after the kit's exit handler (LIFO)
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(),
                              "cycle alive at exit:", cycle_ref() is not None, flush=True))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return EmoNavi(self.parameters(), lr=1e-3)

trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[EmoLossFeed()])
trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
print("group alive after fit:", dist.is_initialized(), flush=True)
"""


def test_cycles_are_freed_and_a_gloo_group_destroyed_before_the_process_exits(tmp_path):
    # a DDP wrapper freed during the interpreter's teardown sometimes aborts a finished worker
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "store")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "group alive after fit: True" in result.stdout
    assert "group alive at exit: False cycle alive at exit: False" in result.stdout
