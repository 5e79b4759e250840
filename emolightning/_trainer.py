"""The CLI's Trainer: ``trainer.log_dir`` may be read by rank 0 alone."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from emolightning._distributed import release_gloo_group_at_exit


class CLITrainer(pl.Trainer):
    """A ``Trainer`` whose ``log_dir`` all processes agree on once, when fit/validate sets up, and
    that is read without a collective from then on.

    Lightning's ``Trainer.log_dir`` broadcasts rank 0's folder every time it is read. Code that
    saves a file from rank 0 and asks for the folder there only (a common pattern, see Lightning
    issue 18148) waits for a broadcast the other ranks never join: the run hangs, or its
    collectives pair up wrongly. With :class:`ShareLogDir` among the callbacks, such reads are
    safe.

    Example:
        >>> trainer = CLITrainer(callbacks=[ShareLogDir()], strategy="ddp", devices=2)
    """

    _shared_log_dir: Optional[str] = None

    @property
    def log_dir(self) -> Optional[str]:
        if self._shared_log_dir is not None:
            return self._shared_log_dir
        return super().log_dir


class ShareLogDir(Callback):
    """Reads ``trainer.log_dir`` on every rank at setup (the one broadcast) and keeps it in a
    :class:`CLITrainer`. Also registers the CPU (gloo) exit clean-up that
    :class:`~emolightning.callbacks.EmoLossFeed` registers, for CLI runs without that callback."""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        release_gloo_group_at_exit()
        if isinstance(trainer, CLITrainer):
            trainer._shared_log_dir = None
            trainer._shared_log_dir = trainer.log_dir
