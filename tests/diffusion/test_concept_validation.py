"""SDLoRAModule's concept score at validation (model.concept_score): logged as val/* metrics,
usable as the monitor of PlateauContinuation and ShadowCheckpoint, printed in the run summary;
and the sample grid's base row (model.sample_base)."""

import os
from datetime import timedelta
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from emolightning.callbacks import EmoLossFeed, PlateauContinuation, RunSummary, ShadowCheckpoint
from emolightning.data import ImageCaptionDataModule
from emolightning.diffusion import SDLoRAModule
from emolightning.diffusion.concept import CONCEPT_METRICS
from emolightning.diffusion.models import MINI, TINY
from emolightning.optim import EmoNavi

METRICS = [f"val/{name}" for name in CONCEPT_METRICS]


def test_concept_score_is_checked_before_the_model_loads():
    with pytest.raises(ValueError, match="model.concept_score: unknown concept 'moon'"):
        SDLoRAModule(TINY, concept_score="moon")
    with pytest.raises(ValueError, match="concept_seeds"):
        SDLoRAModule(TINY, concept_score="star", concept_seeds=0)


@pytest.mark.slow
def test_a_validation_metric_logged_every_n_steps_drives_the_callbacks(tmp_path, monkeypatch):
    """Validation (and so the concept score) every 4 steps; PlateauContinuation checks every
    step. Its checks between two validations find the same value and are not counted, so the
    plateau (mode='min' with a min_delta no value can beat: the second judged value is one)
    comes at the first check after the second validation, step 9, not at step 6."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # builtin:stars is written there
    module = SDLoRAModule(MINI, lora_rank=4, target_preset="attention_ff", optimizer=partial(EmoNavi, lr=2e-3),
                          cache_latents="memory", sample_size=32, sample_guidance_scale=5.0,
                          concept_score="star", concept_seeds=1, concept_inference_steps=2)
    data = ImageCaptionDataModule("builtin:stars", resolution=32, bucketing=False, min_bucket=32, batch_size=4,
                                  val_split=0.1)
    plateau = PlateauContinuation(monitor="val/concept", mode="min", min_delta=10.0, patience=1,
                                  check_every_n_steps=1, min_steps_per_stage=0, max_stages=1,
                                  save_stage_checkpoints=False)
    shadow = ShadowCheckpoint(monitor="val/concept", mode="max", save_on_fit_end=False)
    summary = RunSummary()
    trainer = pl.Trainer(max_steps=10, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[EmoLossFeed(), plateau, shadow, summary])
    trainer.fit(module, datamodule=data)

    assert sorted(module.concept_scores) == [0, 4, 8]  # the base before the first step, then each validation
    assert all(0.0 <= value <= 1.0 for scores in module.concept_scores.values() for value in scores.values())
    for name in METRICS:
        assert trainer.callback_metrics[name].item() == pytest.approx(module.concept_scores[8][name[4:]])
    assert "val_loss" in trainer.callback_metrics  # beside the held-out denoising loss
    assert [record["start_step"] for record in plateau.stages] == [0, 9]
    assert shadow.best == pytest.approx(max(module.concept_scores[s]["concept"] for s in (4, 8)))
    assert list(tmp_path.rglob("shadow-best.safetensors"))
    rows = dict(summary.outputs(trainer))
    assert rows["concept score"].startswith("step 8: val/concept ") and "(base " in rows["concept score"]


@pytest.mark.slow
def test_sample_grid_puts_the_base_above_the_lora(tmp_path):
    module = SDLoRAModule(MINI, lora_rank=4, sample_prompts=["a big red star, white background", "a big blue circle"],
                          sample_size=32, sample_inference_steps=4, sample_guidance_scale=5.0, sample_base=True,
                          export_formats=[])
    module._output_dir = tmp_path
    base = module.generate(list(module.hparams.sample_prompts))
    for network in module._lora_networks().values():  # a LoRA that changes the pictures
        for name, parameter in network.named_parameters():
            if "lora_B" in name:
                parameter.data.fill_(0.05)
    path = module.save_samples(7)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (64, 64, 3)  # two prompts; the base's row, then the LoRA's
    assert np.array_equal(grid[:32, :32], np.asarray(base[0])) and np.array_equal(grid[:32, 32:], np.asarray(base[1]))
    assert not np.array_equal(grid[32:, :32], grid[:32, :32])
    assert all(network.active_adapters() == ["default"] for network in module._lora_networks().values())


class SameScoreOnEveryRank(pl.Callback):
    """Inside each worker: the concept score was drawn on rank 0 alone, and every rank logged it."""

    def on_validation_end(self, trainer, pl_module):
        values = torch.tensor([trainer.callback_metrics[name].item() for name in METRICS])
        gathered = pl_module.all_gather(values)
        assert gathered.shape == (2, len(METRICS)) and torch.equal(gathered[0], gathered[1])
        assert (pl_module._concept_scorer is not None) == (trainer.global_rank == 0)


@pytest.mark.slow
def test_ddp_ranks_log_rank_zeros_concept_score(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module = SDLoRAModule(TINY, lora_rank=4, sample_size=64, concept_score="star", concept_seeds=1,
                          concept_inference_steps=1)
    data = ImageCaptionDataModule("builtin:shapes", resolution=64, bucketing=False, min_bucket=64, batch_size=2,
                                  val_split=0.2)
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         accelerator="cpu", devices=2, use_distributed_sampler=False,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=300)),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[SameScoreOnEveryRank()])
    trainer.fit(module, datamodule=data)
    assert trainer.state.finished
    assert set(METRICS) <= set(trainer.callback_metrics)  # rank 0's, sent back: the validation ran
