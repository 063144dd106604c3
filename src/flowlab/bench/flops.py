"""FLOPs of one training step, counted (not assumed) with ``torch.utils.flop_counter.FlopCounterMode``.

The counter adds up the matrix work of the step's forward and backward (convolutions, matmuls,
their gradients) as PyTorch's formulas define it (2 FLOPs per multiply-add). Element-wise work
and the optimiser step are not counted, as in the usual MFU definition. MFU is achieved FLOP/s
(FLOPs per image x training images/s) over a peak given by the user (default: the H200's
measured bf16 matrix peak, 790e12).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

H200_BF16_PEAK = 790e12


def training_flops(loss_fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
                   x: torch.Tensor) -> int:
    """FLOPs of forward + backward of ``loss_fn(x)`` (eager; the gradients are thrown away)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_fn(x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float) -> float:
    return flops_per_image * images_per_s / peak_flops
