"""The logger a CLI run gets when none is configured: TensorBoard if it works here, else CSV."""

from __future__ import annotations

import importlib
from typing import Optional

from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

INSTALL_HINT = "pip install tensorboard"


def tensorboard_problem() -> Optional[str]:
    """Why TensorBoard cannot be written here, or ``None`` when it can.

    Lightning picks its default logger from the list of installed packages only, so a
    tensorboard that is listed but does not import (a blocked or broken install) makes the first
    log call fail. This imports the writer that ``TensorBoardLogger`` will use instead.
    """
    # TensorBoardLogger writes through torch.utils.tensorboard when the tensorboard package is
    # installed, and through tensorboardX otherwise
    module = "torch.utils.tensorboard" if _TENSORBOARD_AVAILABLE else "tensorboardX"
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install (e.g. a protobuf clash) is as unusable as a missing one
        return f"{module} does not import: {type(error).__name__}: {error}"
    return None


def default_logger(save_dir: str) -> Logger:
    """A ``TensorBoardLogger`` when TensorBoard can be written, else a ``CSVLogger`` (and one
    message on rank zero saying so and how to install TensorBoard).

    Args:
        save_dir: the folder runs go to (``trainer.default_root_dir``); each run gets
            ``lightning_logs/version_N`` below it, as with Lightning's own default.

    Example:
        >>> logger = default_logger("runs/my_lora")
    """
    version = SLURMEnvironment.job_id()  # as Lightning's default: a SLURM job logs under its id
    problem = tensorboard_problem()
    if problem is None:
        return TensorBoardLogger(save_dir=save_dir, version=version)
    logger = CSVLogger(save_dir=save_dir, version=version)
    if rank_zero_only.rank == 0:  # other ranks must not fix the logger's version by asking for its folder
        rank_zero_info(f"TensorBoard is not available ({problem}), so this run logs to CSV: "
                       f"{logger.log_dir}/metrics.csv. For TensorBoard logs, `{INSTALL_HINT}` and run again.")
    return logger
