"""A CLI run logs to TensorBoard by default, and to CSV, saying so once, when TensorBoard cannot be imported."""

import csv
import logging
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from emolightning.cli import EmoLightningCLI

pytestmark = pytest.mark.slow

RUN = ["fit", "--model.pretrained=builtin:tiny", "--model.lora_rank=4", "--data.root=builtin:shapes",
       "--data.resolution=64", "--data.min_bucket=32", "--data.max_bucket=128", "--data.bucket_step=32",
       "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
       "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"]
NOTICE = "TensorBoard is not available"


def test_a_run_logs_to_tensorboard_by_default(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        cli = EmoLightningCLI(args=[*RUN, f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.trainer.logger) is TensorBoardLogger
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == tmp_path / "lightning_logs" / "version_0"
    assert list(log_dir.glob("events.out.tfevents.*")) and not (log_dir / "metrics.csv").exists()
    assert NOTICE not in caplog.text


def test_without_tensorboard_a_run_logs_to_csv_and_says_so_once(tmp_path, monkeypatch, caplog, capsys):
    # as if neither tensorboard nor tensorboardX were installed (sys.modules None blocks an import)
    for module in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level(logging.INFO):
        cli = EmoLightningCLI(args=[*RUN, f"--trainer.default_root_dir={tmp_path}",
                                    "--trainer.callbacks+=emolightning.callbacks.RunSummary"])
    assert type(cli.trainer.logger) is CSVLogger and cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows if row.get("train_loss")] == [0, 1]
    assert not list(log_dir.glob("events.out.tfevents.*"))
    notices = [record.getMessage() for record in caplog.records if NOTICE in record.getMessage()]
    assert len(notices) == 1
    assert "pip install tensorboard" in notices[0] and str(log_dir / "metrics.csv") in notices[0]
    assert "logs (metrics.csv)" in capsys.readouterr().out  # RunSummary names the CSV logs


def test_a_configured_logger_is_kept(tmp_path, monkeypatch, caplog):
    for module in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level(logging.INFO):
        cli = EmoLightningCLI(args=[*RUN, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
                                    "--trainer.logger=false"])
    assert cli.trainer.logger is None and NOTICE not in caplog.text
