"""Bits per dimension as a torchmetrics Metric: an exact weighted mean over every image seen.

The state is the sum of per-image bits/dim (float64) and the number of images; both are summed
over processes under DDP, so the value is the mean over all images however they were split into
batches and processes (batches of unequal size are weighted correctly).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["BitsPerDim"]


class BitsPerDim(Metric):
    """Mean of per-image bits/dim; ``update(bpd)`` takes a ``[B]`` tensor."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, bpd: torch.Tensor) -> None:
        bpd = bpd.detach().reshape(-1)
        self.total += bpd.to(torch.float64).sum()
        self.count += bpd.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count  # NaN when nothing was seen (0 / 0)
