"""ShadowCheckpoint: the shadow is the right average of the trainable weights, its files are
complete and pruned, rollbacks restore it, and a resumed run continues exactly."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from emolightning.callbacks import EmoLossFeed, PlateauContinuation, ShadowCheckpoint
from emolightning.optim import EmoNavi
from emolightning.run import feed_emotion


class FrozenBase(pl.LightningModule):
    """A frozen base layer and a trainable head, like a LoRA on a frozen model."""

    def __init__(self, use_shadow=False, bad_steps=(), spike_steps=(), lr=2e-2, feed_unspiked=False):
        super().__init__()
        self.feed_unspiked = feed_unspiked
        torch.manual_seed(0)
        self.base = torch.nn.Linear(4, 8).requires_grad_(False)
        self.head = torch.nn.Linear(8, 1)
        self.use_shadow, self.bad_steps, self.spike_steps, self.lr = use_shadow, bad_steps, spike_steps, lr

    def forward(self, x):
        return self.head(torch.tanh(self.base(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        if self.feed_unspiked:  # the optimizer reads another signal, as SDLoRAModule's emotion_signal
            feed_emotion(self.trainer, loss.detach())
        if self.global_step in self.spike_steps:
            loss = loss * 1000.0
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return EmoNavi(self.head.parameters(), lr=self.lr, use_shadow=self.use_shadow)


def _loader(n=64):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, torch.sin(x.sum(dim=1, keepdim=True))), batch_size=8)


def _trainer(tmp_path, callbacks, max_epochs=3, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      num_sanity_val_steps=0, callbacks=[EmoLossFeed(), *callbacks], **kwargs)


class WeightRecorder(pl.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def test_callback_shadow_is_the_ema_of_the_trainable_weights(tmp_path):
    recorder = WeightRecorder()
    shadow = ShadowCheckpoint(decay=0.9, spike_factor=None, save_on_fit_end=False)
    module = FrozenBase()
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    _trainer(tmp_path, [recorder, shadow], max_epochs=2).fit(module, _loader())
    expected = initial
    for weights in recorder.weights:
        expected = {n: 0.9 * expected[n] + 0.1 * weights[n] for n in expected}
    assert set(shadow.shadow) == {"head.weight", "head.bias"}  # the frozen base is not copied
    for name, value in expected.items():
        torch.testing.assert_close(shadow.shadow[name], value, rtol=1e-6, atol=1e-7)


def test_files_are_complete_pruned_and_named(tmp_path):
    shadow = ShadowCheckpoint(save_every_n_steps=4, keep_last=2, spike_factor=None, dirpath=tmp_path / "sh")
    module = FrozenBase(use_shadow=True)
    trainer = _trainer(tmp_path, [shadow])
    trainer.fit(module, _loader())  # 24 steps: files at 4, 8, ..., 24
    names = sorted(p.name for p in (tmp_path / "sh").iterdir())
    assert names == ["shadow-last.safetensors", "shadow-step20.safetensors", "shadow-step24.safetensors"]
    saved = load_file(tmp_path / "sh" / "shadow-last.safetensors")
    optimizer = trainer.optimizers[0]
    for name, p in module.named_parameters():
        if p.requires_grad:  # the optimizer's own shadow was used
            assert torch.equal(saved[name], optimizer.state[p]["shadow"])
    assert "base.weight" not in saved


def test_stage_change_saves_the_shadow(tmp_path):
    plateau = PlateauContinuation(monitor="train_loss", window=4, check_every_n_steps=4, patience=1,
                                  min_delta=0.5, min_steps_per_stage=4, max_stages=1, save_stage_checkpoints=False)
    shadow = ShadowCheckpoint(spike_factor=None, dirpath=tmp_path / "sh", save_on_fit_end=False)
    _trainer(tmp_path, [plateau, shadow], max_epochs=20).fit(FrozenBase(), _loader())
    assert plateau.stage == 1
    assert (tmp_path / "sh" / "shadow-stage0.safetensors").exists()


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_rollback_restores_the_shadow_and_training_goes_on(tmp_path, kind):
    bad = {"bad_steps": (12,)} if kind == "nan" else {"spike_steps": (12,)}
    shadow = ShadowCheckpoint(decay=0.5, spike_factor=5.0, warmup_steps=5, save_on_fit_end=False)

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if shadow.rollbacks and shadow.rollbacks[-1]["step"] == trainer.global_step:
                for name, p in pl_module.named_parameters():
                    if p.requires_grad:
                        assert torch.equal(p.detach(), shadow.shadow[name])
                self.checked = True

    check = Check()
    module = FrozenBase(**bad)
    _trainer(tmp_path, [shadow, check]).fit(module, _loader())
    assert [r["step"] for r in shadow.rollbacks] == [13]
    assert ("not finite" if kind == "nan" else "x average") in shadow.rollbacks[0]["reason"]
    assert getattr(check, "checked", False)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_spikes_are_judged_on_what_the_emo_optimizer_read(tmp_path):
    """A training loss that spikes while the optimizer reads a steady signal (SDLoRAModule's
    calibrated emotion signal on a batch of high-noise timesteps) is no spike; a NaN still is."""
    shadow = ShadowCheckpoint(decay=0.5, spike_factor=5.0, warmup_steps=5, save_on_fit_end=False)
    _trainer(tmp_path, [shadow]).fit(FrozenBase(spike_steps=(12,), feed_unspiked=True), _loader())
    assert shadow.rollbacks == []
    shadow = ShadowCheckpoint(decay=0.5, spike_factor=5.0, warmup_steps=5, save_on_fit_end=False)
    _trainer(tmp_path, [shadow]).fit(FrozenBase(bad_steps=(12,), feed_unspiked=True), _loader())
    assert [r["step"] for r in shadow.rollbacks] == [13] and "not finite" in shadow.rollbacks[0]["reason"]


def test_a_resumed_average_of_another_loss_starts_afresh(tmp_path):
    """State from a checkpoint whose average is of the training loss (written before spikes were
    judged on what the Emo optimizer read) is not compared with the optimizer's signal."""
    old = ShadowCheckpoint(spike_factor=3.0, warmup_steps=0).state_dict()
    old.update(loss_average=1e-4, loss_steps=100)
    del old["judged"]
    shadow = ShadowCheckpoint(spike_factor=3.0, warmup_steps=0, save_on_fit_end=False)
    shadow.load_state_dict(old)
    assert shadow.judged == "train_loss"
    _trainer(tmp_path, [shadow], max_epochs=1).fit(FrozenBase(feed_unspiked=True), _loader())
    assert shadow.rollbacks == [] and shadow.judged == "emotion" and shadow.loss_steps == 8


def test_too_many_rollbacks_stop_with_a_clear_error(tmp_path):
    shadow = ShadowCheckpoint(max_rollbacks=1, save_on_fit_end=False)
    with pytest.raises(RuntimeError, match="exceed max_rollbacks=1"):
        _trainer(tmp_path, [shadow]).fit(FrozenBase(bad_steps=(3, 6)), _loader())


def test_evaluate_swaps_the_shadow_in_for_validation_only(tmp_path):
    shadow = ShadowCheckpoint(decay=0.8, evaluate=True, monitor="val_loss", spike_factor=None,
                              dirpath=tmp_path / "sh", save_on_fit_end=False)

    class ValCheck(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            # runs after the shadow callback's own hook: the weights now are the shadow
            self.values = []
            assert torch.equal(pl_module.head.weight.detach(), shadow.shadow["head.weight"])
            self.swapped = getattr(self, "swapped", 0) + 1

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.values.append(torch.nn.functional.mse_loss(pl_module(x), y).item())

    check = ValCheck()
    module = FrozenBase()
    trainer = _trainer(tmp_path, [shadow, check], max_epochs=2)
    trainer.fit(module, _loader(), _loader(16))
    assert check.swapped == 2
    live = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert not torch.equal(live["head.weight"], shadow.shadow["head.weight"])  # live weights came back
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(sum(check.values) / len(check.values), rel=1e-5)
    assert (tmp_path / "sh" / "shadow-best.safetensors").exists()


def test_resume_continues_the_shadow_exactly(tmp_path):
    straight = ShadowCheckpoint(decay=0.9, spike_factor=4.0, warmup_steps=3, save_on_fit_end=False)
    module = FrozenBase()
    _trainer(tmp_path / "a", [straight], max_epochs=4).fit(module, _loader())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "b", [ShadowCheckpoint(decay=0.9, spike_factor=4.0, warmup_steps=3, save_on_fit_end=False),
                              checkpoint], max_epochs=2, enable_checkpointing=True).fit(FrozenBase(), _loader())
    resumed_cb = ShadowCheckpoint(decay=0.9, spike_factor=4.0, warmup_steps=3, save_on_fit_end=False)
    resumed = FrozenBase()
    _trainer(tmp_path / "c", [resumed_cb], max_epochs=4).fit(resumed, _loader(),
                                                             ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt")
    for name in straight.shadow:
        assert torch.equal(straight.shadow[name], resumed_cb.shadow[name])
    for a, b in zip(module.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_cb.loss_average == straight.loss_average


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="decay"):
        ShadowCheckpoint(decay=1.0)
    with pytest.raises(ValueError, match="spike_factor"):
        ShadowCheckpoint(spike_factor=0.5)


def test_rollback_to_the_optimizers_own_shadow_keeps_training(tmp_path):
    # the optimizer keeps the shadow: the weights come back from it, its moments start afresh
    # and its shadow stays (a state holding only the shadow must still get fresh moments)
    shadow = ShadowCheckpoint(spike_factor=None, warmup_steps=5, save_on_fit_end=False)
    module = FrozenBase(use_shadow=True, bad_steps=(12,))

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if shadow.rollbacks and shadow.rollbacks[-1]["step"] == trainer.global_step:
                optimizer = trainer.optimizers[0]
                for p in pl_module.head.parameters():
                    assert torch.equal(p.detach(), optimizer.state[p]["shadow"])
                    assert not optimizer.state[p]["exp_avg"].any()
                self.checked = True

    check = Check()
    _trainer(tmp_path, [shadow, check]).fit(module, _loader())
    assert [r["step"] for r in shadow.rollbacks] == [13] and getattr(check, "checked", False)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_resumed_run_prunes_only_its_own_files(tmp_path):
    # the first run writes beside its checkpoints; its resumption elsewhere (as a new version folder)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "first", save_last=True)
    first = ShadowCheckpoint(save_every_n_steps=4, keep_last=2, spike_factor=None, save_on_fit_end=False)
    _trainer(tmp_path, [first, checkpoint], max_epochs=2, enable_checkpointing=True).fit(FrozenBase(), _loader())
    shadows = sorted(p.name for p in (tmp_path / "first").glob("shadow-*"))
    assert shadows == ["shadow-step12.safetensors", "shadow-step16.safetensors"]
    resumed = ShadowCheckpoint(save_every_n_steps=4, keep_last=2, spike_factor=None, save_on_fit_end=False)
    _trainer(tmp_path / "second", [resumed], max_epochs=4).fit(FrozenBase(), _loader(),
                                                              ckpt_path=tmp_path / "first" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "first").glob("shadow-*")) == shadows  # left alone
    assert sorted(p.name for p in (tmp_path / "second" / "shadow").iterdir()) == [
        "shadow-step28.safetensors", "shadow-step32.safetensors"]
    assert len(resumed.written) == 4  # the summary still lists the first run's files
