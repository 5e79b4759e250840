"""EmoLossFeed: hands every micro-batch's training loss to the Emo optimizers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from emolightning._distributed import release_gloo_group_at_exit
from emolightning.run import loss_readers, run_events, undo_accumulation


class EmoLossFeed(Callback):
    """Feed the training loss to every Emo optimizer of the Trainer, before each backward pass.

    In automatic optimization Lightning passes the optimizer a closure that returns the loss,
    and the Emo optimizers read it from there. Two cases need this callback:

    * ``precision="16-mixed"``: Lightning runs the closure itself and steps through the
      GradScaler, so the optimizer receives no closure and no loss.
    * ``accumulate_grad_batches > 1``: the closure returns only the last micro-batch's loss,
      divided by the number of micro-batches. With the feed, the optimizer uses the mean of the
      window's micro-batch losses.

    The loss fed is the one given to ``backward``, with the GradScaler's scale and Lightning's
    accumulation division undone. In a distributed run each process feeds its own loss and the
    optimizer averages them across processes at the step. LR schedulers with a ``feed_loss``
    method (:class:`~emolightning.optim.EmoPulseScheduler`) are fed too. With any other
    optimizer this callback does nothing to the losses.

    A LightningModule may feed the emotion another signal than the training loss
    (:func:`emolightning.run.feed_emotion`; :class:`~emolightning.SDLoRAModule` does, with its
    ``emotion_signal``): for those micro-batches this callback feeds nothing.

    In a CPU (gloo) DDP run it also cleans up when each process exits: it frees the DDP wrapper
    (left in a reference cycle, it is otherwise freed during the interpreter's teardown, which
    now and then aborts a finished worker) and destroys the process group, as Lightning does
    for NCCL only.

    Example:
        >>> import lightning.pytorch as pl
        >>> from emolightning.callbacks import EmoLossFeed
        >>> trainer = pl.Trainer(callbacks=[EmoLossFeed()], accumulate_grad_batches=4)
    """

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        release_gloo_group_at_exit()

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if run_events(trainer).take_emotion_fed():  # the module fed its own signal
            return
        # the Emo optimizers, and schedulers that read the loss (EmoPulseScheduler)
        optimizers = loss_readers(trainer)
        if not optimizers:
            return
        value = loss.detach()
        scaler: Any = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            value = value / scaler.get_scale()
        value = undo_accumulation(trainer, pl_module, value)
        for optimizer in optimizers:
            optimizer.feed_loss(value)
