"""Where each step's loss comes from, and its mean across processes."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

LossLike = Union[float, int, Tensor]


class LossIntake:
    """The loss of the next optimizer step, first match wins: ``step(loss=...)``, the mean of
    what :meth:`feed` received since the last step, the closure's return value.

    With ``sync`` and an initialised ``torch.distributed`` group of more than one process,
    :meth:`take` returns the mean over every process's losses (one small ``all_reduce`` per
    step), so every rank sees the same number. Tensors are kept on their device until then.

    Args:
        sync: average across processes when a process group is initialised.
    """

    def __init__(self, sync: bool = True) -> None:
        self.sync = sync
        self._fed_sum: Optional[Tensor] = None
        self._fed_count = 0

    def feed(self, loss: LossLike) -> None:
        """Keep ``loss`` for the next step (for example one per micro-batch); nothing is
        synchronised here."""
        value = loss.detach().reshape(()).to(torch.float64) if isinstance(loss, Tensor) else \
            torch.tensor(float(loss), dtype=torch.float64)
        if self._fed_sum is not None and self._fed_sum.device != value.device:
            value = value.to(self._fed_sum.device)
        self._fed_sum = value if self._fed_sum is None else self._fed_sum + value
        self._fed_count += 1

    def clear(self) -> None:
        """Forget what was fed since the last step."""
        self._fed_sum, self._fed_count = None, 0

    def take(self, loss: Optional[LossLike], closure_loss: Any) -> Optional[float]:
        """This step's loss as a float (the rank mean when synchronising), or ``None`` when no
        process had one. Clears what was fed."""
        total, count = self._local(loss, closure_loss)
        if isinstance(total, Tensor) and total.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(total.shape)}")
        if not self.distributed():
            if count == 0:
                return None
            value = total.item() if isinstance(total, Tensor) else float(total)
            return value / count if count > 1 else value
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        if count == 0:
            pair = torch.zeros(2, dtype=torch.float64, device=device)
        else:
            value = total.detach().reshape(()) if isinstance(total, Tensor) else torch.tensor(float(total))
            pair = torch.stack([value.to(device=device, dtype=torch.float64),
                                torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(pair, op=dist.ReduceOp.SUM)
        total_sum, total_count = pair.tolist()
        if total_count == 0:
            return None
        return total_sum / total_count

    def distributed(self) -> bool:
        """Whether :meth:`take` averages across processes."""
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _local(self, loss: Optional[LossLike], closure_loss: Any) -> tuple[Any, int]:
        fed_sum, fed_count = self._fed_sum, self._fed_count
        self.clear()
        if loss is not None:
            return loss, 1
        if fed_count:
            return fed_sum, fed_count
        if closure_loss is not None:
            return closure_loss, 1
        return None, 0
