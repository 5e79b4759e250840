"""DenoisingLoss: the validation metric, reduced across processes by torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class DenoisingLoss(Metric):
    """Mean of per-image denoising errors; ``update`` takes one error per image."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, errors: Tensor) -> None:
        self.total += errors.detach().to(torch.float64).sum()
        self.count += errors.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).to(torch.float32)
