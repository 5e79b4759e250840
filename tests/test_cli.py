"""The emolightning command: fit from the command line, then export the checkpoint's LoRA; bad
input ends it with one line that names the file or option, before the base model loads."""

import datetime
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image
from safetensors import safe_open

from emolightning.cli import EmoLightningCLI, export, main
from tests.test_files import aged_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--model.pretrained=builtin:tiny", "--model.lora_rank=4", "--data.root=builtin:shapes",
            "--data.resolution=64", "--data.min_bucket=32", "--data.max_bucket=128", "--data.bucket_step=32",
            "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 3-step run: the CLI object and its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    cli = EmoLightningCLI(args=["fit", *TINY_RUN, f"--trainer.default_root_dir={root}",
                                "--model.optimizer=emolightning.optim.EmoLynx", "--model.optimizer.lr=1e-4"])
    return cli, next((root / "checkpoints").glob("*.ckpt"))


def test_fit_then_export(fitted, tmp_path, capsys):
    cli, checkpoint = fitted
    assert cli.trainer.global_step == 3
    assert type(cli.trainer.optimizers[0]).__name__ == "EmoLynx"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 1e-4
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


def _one_line_error(capsys, argv, status=1):
    """Runs the command; returns its error line, after checking it came without a traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_values_are_named_before_anything_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match="model.lora_rank"):
        EmoLightningCLI(args=["fit", *TINY_RUN, "--model.lora_rank=0", f"--trainer.default_root_dir={tmp_path}"])
    line = _one_line_error(capsys, ["fit", *TINY_RUN, "--model.target_preset=everything",
                                    f"--trainer.default_root_dir={tmp_path}"])
    assert line.startswith("error: model.target_preset must be one of")
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


# ------------------------------------------------------------------ the data folder

def test_an_empty_data_folder_is_one_line_before_the_model_loads(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "readme.txt").write_text("the pictures are elsewhere\n")
    run = tmp_path / "run"
    # the base model does not exist either: the data folder must be named first, without a traceback
    result = subprocess.run(
        [sys.executable, "-m", "emolightning.cli", "fit", *TINY_RUN, f"--data.root={images}",
         "--model.pretrained=/nonexistent/sd15", "--trainer.logger=true", f"--trainer.default_root_dir={run}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.root (--data.root): no images in {images} or its subfolders (looked for .png, .jpg, .jpeg, "
        ".webp, .bmp, outside folders named 0_*); point it at the folder of your training images, with a caption .txt "
        "beside each image or a metadata.jsonl")
    assert not run.exists()


def test_a_missing_data_folder_is_named(tmp_path, capsys):
    line = _one_line_error(capsys, ["fit", *TINY_RUN, f"--data.root={tmp_path / 'nowhere'}",
                                    "--model.pretrained=/nonexistent/sd15", f"--trainer.default_root_dir={tmp_path}"])
    assert line == (f"error: data.root (--data.root): {tmp_path / 'nowhere'} is not a folder; point it at the folder "
                    "of your training images (or use --data.root=builtin:shapes for a trial run)")


def test_the_full_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLIGHTNING_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="data.root"):
        main(["fit", *TINY_RUN, f"--data.root={tmp_path / 'nowhere'}", f"--trainer.default_root_dir={tmp_path}"])


# ------------------------------------------------------------------ checkpoints

def _bad_checkpoints(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not checkpoints of a run of this kit, and what the message must say."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {"empty": (b"", "is not a readable checkpoint (EOFError"),
             "truncated": (data[: len(data) // 2], "is not a readable checkpoint ("),
             "random": (random.Random(0).randbytes(4096), "is not a readable checkpoint (UnpicklingError")}
    bad = {}
    for name, (content, message) in files.items():
        (folder / f"{name}.ckpt").write_bytes(content)
        bad[name] = (folder / f"{name}.ckpt", message)
    torch.save({"layer.weight": torch.zeros(2, 2)}, folder / "bare.ckpt")
    bad["bare"] = (folder / "bare.ckpt", "is a bare state dict (tensors by name), not a Lightning checkpoint")
    torch.save({"state_dict": {}, "saved": datetime.date(2024, 1, 1)}, folder / "objects.ckpt")
    bad["objects"] = (folder / "objects.ckpt", "holds Python objects that a weights-only load refuses "
                      "(UnpicklingError: Unsupported global: GLOBAL datetime.date was not an allowed global by default)")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, folder / "base.ckpt")
    bad["base"] = (folder / "base.ckpt", "is a Stable Diffusion base model, not a training checkpoint")
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=folder)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(folder / "boring.ckpt")
    bad["boring"] = (folder / "boring.ckpt", "is a Lightning checkpoint of another model")
    return bad


@pytest.fixture(scope="module")
def bad_checkpoints(fitted, tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("bad"), fitted[1])


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "objects", "bare", "base", "boring"])
def test_a_checkpoint_that_is_not_one_is_named_before_the_model_loads(kind, bad_checkpoints, tmp_path, capsys):
    path, message = bad_checkpoints[kind]
    run = tmp_path / "run"
    line = _one_line_error(capsys, ["fit", *TINY_RUN, "--model.pretrained=/nonexistent/sd15", f"--ckpt_path={path}",
                                    f"--trainer.default_root_dir={run}"])
    assert line.startswith(f"error: --ckpt_path: {path} {message}")
    assert "pass a .ckpt file that a run of this kit wrote" in line
    assert not run.exists()
    line = _one_line_error(capsys, ["export", str(path), "--out", str(tmp_path / "lora.safetensors")])
    assert line.startswith(f"error: CHECKPOINT: {path} {message}")
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_weights_only_checkpoint_cannot_resume(fitted, tmp_path, capsys):
    _, good = fitted
    weights = torch.load(good, weights_only=True)
    for key in ("optimizer_states", "lr_schedulers"):
        weights.pop(key)
    torch.save(weights, tmp_path / "weights.ckpt")
    line = _one_line_error(capsys, ["fit", *TINY_RUN, f"--ckpt_path={tmp_path / 'weights.ckpt'}",
                                    f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert line.startswith(f"error: --ckpt_path: {tmp_path / 'weights.ckpt'} holds the weights only")
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_a_part_names_it(tmp_path, capsys):
    from emolightning.diffusion.tiny import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "model")
    for path in (folder / "unet").iterdir():
        path.unlink()
    (folder / "unet").rmdir()
    line = _one_line_error(capsys, ["fit", *TINY_RUN, f"--model.pretrained={folder}",
                                    f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert line.startswith(f"error: model.pretrained: the diffusers folder {folder} lacks unet/. ")
    assert "A complete folder holds model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/" in line


# ------------------------------------------------------------------ the run's folders

class FailAtStep(Callback):
    """Fails the run once it has taken ``step`` optimizer steps, as a crash would."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crashed at step {trainer.global_step}")


def test_a_run_that_fails_before_training_leaves_no_log_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "red").save(images / "tiny.png")  # smaller than every bucket: fails in setup
    (images / "tiny.txt").write_text("a red square")
    run = tmp_path / "run"
    run.mkdir()
    line = _one_line_error(capsys, ["fit", *TINY_RUN, f"--data.root={images}", "--data.upscale=false",
                                    "--trainer.logger=true",
                                    f"--trainer.default_root_dir={run}"])
    assert "tiny.png is 16x16, smaller than every bucket" in line
    assert not any(run.iterdir())  # no lightning_logs/version_0 with an empty event file in it
    # a run that trained keeps its logs, and an unexpected error keeps its traceback
    with pytest.raises(RuntimeError, match="crashed at step 2"):
        main(["fit", *TINY_RUN, "--trainer.logger=true", "--trainer.log_every_n_steps=1",
              "--trainer.callbacks+=tests.test_cli.FailAtStep", f"--trainer.default_root_dir={run}"])
    kept = run / "lightning_logs" / "version_0"
    assert list(kept.glob("events.out.tfevents.*")) and (kept / "config.yaml").is_file()


def test_a_run_removes_the_temporary_files_of_killed_writes(tmp_path):
    run, shadow = tmp_path / "run", tmp_path / "shadow"
    stale = [aged_file(run / "lightning_logs" / "version_0" / "checkpoints" / ".stage1-step40.ckpt.partial"),
             aged_file(run / "lightning_logs" / "version_0" / "lora" / ".lora-step50.kohya.safetensors.partial"),
             aged_file(shadow / ".shadow-step8.safetensors.partial")]
    in_progress = aged_file(shadow / ".shadow-step9.safetensors.partial", age_s=1.0)  # another process writing it
    not_ours = [aged_file(run / "lightning_logs" / "notes.partial"), aged_file(shadow / "shadow.safetensors.part")]
    cli = EmoLightningCLI(args=["fit", *TINY_RUN, "--trainer.max_steps=1", "--trainer.logger=true",
                                f"--trainer.default_root_dir={run}",
                                "--trainer.callbacks+=emolightning.callbacks.ShadowCheckpoint",
                                f"--trainer.callbacks.dirpath={shadow}"])
    assert cli.trainer.global_step == 1
    assert not any(path.exists() for path in stale)
    assert in_progress.exists() and all(path.exists() for path in not_ours)


# ------------------------------------------------------------------ export --out

def test_export_does_not_overwrite_without_being_asked(fitted, tmp_path, capsys):
    _, checkpoint = fitted
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"an earlier export")
    line = _one_line_error(capsys, ["export", str(checkpoint), "--out", str(out)], status=2)
    assert line == f"error: --out {out} already exists; pass --overwrite to replace it, or choose another file name"
    assert out.read_bytes() == b"an earlier export"
    main(["export", str(checkpoint), "--out", str(out), "--overwrite"])
    with safe_open(out, "pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "4"
    line = _one_line_error(capsys, ["export", str(checkpoint), "--out", str(checkpoint), "--overwrite"], status=2)
    assert line == f"error: --out {checkpoint} is the checkpoint itself; give another file name"


def test_unreadable_captions_and_bad_sizes_are_named_before_the_model_loads(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.png")
    (images / "a.txt").write_bytes("une légende".encode("latin-1"))
    base = ["fit", *TINY_RUN, "--model.pretrained=/nonexistent/sd15"]
    line = _one_line_error(capsys, [*base, f"--data.root={images}"])
    assert "a.txt" in line and "UTF-8" in line
    (images / "a.txt").write_text("a caption", encoding="utf-8")
    line = _one_line_error(capsys, [*base, f"--data.root={images}", "--data.resolution=60"])
    assert "data.resolution=60" in line and "56" in line and "64" in line
