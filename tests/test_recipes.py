"""Every recipe parses, builds its objects, and the quickstart runs (shortened)."""

from pathlib import Path

import pytest

from emolightning.cli import EmoLightningCLI

pytestmark = pytest.mark.slow
RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert [p.name for p in RECIPES] == ["quickstart.yaml"]


def test_quickstart_runs_and_writes_its_outputs(tmp_path, capsys):
    cli = EmoLightningCLI(args=["fit", "--config", str(RECIPES[0]), f"--trainer.default_root_dir={tmp_path}",
                                "--trainer.max_steps=40", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 40
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EmoLossFeed", "PlateauContinuation", "ShadowCheckpoint", "EmotionMonitor", "RankConsistency"} <= names
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "emotion.png").exists() and (log_dir / "config.yaml").exists()
    assert sorted(p.name for p in (log_dir / "samples").glob("*.png")) == ["step000040.png"]
    assert list((log_dir / "checkpoints").glob("shadow-step40.safetensors"))
    assert sorted(p.name for p in (log_dir / "lora").iterdir()) == ["lora-step40.diffusers.safetensors",
                                                                    "lora-step40.kohya.safetensors"]
    summary = capsys.readouterr().out
    assert "outputs" in summary and "emotion plot" in summary and "LoRA" in summary and "shadow" in summary
