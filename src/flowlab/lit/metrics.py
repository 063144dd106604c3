"""Bits per dimension of validation and test sets: every image counted exactly once, also under DDP.

:class:`KeyedBitsPerDim`: every value comes with a key (the image's dataset index and the
dequantisation draw) and each key counts once. Under DDP, Lightning's ``DistributedSampler`` pads
the last round of a validation/test set with repeats of the first images so all processes get the
same number; those repeats carry the same key (and, as evaluation noise is keyed by index, the same
value) and are dropped, so the result equals the single-process value. Training bits/dim is a plain
``torchmetrics.MeanMetric`` (see :class:`flowlab.lit.module.FlowModule`).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["KeyedBitsPerDim"]


class KeyedBitsPerDim(Metric):
    """Mean of per-image bits/dim over distinct keys; ``update(bpd, key)`` takes two ``[B]`` tensors.

    Keeps one float64 and one int64 per image (gathered over processes at ``compute``), e.g. 0.8 MB for
    the 50,000 images of ImageNet's validation set.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

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
        from torchmetrics.utilities import dim_zero_cat

        # lists of per-batch tensors before a DDP sync, one gathered tensor after it
        if isinstance(self.keys, list) and not self.keys:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        keys, values = dim_zero_cat(self.keys), dim_zero_cat(self.values)
        if keys.numel() == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((unique.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
        first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
        return values[first].mean()
