"""Bits per dimension of validation and test sets with every image counted exactly once, also under DDP: the
repeats ``DistributedSampler`` pads in carry the same key (image index and dequantisation draw) and are dropped."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class KeyedBitsPerDim(Metric):
    """Mean of per-image bits/dim over distinct keys; ``update(bpd, key)`` takes two ``[B]`` tensors. Keeps a float64
    and an int64 per image, gathered over processes at ``compute`` (0.8 MB for ImageNet's 50,000 validation images)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, bpd: torch.Tensor, key: torch.Tensor) -> None:
        bpd, key = bpd.detach().reshape(-1), key.detach().reshape(-1)
        if bpd.numel() != key.numel():
            raise ValueError(f"{bpd.numel()} values for {key.numel()} keys")
        self.values.append(bpd.to(torch.float64))
        self.keys.append(key.to(torch.int64))

    def compute(self) -> torch.Tensor:
        if len(self.keys) == 0:  # nothing seen: a list of per-batch tensors before a DDP sync, a tensor after it
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        keys, values = dim_zero_cat(self.keys), dim_zero_cat(self.values)
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((unique.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
        first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
        return values[first].mean()
