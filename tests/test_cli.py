"""The emolightning command: fit from the command line, then export the checkpoint's LoRA."""

import pytest
from safetensors import safe_open

from emolightning.cli import EmoLightningCLI, export, main

pytestmark = pytest.mark.slow

TINY_RUN = ["--model.pretrained=builtin:tiny", "--model.lora_rank=4", "--data.root=builtin:shapes",
            "--data.resolution=64", "--data.min_bucket=32", "--data.max_bucket=128", "--data.bucket_step=32",
            "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false"]


def test_fit_then_export(tmp_path, capsys):
    cli = EmoLightningCLI(args=["fit", *TINY_RUN, f"--trainer.default_root_dir={tmp_path}",
                                "--model.optimizer=emolightning.optim.EmoLynx", "--model.optimizer.lr=1e-4"])
    assert cli.trainer.global_step == 3
    assert type(cli.trainer.optimizers[0]).__name__ == "EmoLynx"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 1e-4
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    out = export([str(checkpoint), "--out", str(tmp_path / "lora.safetensors"), "--dtype", "fp16"])
    with safe_open(out, "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_network_dim"] == "4"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert "wrote" in capsys.readouterr().out


def test_fit_with_an_emosens_family_optimizer(tmp_path):
    cli = EmoLightningCLI(args=["fit", *TINY_RUN, f"--trainer.default_root_dir={tmp_path}",
                                "--model.optimizer=emolightning.optim.EmoSens"])
    optimizer = cli.trainer.optimizers[0]
    assert cli.trainer.global_step == 3 and type(optimizer).__name__ == "EmoSens"
    assert optimizer.emoScope == 1.0  # the default lr, emoScope
    assert optimizer.snapshot().loss is not None and optimizer.snapshot().steps_without_loss == 0
    assert optimizer.param_groups[0]["lr"] == optimizer.last_pulse  # the emoPulse used


def test_bad_values_are_named_before_anything_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match="model.lora_rank"):
        EmoLightningCLI(args=["fit", *TINY_RUN, "--model.lora_rank=0", f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(ValueError, match="model.target_preset"):
        main(["fit", *TINY_RUN, "--model.target_preset=everything", f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(SystemExit):  # jsonargparse: not a known option
        main(["fit", *TINY_RUN, "--model.no_such_option=1", f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x.safetensors")])
    assert "no checkpoint file" in capsys.readouterr().err


LR = r"model\.optimizer\.init_args\.lr \(--model\.optimizer\.lr\) must be a number above zero, got "


@pytest.mark.parametrize("options, named", [
    (["--model.optimizer=emolightning.optim.EmoNavi", "--model.optimizer.lr=-1"], LR + "-1.0"),
    (["--model.optimizer=torch.optim.AdamW", "--model.optimizer.lr=0"], LR + "0.0"),
    (["--model.optimizer=emolightning.optim.EmoFact", "--model.optimizer.lr=.nan"], LR + "nan"),
    (["--model.optimizer=torch.optim.SGD", "--model.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR",
      "--model.lr_scheduler.max_lr=-0.1", "--model.lr_scheduler.total_steps=10"],
     r"model\.lr_scheduler\.init_args\.max_lr .*got -0\.1"),
    (["--model.train_text_encoder=true", "--model.text_encoder_lr=-3"], r"model\.text_encoder_lr .*got -3\.0"),
])
def test_a_bad_learning_rate_is_named_before_the_model_loads(options, named, tmp_path):
    # the missing model folder would fail as soon as the module is built: the LR error must come first
    missing_model = "--model.pretrained=/nonexistent/sd15"
    with pytest.raises(ValueError, match=named):
        EmoLightningCLI(args=["fit", *TINY_RUN, missing_model, *options, f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        EmoLightningCLI(args=["fit", *TINY_RUN, missing_model, f"--trainer.default_root_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_an_unknown_optimizer_class_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *TINY_RUN, "--model.optimizer=emolightning.optim.EmoNope",
              f"--trainer.default_root_dir={tmp_path}"])
    error = capsys.readouterr().err
    assert 'Parser key "model.optimizer"' in error and "has no attribute 'EmoNope'" in error
