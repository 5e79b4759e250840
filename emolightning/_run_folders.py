"""The command's care for the folders a run writes to: the temporary files of killed writes are
removed when a run starts, and the log folder of a run that failed before it wrote anything is
removed when it fails."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from typing_extensions import override

from emolightning._files import remove_stale_partials

# what every run writes into its log folder as it starts: the CLI's config, the logger's
# hyperparameters and (TensorBoard) an event file opened at setup
_START_FILES = ("config.yaml", "hparams.yaml")
_START_PREFIXES = ("events.out.tfevents.",)


def _local_loggers(trainer: "pl.Trainer") -> list:
    """The loggers that write version folders on this machine (TensorBoard, CSV)."""
    return [logger for logger in trainer.loggers
            if isinstance(logger, (TensorBoardLogger, CSVLogger)) and "://" not in str(logger.root_dir)]


def run_folders(trainer: "pl.Trainer") -> list[tuple[Path, bool]]:
    """The folders the runs of this Trainer write to, and whether to look into their subfolders:
    each local logger's folder of version folders (every run's logs, checkpoints, stage and
    shadow files, LoRA files and samples are below it), and every callback's ``dirpath``
    (ModelCheckpoint, ShadowCheckpoint, PlateauContinuation given one)."""
    folders: list[tuple[Path, bool]] = []
    for logger in _local_loggers(trainer):
        # a logger without a name keeps its versions straight in its save_dir, which may hold anything
        folders.append((Path(logger.root_dir) if logger.name else Path(logger.log_dir), True))
    for callback in trainer.callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if isinstance(dirpath, (str, Path)) and "://" not in str(dirpath):
            folders.append((Path(dirpath), False))
    return folders


class RunFolderCare(Callback):
    """At the start of fit, on rank 0, removes the ``.<name>.partial`` files that writes killed
    in an earlier run left in :func:`run_folders` (only files older than this run and untouched
    for a minute: :func:`~emolightning._files.remove_stale_partials`). It also notes the step
    training started from, so that :func:`remove_unused_log_dir` knows whether a failed run trained.

    Example:
        >>> trainer = pl.Trainer(callbacks=[RunFolderCare()])
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.first_step: Optional[int] = None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        removed = []
        for folder, recursive in run_folders(trainer):
            removed += remove_stale_partials(folder, before=self.started, recursive=recursive)
        if removed:
            rank_zero_info(f"removed {len(removed)} temporary file(s) that killed writes left behind: "
                           + ", ".join(str(path) for path in removed[:5]) + (" ..." if len(removed) > 5 else ""))

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.first_step = trainer.global_step

    def trained(self, trainer: "pl.Trainer") -> bool:
        """Whether this run took an optimizer step."""
        return self.first_step is not None and trainer.global_step > self.first_step


def new_log_dir(trainer: "pl.Trainer") -> Optional[Path]:
    """On rank 0, the folder the coming run will create for its logs: the log folder, or the
    highest of its parents that does not exist yet (``lightning_logs``, or ``default_root_dir``
    itself). ``None`` when the log folder exists already (e.g. a fixed ``version``), on other
    ranks, or without a local logger. Call it before the run starts."""
    if rank_zero_only.rank != 0:  # other ranks must not fix the logger's version by asking for its folder
        return None
    loggers = _local_loggers(trainer)
    if not loggers:
        return None
    folder = Path(loggers[0].log_dir).absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def remove_unused_log_dir(folder: Optional[Path], care: Optional[RunFolderCare], trainer: "pl.Trainer") -> bool:
    """After a run failed: remove the folder it created for its logs (:func:`new_log_dir`) if
    the run took no optimizer step and the folder holds nothing but what every run writes as it
    starts (``config.yaml``, ``hparams.yaml``, a TensorBoard event file; empty subfolders), so
    that the disk is as the run found it. Otherwise the next run would be numbered past an empty
    ``version_N``.

    Returns:
        Whether the folder was removed.
    """
    if folder is None or not folder.is_dir() or care is None or care.trained(trainer):
        return False
    try:
        for path in folder.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                continue
            if path.name not in _START_FILES and not path.name.startswith(_START_PREFIXES):
                return False
    except OSError:  # a folder that cannot be read is left as it is
        return False
    shutil.rmtree(folder, ignore_errors=True)  # never raises: the run's own error is the one to report
    rank_zero_info(f"The run failed before it wrote anything; removed the folder it made for its logs, {folder}")
    return not folder.exists()
