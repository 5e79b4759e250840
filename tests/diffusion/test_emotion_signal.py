"""The emotion signal: the per-timestep-bin baseline's maths, stratified timesteps, what the
optimizer is fed, identical across processes, and continued exactly by a resume."""

import math
import os
from datetime import timedelta
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from emolightning.batch import tokenize
from emolightning.callbacks import EmoLossFeed
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.emotion_signal import EmotionSignal, TimestepBaseline
from emolightning.diffusion.noise import sample_timesteps
from emolightning.optim import EmoNavi


def _reference_baseline(history, bins, horizon, num_train_timesteps=1000):
    """Each bin's decayed mean written out as the sum over the whole history (not recursively)."""
    keep = 1.0 - 1.0 / horizon
    n = len(history)
    sums, counts = [0.0] * bins, [0.0] * bins
    for k, (losses, timesteps) in enumerate(history):
        weight = keep ** (n - 1 - k)
        for loss, t in zip(losses, timesteps):
            b = min(int(t) * bins // num_train_timesteps, bins - 1)
            sums[b] += weight * float(loss)
            counts[b] += weight
    return sums, counts


def test_the_baseline_is_each_bins_decayed_mean_and_ratios_use_it_from_before_the_batch():
    generator = torch.Generator().manual_seed(0)
    baseline = TimestepBaseline(1000, bins=5, horizon=7.0, min_count=1.5)
    history, reference = [], None
    for _ in range(30):
        timesteps = torch.randint(0, 1000, (3,), generator=generator)
        losses = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
        sums, counts = _reference_baseline(history, 5, 7.0)
        means = [s / c if c >= 1.5 else None for s, c in zip(sums, counts)]
        if reference is None and None not in means:  # every bin has a baseline: the level is kept
            reference = sum(means) / len(means)
        scale = 1.0 if reference is None else sum(means) / len(means) / reference
        ratios = baseline.relative(losses, timesteps)
        calibrated = baseline.observe(losses, timesteps)
        for ratio, value, loss, t in zip(ratios.tolist(), calibrated.tolist(), losses.tolist(), timesteps.tolist()):
            mean = means[t * 5 // 1000]
            assert ratio == pytest.approx(1.0 if mean is None else loss / mean, rel=1e-12)
            assert value == pytest.approx(ratio * scale, rel=1e-12)
        history.append((losses, timesteps))
    assert reference is not None and baseline.reference == pytest.approx(reference, rel=1e-12)
    sums, counts = _reference_baseline(history, 5, 7.0)
    assert baseline.counts.tolist() == pytest.approx(counts, rel=1e-12)
    assert baseline.baseline().tolist() == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-12)


def test_the_calibrated_signal_keeps_the_level_and_drops_the_timestep_lottery():
    # losses 20x apart between low and high timesteps, multiplicative noise, nothing changes
    generator = torch.Generator().manual_seed(1)
    signal = EmotionSignal("calibrated", 1000, bins=10, horizon=1000)
    raw, calibrated = [], []
    for _ in range(400):
        timesteps = torch.randint(0, 1000, (4,), generator=generator)
        per_image = 0.5 * torch.exp(-3.0 * timesteps / 1000) * (1 + 0.2 * torch.randn(4, generator=generator))
        raw.append(per_image.mean().item())
        calibrated.append(signal(per_image.mean(), per_image, timesteps).item())
    tail_raw, tail_cal = torch.tensor(raw[100:]), torch.tensor(calibrated[100:])
    assert calibrated[0] == 1.0  # no baseline yet: neutral
    expected = 0.5 * (1 - math.exp(-3.0)) / 3.0  # the loss averaged over the timesteps
    # the level relative to the start's (itself measured from the first few batches)
    assert tail_cal.mean().item() == pytest.approx(expected / signal.baseline.reference, rel=0.03)
    assert signal.baseline.reference == pytest.approx(expected, rel=0.2)
    assert (tail_cal.std() / tail_cal.mean()).item() < 0.5 * (tail_raw.std() / tail_raw.mean()).item()
    # the model gets 20 % better at every timestep: the calibrated signal drops by 20 % at once
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    better = 0.8 * 0.5 * torch.exp(-3.0 * timesteps / 1000)
    assert signal(better.mean(), better, timesteps).item() == pytest.approx(0.8 * tail_cal.mean().item(), rel=0.1)


def test_the_baseline_round_trips_and_refuses_other_settings():
    baseline = TimestepBaseline(1000, bins=4)
    baseline.update(torch.tensor([0.3, 0.1]), torch.tensor([10, 900]))
    copy = TimestepBaseline(1000, bins=4)
    copy.load_state_dict(baseline.state_dict())
    assert torch.equal(copy.sums, baseline.sums) and torch.equal(copy.counts, baseline.counts)
    with pytest.raises(ValueError, match="same settings"):
        TimestepBaseline(1000, bins=8).load_state_dict(baseline.state_dict())
    with pytest.raises(ValueError, match="model.emotion_signal"):
        EmotionSignal("smoothed")


def test_stratified_timesteps_cover_every_stratum_and_stay_uniform():
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_timesteps(4, 1000, min_timestep=100, generator=generator, stratified=True)
                         for _ in range(3000)])
    for i in range(4):
        assert draws[:, i].min() >= 100 + 225 * i and draws[:, i].max() < 100 + 225 * (i + 1)
    assert draws.float().mean().item() == pytest.approx(549.5, abs=3.0)
    assert draws.unique().numel() == 900


# ------------------------------------------------------------------------- in a real run
class Captioned(Dataset):
    def __init__(self, tokenizer, n=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1
        self.ids = tokenize(tokenizer, [f"a photo of thing {i}" for i in range(n)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "input_ids": self.ids[i]}


class Recorder(pl.Callback):
    """What the optimizer read at each step, and what was logged."""

    def __init__(self):
        self.fed, self.logged, self.losses = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fed.append(trainer.optimizers[0].snapshot().loss)
        self.logged.append(trainer.callback_metrics["train/emotion_signal"].item())
        self.losses.append(trainer.callback_metrics["train_loss"].item())


def _module(signal="calibrated"):
    module = SDLoRAModule("builtin:tiny", lora_rank=4, emotion_signal=signal,
                          optimizer=lambda groups: EmoNavi(groups, lr=1e-3))
    # few bins that fill at once, so that a short run's signal is not the neutral 1
    module.emotion_signal = EmotionSignal(signal, 1000, bins=2, horizon=50, min_count=1)
    return module


def _trainer(root, **kwargs):
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      callbacks=[EmoLossFeed(), *kwargs.pop("callbacks", [])], **kwargs)


@pytest.mark.slow
def test_the_optimizer_reads_the_calibrated_signal_and_raw_keeps_the_training_loss(tmp_path):
    module, recorder = _module(), Recorder()
    _trainer(tmp_path / "c", max_steps=6, callbacks=[recorder]).fit(
        module, DataLoader(Captioned(module.tokenizer), batch_size=2))
    assert recorder.fed == pytest.approx(recorder.logged, rel=1e-6)
    # no baseline at the first step: neutral; later the calibrated value
    assert recorder.fed[0] == 1.0 and any(abs(fed - 1.0) > 1e-3 for fed in recorder.fed[1:])
    assert module.emotion_signal.baseline.counts.sum().item() > 0

    raw, raw_recorder = _module("raw"), Recorder()
    _trainer(tmp_path / "r", max_steps=3, callbacks=[raw_recorder]).fit(
        raw, DataLoader(Captioned(raw.tokenizer), batch_size=2))
    assert raw_recorder.fed[-1] == pytest.approx(raw.trainer.callback_metrics["train_loss"].item(), rel=1e-6)
    assert raw.emotion_signal.baseline.counts.sum().item() == 0


@pytest.mark.slow
def test_with_gradient_accumulation_the_optimizer_reads_the_mean_of_the_micro_batches(tmp_path):
    module, recorder = _module(), Recorder()
    _trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[recorder]).fit(
        module, DataLoader(Captioned(module.tokenizer), batch_size=2))
    micro = recorder.logged  # one per micro-batch
    for step in range(3):
        assert recorder.fed[2 * step + 1] == pytest.approx((micro[2 * step] + micro[2 * step + 1]) / 2, rel=1e-6)
    # every image of the 6 micro-batches counted, each micro-batch one decay step (horizon 50)
    assert module.emotion_signal.baseline.counts.sum().item() == pytest.approx(2 * sum(0.98 ** k for k in range(6)))


@pytest.mark.slow
def test_a_resume_continues_the_signal_exactly(tmp_path):
    straight, straight_record = _module(), Recorder()
    _trainer(tmp_path / "s", max_epochs=2, callbacks=[straight_record]).fit(
        straight, DataLoader(Captioned(straight.tokenizer), batch_size=2))

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = _module()
    _trainer(tmp_path / "f", max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, DataLoader(Captioned(first.tokenizer), batch_size=2))
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert torch.load(path, weights_only=True)["emolightning_emotion_signal"]["baseline"]["counts"].sum() > 0

    resumed, resumed_record = _module(), Recorder()
    _trainer(tmp_path / "r", max_epochs=2, callbacks=[resumed_record]).fit(
        resumed, DataLoader(Captioned(resumed.tokenizer), batch_size=2), ckpt_path=path)
    assert resumed_record.fed == straight_record.fed[4:]  # bit-identical
    assert torch.equal(resumed.emotion_signal.baseline.sums, straight.emotion_signal.baseline.sums)
    assert torch.equal(resumed.emotion_signal.baseline.counts, straight.emotion_signal.baseline.counts)
    assert resumed.trainer.optimizers[0].snapshot() == straight.trainer.optimizers[0].snapshot()


class TermsModule(SDLoRAModule):
    """Keeps each batch's diffusion terms and the baseline it met, to recompute the signal."""

    def diffusion_terms(self, batch, timesteps=None, noise=None):
        self.before = TimestepBaseline(1000, bins=2, horizon=50, min_count=1)
        self.before.load_state_dict(self.emotion_signal.baseline.state_dict())
        self.terms = super().diffusion_terms(batch, timesteps, noise)
        return self.terms


class RankCheck(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        baseline = pl_module.emotion_signal.baseline
        state = strategy.all_gather(torch.cat([baseline.sums, baseline.counts]))
        assert torch.equal(state[0], state[1]), "the baselines differ across ranks"
        fed = strategy.all_gather(torch.tensor(trainer.optimizers[0].snapshot().loss, dtype=torch.float64))
        assert torch.equal(fed[0], fed[1]), "the ranks fed their optimizers different signals"
        local = pl_module.before.calibrate(pl_module.terms.per_image, pl_module.terms.timesteps).mean()
        both = strategy.all_gather(local)
        assert fed[0].item() == pytest.approx(both.mean().item(), rel=1e-9)
        if trainer.global_step > 1:
            assert not torch.equal(both[0], both[1])  # each rank's own images and timesteps


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_keeps_the_baseline_and_the_signal_identical_across_ranks(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module = TermsModule("builtin:tiny", lora_rank=4, optimizer=partial(EmoNavi, lr=1e-3))
    module.emotion_signal = EmotionSignal("calibrated", 1000, bins=2, horizon=50, min_count=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", devices=2,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EmoLossFeed(), RankCheck()])
    trainer.fit(module, DataLoader(Captioned(module.tokenizer), batch_size=2))
    assert trainer.state.finished
