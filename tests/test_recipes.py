"""Every recipe parses, builds its objects, and the quickstart runs (shortened)."""

from pathlib import Path

import pytest
from PIL import Image

from emolightning.cli import EmoLightningCLI

pytestmark = pytest.mark.slow
RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


TINY = ["--model.pretrained=builtin:tiny", "--data.root=builtin:shapes", "--data.resolution=64",
        "--data.min_bucket=32", "--data.max_bucket=128", "--data.bucket_step=32", "--data.num_workers=0",
        "--model.sample_size=64", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.precision=32-true", "--model.cache_latents=memory"]


def test_there_are_recipes():
    assert [p.name for p in RECIPES] == ["mini-star-lora.yaml", "multi-gpu-ddp.yaml", "quickstart.yaml", "sd15-lora.yaml",
                                         "sd2-v-lora.yaml", "sdxl-lokr.yaml", "sdxl-lora-12gb.yaml",
                                         "sdxl-lora-emosens.yaml", "sdxl-lora.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_with_the_tiny_model_swapped_in(recipe, tmp_path):
    tiny = [a.replace("builtin:tiny", "builtin:tiny-sdxl") if "sdxl" in recipe.stem else a for a in TINY]
    cli = EmoLightningCLI(args=["--config", str(recipe), *tiny, f"--trainer.default_root_dir={tmp_path}"],
                          run=False)
    module, text = cli.model, recipe.read_text()
    assert type(module).__name__ == "SDLoRAModule" and type(cli.datamodule).__name__ == "ImageCaptionDataModule"
    watchers = {"EmoLossFeed", "ShadowCheckpoint", "EmotionMonitor", "RankConsistency", "RunSummary"}
    assert watchers | {"PlateauContinuation"} <= {type(cb).__name__ for cb in cli.trainer.callbacks}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    if recipe.stem == "mini-star-lora":  # the training-quality study's best arm (docs/results.md)
        assert type(optimizer).__name__ == "EmoClan" and optimizer.param_groups[0]["lr"] == 2e-3
        assert module.hparams.lora_rank == 4 and cli.trainer.max_steps == 150
        assert "root: builtin:stars-only" in text  # the study's set: no regularisation pictures
        plateau = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PlateauContinuation")
        assert plateau.monitor == "train_loss" and plateau.max_stages == 3  # the study's stage arm
    elif "emosens" in recipe.stem:  # the author's LoRA scope; the stages lower it
        assert type(optimizer).__name__ == "EmoSens" and optimizer.emoScope == 1.0
        plateau = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PlateauContinuation")
        assert plateau.monitor == "train_loss"
    else:
        assert type(optimizer).__name__ == "EmoNavi"
    if "sd2-v" in recipe.stem:
        assert module.noise_scheduler.config.prediction_type == "v_prediction"
    if "lora_rank: 16" in text:
        assert module.hparams.lora_rank == 16 and module.hparams.gradient_checkpointing
    if "sdxl" in recipe.stem:
        assert module.family == "sdxl" and module.hparams.cache_text_embeddings
        assert "resolution: 1024" in text and not cli.datamodule.hparams.shuffle_tags
    if "lokr" in recipe.stem:
        assert module.adapter_spec.kind == "lokr" and module.adapter_spec.lokr_factor == 8
        assert any(".lokr_w1." in name for name, p in module.named_parameters() if p.requires_grad)
        assert cli.model.hparams.export_formats == ["kohya", "diffusers"]
    if "multi-gpu" in recipe.stem:
        assert "strategy: ddp" in text and "use_distributed_sampler: false" in text


def test_a_missing_model_path_is_named_before_anything_loads(tmp_path):
    recipe = next(p for p in RECIPES if p.stem == "sd15-lora")
    args = ["--config", str(recipe), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    # the recipe's two placeholders: the data folder is checked first, before any class is built
    with pytest.raises(FileNotFoundError, match="data.root .*my_set is not a folder"):
        EmoLightningCLI(args=args, run=False)
    with pytest.raises(FileNotFoundError, match="model.pretrained: '/path/to/stable-diffusion-v1-5'"):
        EmoLightningCLI(args=[*args, "--data.root=builtin:shapes"], run=False)


def test_quickstart_runs_and_writes_its_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # builtin:stars is written there
    quickstart = next(p for p in RECIPES if p.stem == "quickstart")
    text = quickstart.read_text()
    assert "pretrained: builtin:mini" in text and "root: builtin:stars" in text and "concept_score: star" in text
    # shortened: 50 steps, one validation, a cheaper concept score
    cli = EmoLightningCLI(args=["fit", "--config", str(quickstart), f"--trainer.default_root_dir={tmp_path}",
                                "--trainer.max_steps=50", "--trainer.enable_progress_bar=false",
                                "--model.sample_every_n_steps=50", "--model.concept_seeds=1",
                                "--model.concept_inference_steps=2"])
    assert cli.trainer.global_step == 50
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EmoLossFeed", "PlateauContinuation", "ShadowCheckpoint", "EmotionMonitor", "RankConsistency"} <= names
    assert {"val_loss", "val/concept", "val/concept_unseen", "val/base_agreement", "val/base_concept"} <= set(
        cli.trainer.callback_metrics)
    assert sorted(cli.model.concept_scores) == [0, 50]  # the base, and the validation at step 50
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "emotion.png").exists() and (log_dir / "config.yaml").exists()
    assert sorted(p.name for p in (log_dir / "samples").glob("*.png")) == ["step000050.png"]
    with Image.open(log_dir / "samples" / "step000050.png") as grid:  # the base's row above the LoRA's
        assert grid.size == (6 * 32, 2 * 32)
    assert list((log_dir / "checkpoints").glob("shadow-best.safetensors"))  # the best val/concept
    assert sorted(p.name for p in (log_dir / "lora").iterdir()) == ["lora-step50.diffusers.safetensors",
                                                                    "lora-step50.kohya.safetensors"]
    summary = capsys.readouterr().out
    assert "outputs" in summary and "emotion plot" in summary and "LoRA" in summary and "shadow" in summary
    assert "concept score" in summary
