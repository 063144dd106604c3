"""An exponential moving average of a model's weights, kept as a frozen copy of the model.

The copy is a submodule of the LightningModule, so it is saved in and restored from checkpoints
with everything else. Floating-point parameters are averaged; buffers (ActNorm's ``initialized``
flag, fixed permutations) are copied, since averaging them means nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from flowlab.errors import check_number

__all__ = ["EMA"]


class EMA(nn.Module):
    """``shadow ← decay · shadow + (1 − decay) · weights`` after every optimiser step.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
    is not dominated by the initial weights early in training.
    """

    def __init__(self, model: nn.Module, decay: float, key: str = "decay"):
        super().__init__()
        self.decay = check_number(key, decay, 0.0, 1.0, low_open=True, high_open=True)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self._n = 0  # host-side mirror of num_updates: no device sync per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n = int(self.num_updates)

    def train(self, mode: bool = True) -> EMA:  # the copy always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Make the average an exact copy of ``model`` (after ActNorm's data-dependent initialisation)."""
        self.module.load_state_dict(model.state_dict())
        self.num_updates.zero_()
        self._n = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self._n
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        shadow = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        current = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        if shadow:
            torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for b_shadow, b in zip(self.module.buffers(), model.buffers()):
            b_shadow.copy_(b)
        self.num_updates += 1
        self._n += 1
