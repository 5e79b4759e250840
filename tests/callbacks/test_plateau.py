"""PlateauContinuation: stages advance, the LR drops (with or without a scheduler), training
stops after the last stage, resumes exactly, and every rank agrees."""

import os
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed, PlateauContinuation, ShadowCheckpoint
from emolightning.optim import EmoNavi, EmoPulseScheduler, EmoSens
from emolightning.run import feed_emotion

LR = 5e-2
SCOPE = 8.0  # emoScope for the EmoSens family: emoPulse from 8e-4 up to 2.4e-2


class NoisyRegression(pl.LightningModule):
    """A linear model on noisy targets: the loss falls, then sits on the noise floor."""

    def __init__(self, optimizer="emonavi", scheduler=False, near_solution=False):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 1)
        if near_solution:  # start on the noise floor, so the loss is flat from the first step
            with torch.no_grad():
                self.layer.weight.copy_(torch.linspace(-1, 1, 6).unsqueeze(0))
                self.layer.bias.zero_()
        self.optimizer_name, self.use_scheduler = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        elif self.optimizer_name == "emosens":
            optimizer = EmoSens(self.parameters(), lr=SCOPE)  # lr is emoScope
        else:
            optimizer = EmoNavi(self.parameters(), lr=LR)
        if not self.use_scheduler:
            return optimizer
        if self.use_scheduler == "emopulse":
            scheduler = EmoPulseScheduler(optimizer, base_lr=SCOPE, notify=False)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": constant, "interval": "step"}}


def _loader(rank=0, batch_size=8):
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 6, generator=generator)
    y = x @ torch.linspace(-1, 1, 6).unsqueeze(1) + 0.3 * torch.randn(64, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _plateau(**kwargs):
    options = dict(monitor="train_loss", window=4, check_every_n_steps=4, patience=2, min_delta=0.02,
                   min_steps_per_stage=8, lr_factor=0.5, max_stages=2)
    options.update(kwargs)
    return PlateauContinuation(**options)


def _trainer(tmp_path, callbacks, max_epochs=200, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      callbacks=[EmoLossFeed(), *callbacks], **kwargs)


@pytest.mark.parametrize("optimizer, scheduler", [("emonavi", False), ("emonavi", True), ("adamw", True)])
def test_stages_advance_lr_drops_and_training_stops(tmp_path, optimizer, scheduler):
    callback = _plateau()
    module = NoisyRegression(optimizer, scheduler)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, _loader())
    assert callback.stage == 2
    assert callback.stop_reason and "last stage (2)" in callback.stop_reason
    assert trainer.global_step < 200 * 8  # stopped by the callback, not by max_epochs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.25)
    if scheduler:  # the closed-form scheduler did not undo the change
        assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(LR * 0.25)]
    starts = [record["start_step"] for record in callback.stages]
    assert starts[0] == 0 and starts[1] < starts[2] < trainer.global_step + 1
    assert all(b - a >= 8 for a, b in zip(starts, starts[1:]))
    saved = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert len(saved) == 3 and all(name.endswith(".ckpt") for name in saved)
    checkpoint = torch.load(tmp_path / "stages" / saved[0], weights_only=True)
    assert checkpoint["global_step"] == callback.stages[0]["end_step"]


@pytest.mark.parametrize("optimizer, scheduler", [("emosens", False), ("adamw", "emopulse")])
def test_stages_lower_emoscope_for_the_emosens_family(tmp_path, optimizer, scheduler):
    callback = _plateau()
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(NoisyRegression(optimizer, scheduler), _loader())
    assert callback.stage == 2 and callback.stop_reason
    if optimizer == "emosens":
        emosens = trainer.optimizers[0]
        assert callback.lr_name == "emoScope"
        assert [record["lrs"][0][0] for record in callback.stages] == [SCOPE, SCOPE / 2, SCOPE / 4]
        assert emosens.emoScope == SCOPE / 4
        # group lr shows the emoPulse of the last step, within the lowered scope's bounds
        assert emosens.param_groups[0]["lr"] == emosens.last_pulse <= SCOPE / 4 * 3e-3
        assert "emoScope" in [column.header for column in callback.summary_table().columns]
    else:  # the scheduler's emoScope is lowered through its base_lrs
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert scheduler.emoScope == SCOPE / 4
        assert trainer.optimizers[0].param_groups[0]["lr"] == scheduler.last_pulse <= 3e-3


def test_lrs_list_sets_each_stage(tmp_path):
    callback = _plateau(lrs=[1e-2, 2e-3], save_stage_checkpoints=False)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(NoisyRegression(), _loader())
    assert [record["lrs"][0][0] for record in callback.stages] == pytest.approx([LR, 1e-2, 2e-3])
    assert not (tmp_path / "stages").exists()


class EmotionAtStageChange(pl.Callback):
    def __init__(self, plateau):
        self.plateau, self.seen = plateau, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.seen) < self.plateau.stage:
            self.seen.append(trainer.optimizers[0].snapshot())


def test_should_stop_signal_starts_a_stage_and_resets_the_emotion(tmp_path):
    callback = PlateauContinuation(monitor="should_stop", check_every_n_steps=1, min_steps_per_stage=0,
                                   max_stages=1, save_stage_checkpoints=False)
    spy = EmotionAtStageChange(callback)
    trainer = _trainer(tmp_path, [callback, spy], max_epochs=400)
    trainer.fit(NoisyRegression(near_solution=True), _loader(batch_size=64))  # flat, smooth loss
    assert callback.stage == 1 and callback.stop_reason is not None
    assert spy.seen and not spy.seen[0].should_stop and spy.seen[0].ema == {}  # reset at the change
    assert callback.stages[1]["start_step"] >= 32


def test_cooldown_ignores_the_checks_after_a_change(tmp_path):
    quick, patient = _plateau(max_stages=1), _plateau(max_stages=1, cooldown=3)
    # a flat loss: each stage ends as soon as the rules allow
    _trainer(tmp_path / "quick", [quick]).fit(NoisyRegression(near_solution=True), _loader(batch_size=64))
    _trainer(tmp_path / "patient", [patient]).fit(NoisyRegression(near_solution=True), _loader(batch_size=64))
    assert quick.stages[1]["start_step"] == patient.stages[1]["start_step"]  # same first stage
    quick_length = quick.stages[1]["end_step"] - quick.stages[1]["start_step"]
    patient_length = patient.stages[1]["end_step"] - patient.stages[1]["start_step"]
    # checks every 4 steps, patience 2: without cooldown the first check sets the best and two
    # more end the stage; with cooldown 3, three checks are ignored and two more end it
    assert quick_length == (1 + 2) * 4
    assert patient_length == (3 + 2) * 4


def test_keeping_the_emotion_clears_only_should_stop(tmp_path):
    callback = PlateauContinuation(monitor="should_stop", check_every_n_steps=1, min_steps_per_stage=0,
                                   max_stages=1, reset_emotion=False, save_stage_checkpoints=False)
    spy = EmotionAtStageChange(callback)
    _trainer(tmp_path, [callback, spy], max_epochs=400).fit(NoisyRegression(near_solution=True), _loader(batch_size=64))
    assert callback.stage == 1
    assert not spy.seen[0].should_stop and spy.seen[0].ema  # averages kept, the flag cleared


def test_should_stop_of_an_emopulse_scheduler_starts_a_stage(tmp_path):
    """AdamW driven by EmoPulseScheduler: the scheduler's should_stop ends the stage, its emoScope
    is lowered and its emotion reset."""
    seen = []

    class SchedulerAtStageChange(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            if callback.stage and not seen:
                seen.append((scheduler.should_stop, scheduler.emoScope))

    class QuietAdamW(NoisyRegression):  # the noise floor (MSE ~0.09) under the scheduler's stopcoef
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
            scheduler = EmoPulseScheduler(optimizer, base_lr=SCOPE, stopcoef=0.2, notify=False)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    callback = PlateauContinuation(monitor="should_stop", check_every_n_steps=1, min_steps_per_stage=0,
                                   max_stages=1, save_stage_checkpoints=False)
    trainer = _trainer(tmp_path, [callback, SchedulerAtStageChange()], max_epochs=400)
    trainer.fit(QuietAdamW("adamw", near_solution=True), _loader(batch_size=64))
    assert callback.stage == 1 and callback.stop_reason is not None
    assert seen == [(False, SCOPE / 2)]  # reset and halved at the change
    assert trainer.lr_scheduler_configs[0].scheduler.should_stop  # and quiet again at the end


def test_should_stop_needs_an_emo_optimizer(tmp_path):
    trainer = _trainer(tmp_path, [PlateauContinuation()], max_epochs=1)
    with pytest.raises(ValueError, match="needs an Emo optimizer"):
        trainer.fit(NoisyRegression("adamw"), _loader())


@pytest.mark.parametrize("kwargs, message", [({"lr_factor": 1.5}, "lr_factor"), ({"mode": "up"}, "mode"),
                                             ({"patience": 0}, "patience"), ({"lrs": []}, "lrs"),
                                             ({"check_every_n_steps": 0}, "check_every_n_steps")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlateauContinuation(**kwargs)


def _epoch_plateau():
    return _plateau(check_every_n_steps=None, window=8, patience=2, min_steps_per_stage=16, max_stages=2)


def test_resume_mid_stage_and_right_after_a_stage_change(tmp_path):
    straight_cb = _epoch_plateau()
    straight = NoisyRegression()
    _trainer(tmp_path / "straight", [straight_cb], max_epochs=60).fit(straight, _loader())
    assert straight_cb.stage == 2
    change_epoch = straight_cb.stages[1]["start_step"] // 8 - 1  # the epoch whose end changed stage
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "first", [_epoch_plateau(), checkpoint], max_epochs=60,
             enable_checkpointing=True).fit(NoisyRegression(), _loader())
    for epoch in (change_epoch - 1, change_epoch):  # mid-stage 0, and right after the change
        path = tmp_path / "ckpt" / f"epoch={epoch}-step={(epoch + 1) * 8}.ckpt"
        resumed_cb = _epoch_plateau()
        resumed = NoisyRegression()
        trainer = _trainer(tmp_path / f"resumed{epoch}", [resumed_cb], max_epochs=60)
        trainer.fit(resumed, _loader(), ckpt_path=path)
        for a, b in zip(straight.parameters(), resumed.parameters()):
            assert torch.equal(a, b)
        assert resumed_cb.stage == straight_cb.stage
        assert [r["start_step"] for r in resumed_cb.stages] == [r["start_step"] for r in straight_cb.stages]
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.25)


class RankAgreement(pl.Callback):
    def __init__(self, plateau):
        self.plateau = plateau

    def on_train_end(self, trainer, pl_module):
        starts = torch.tensor([r["start_step"] for r in self.plateau.stages], dtype=torch.float64)
        both = trainer.strategy.all_gather(starts)
        assert torch.equal(both[0], both[1]), "ranks changed stage on different steps"
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1])
        assert self.plateau.stage == 2
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            files = sorted(os.listdir(trainer.default_root_dir + "/stages"))
            assert len(files) == 3 and not any(name.endswith(".partial") for name in files), files
            shadows = sorted(os.listdir(trainer.default_root_dir + "/shadow"))
            assert shadows == ["shadow-stage0.safetensors", "shadow-stage1.safetensors"], shadows
        shadow = next(cb for cb in trainer.callbacks if isinstance(cb, ShadowCheckpoint))
        mine = torch.cat([t.flatten() for t in shadow.shadow.values()])
        gathered = trainer.strategy.all_gather(mine)
        assert torch.equal(gathered[0], gathered[1]), "the shadow differs across ranks"


class PerRankData(pl.LightningDataModule):
    def train_dataloader(self):
        return _loader(rank=self.trainer.global_rank)


@pytest.mark.distributed
def test_ddp_ranks_change_stage_together(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    callback = _plateau()
    trainer = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=200, accelerator="cpu", devices=2,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[EmoLossFeed(), callback, ShadowCheckpoint(save_on_fit_end=False),
                                    RankAgreement(callback)])
    trainer.fit(NoisyRegression(), datamodule=PerRankData())
    assert trainer.state.finished


def _batch_plateau(**kwargs):
    # checks at the last batch of an epoch (8 batches of 8), so every stage checkpoint is taken
    # at an epoch's end: a plain DataLoader cannot resume in the middle of an epoch
    return _plateau(check_every_n_steps=8, window=8, patience=1, min_steps_per_stage=16, **kwargs)


@pytest.mark.parametrize("stage_file", [0, 1])
def test_a_stage_checkpoint_resumes_into_the_new_stage(tmp_path, stage_file):
    straight_cb = _batch_plateau(dirpath=tmp_path / "stages")
    straight = NoisyRegression()
    _trainer(tmp_path / "straight", [straight_cb], max_epochs=60).fit(straight, _loader())
    assert straight_cb.stage == 2 and straight_cb.stop_reason is not None
    record = straight_cb.stages[stage_file]
    resumed_cb = _batch_plateau(dirpath=tmp_path / "resumed-stages")
    resumed = NoisyRegression()
    trainer = _trainer(tmp_path / "resumed", [resumed_cb], max_epochs=60)

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.stage, self.lr = resumed_cb.stage, trainer.optimizers[0].param_groups[0]["lr"]

    at_start = AtStart()
    trainer.callbacks.append(at_start)
    trainer.fit(resumed, _loader(), ckpt_path=record["checkpoint"])
    assert at_start.stage == stage_file + 1  # the run resumes in the stage that began at that step
    assert at_start.lr == pytest.approx(LR * 0.5 ** (stage_file + 1))
    assert [r["start_step"] for r in resumed_cb.stages] == [r["start_step"] for r in straight_cb.stages]
    assert resumed_cb.stop_reason == straight_cb.stop_reason
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_finished_run_resumed_from_its_last_checkpoint_stops_at_once(tmp_path, caplog):
    first = _batch_plateau()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "first", [first, checkpoint], max_epochs=60, enable_checkpointing=True).fit(
        NoisyRegression(), _loader())
    assert first.stop_reason is not None
    finished_at = first.stages[-1]["end_step"]
    again = _batch_plateau()
    module = NoisyRegression()
    trainer = _trainer(tmp_path / "again", [again], max_epochs=60)
    with caplog.at_level("INFO"):
        trainer.fit(module, _loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == finished_at  # not one step more
    assert again.stop_reason == first.stop_reason
    assert "already finished" in caplog.text and first.stop_reason in caplog.text


class FlatSignal(NoisyRegression):
    """Learns (its training loss falls) but feeds the optimizers a flat signal of its own."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        feed_emotion(self.trainer, torch.tensor(1.0))
        return loss


def test_emotion_loss_judges_what_the_optimizer_read(tmp_path):
    by_signal, by_loss = _plateau(monitor="emotion_loss", max_stages=1), _plateau(max_stages=1)
    _trainer(tmp_path / "signal", [by_signal]).fit(FlatSignal(), _loader())
    _trainer(tmp_path / "loss", [by_loss]).fit(FlatSignal(), _loader())
    # the flat signal: best at the first check (step 4), two checks without improvement
    assert by_signal.stages[1]["start_step"] == 12
    assert by_loss.stages[1]["start_step"] > 12  # the falling training loss kept improving
    assert list(by_signal.state_dict()["emotion_losses"]) == [1.0] * len(by_signal.emotion_losses)
    with pytest.raises(ValueError, match="monitor='emotion_loss'.*needs an Emo optimizer"):
        _trainer(tmp_path / "adamw", [_plateau(monitor="emotion_loss")], max_epochs=1).fit(
            NoisyRegression("adamw"), _loader())


def test_the_stage_table_shows_the_judged_value_beside_the_loss(tmp_path):
    by_signal = _plateau(monitor="emotion_loss", max_stages=1)
    _trainer(tmp_path, [by_signal]).fit(FlatSignal(), _loader())
    table = by_signal.summary_table()
    headers = [column.header for column in table.columns]
    assert headers[-2:] == ["emotion_loss at entry", "best emotion_loss"]
    # the flat signal the optimizer read is 1.0 in every stage
    assert list(table.columns[-2].cells) == list(table.columns[-1].cells) == ["1", "1"]
    assert all(stage["monitor_in"] == stage["monitor_best"] == 1.0 for stage in by_signal.stages)
    plain = _plateau(max_stages=1)  # judged by the training loss: no extra columns
    assert [column.header for column in plain.summary_table().columns][-1] == "loss at exit"
