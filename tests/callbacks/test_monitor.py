"""EmotionMonitor: per-step emotion in TensorBoard and CSV logs, and the end-of-fit plot."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed, EmotionMonitor, PlateauContinuation, ShadowCheckpoint
from emolightning.optim import EmoLynx, EmoSens
from emolightning.run import feed_emotion


class Model(pl.LightningModule):
    def __init__(self, emo=True, optimizer_class=EmoLynx):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.emo, self.optimizer_class = emo, optimizer_class

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        if self.emo and self.optimizer_class is EmoSens:
            return EmoSens(self.parameters(), lr=4.0)  # lr is emoScope
        if self.emo:
            return EmoLynx(self.parameters(), lr=2e-2)
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.3 * torch.randn(64, 1, generator=generator)),
                      batch_size=8)


def _fit(tmp_path, logger, callbacks, module=None, epochs=6):
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, callbacks=[EmoLossFeed(), *callbacks])
    trainer.fit(module or Model(), _loader())
    return trainer


def _assert_png(path):
    assert path.exists()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert not list(path.parent.glob("*.partial"))


def test_csv_logger_gets_every_step_and_the_plot_is_written(tmp_path):
    monitor = EmotionMonitor()
    plateau = PlateauContinuation(monitor="train_loss", window=4, check_every_n_steps=4, patience=1,
                                  min_delta=0.5, min_steps_per_stage=8, max_stages=1, save_stage_checkpoints=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _fit(tmp_path, logger, [monitor, plateau, ShadowCheckpoint(save_on_fit_end=False)])
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    scalars = [row for row in rows if row.get("emotion/scalar")]
    assert len(scalars) == trainer.global_step
    assert {"emotion/drive", "emotion/effective_lr", "emotion/blend_ratio", "emotion/should_stop",
            "plateau/stage", "shadow/rollbacks"} <= set(rows[0])
    assert {float(row["plateau/stage"]) for row in scalars} == {0.0, 1.0}
    assert all(float(row["emotion/effective_lr"]) == pytest.approx(float(row["emotion/lr"]) * float(row["emotion/drive"]))
               for row in scalars)
    _assert_png(monitor.plot_path)
    assert monitor.plot_path.parent == type(monitor.plot_path)(logger.log_dir)


def test_tensorboard_logger_gets_the_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(tmp_path, logger, [EmotionMonitor()])
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"emotion/scalar", "emotion/drive", "emotion/lr", "emotion/loss"} <= tags
    assert len(events.Scalars("emotion/drive")) == trainer.global_step


def test_the_emosens_family_logs_emopulse_and_its_estimates(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _fit(tmp_path, logger, [EmotionMonitor()], module=Model(optimizer_class=EmoSens), epochs=2)
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("emotion/emoPulse")]
    assert len(rows) == trainer.global_step
    assert {"emotion/trust", "emotion/noise_est", "emotion/d_est", "emotion/emoScope"} <= set(rows[0])
    # the optimizer's lr is the emoPulse it used
    assert all(float(row["emotion/lr"]) == float(row["emotion/emoPulse"]) for row in rows)
    assert len({row["emotion/emoPulse"] for row in rows}) > 1


def test_other_optimizers_log_lr_and_loss_only(tmp_path):
    monitor = EmotionMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, logger, [monitor], module=Model(emo=False), epochs=2)
    with open(logger.log_dir + "/metrics.csv") as handle:
        columns = set(next(csv.DictReader(handle)))
    assert {"emotion/lr", "emotion/loss"} <= columns and "emotion/scalar" not in columns
    _assert_png(monitor.plot_path)


def test_without_a_logger_the_plot_still_lands_in_the_root_dir(tmp_path):
    monitor = EmotionMonitor()
    _fit(tmp_path, False, [monitor], epochs=1)
    assert monitor.plot_path == tmp_path / "emotion.png"
    _assert_png(monitor.plot_path)


@pytest.mark.distributed
def test_under_ddp_the_plot_and_summary_come_from_rank_zero_without_a_hang(tmp_path, capfd):
    import os
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from emolightning.callbacks import RunSummary

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", devices=2,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                         logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         callbacks=[EmoLossFeed(), EmotionMonitor(), RunSummary()])
    trainer.fit(Model(), _loader())
    log_dir = tmp_path / "csv" / "version_0"
    _assert_png(log_dir / "emotion.png")
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["version_0"]
    out = capfd.readouterr().out
    assert out.count("Run finished at step 4: outputs") == 1 and "logs (metrics.csv)" in out


def test_with_gradient_accumulation_only_optimizer_steps_count(tmp_path):
    class Losses(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]) * 2)  # Lightning divides by accumulate_grad_batches

    monitor, losses = EmotionMonitor(), Losses()
    plateau = PlateauContinuation(monitor="train_loss", window=8, check_every_n_steps=None, max_stages=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=2,
                         callbacks=[EmoLossFeed(), monitor, plateau, losses,
                                    ShadowCheckpoint(save_every_n_steps=2, save_on_fit_end=False, dirpath=tmp_path)])
    trainer.fit(Model(), _loader())  # 8 batches: 4 optimizer steps
    assert monitor.history["step"] == [1.0, 2.0, 3.0, 4.0]
    assert sorted(p.name for p in tmp_path.glob("shadow-*")) == ["shadow-step2.safetensors", "shadow-step4.safetensors"]
    # each window's loss is the mean of its two micro-batches
    pairs = [(losses.losses[i] + losses.losses[i + 1]) / 2 for i in range(0, 8, 2)]
    assert list(plateau.losses) == pytest.approx(pairs, rel=1e-6)


class FedSignal(Model):
    """Feeds the optimizer a signal of its own (here the loss's square root) instead of the loss."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        feed_emotion(self.trainer, loss.detach().sqrt())
        return loss


def test_a_fed_signal_is_recorded_and_plotted_beside_the_training_loss(tmp_path):
    monitor = EmotionMonitor()
    _fit(tmp_path, None, [monitor], module=FedSignal(), epochs=1)
    history = monitor.history
    assert len(history["train_loss"]) == len(history["loss"]) == 8
    assert history["loss"] == pytest.approx([v ** 0.5 for v in history["train_loss"]], rel=1e-6)
    _assert_png(monitor.plot_path)
    # a checkpoint of an older version, without the training-loss series, still plots
    old = {key: values for key, values in history.items() if key != "train_loss"}
    restored = EmotionMonitor()
    restored.load_state_dict({"history": old})
    assert len(restored.history["train_loss"]) == 8
    _assert_png(restored.write_plot(tmp_path / "old.png"))
