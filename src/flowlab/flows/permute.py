"""RealNVP's fixed channel permutations: reverse and a fixed random shuffle (log-det 0)."""

import torch
from torch import nn


class ChannelPermutation(nn.Module):
    """Permutes channels by a fixed index buffer; volume preserving."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long())
        self.register_buffer("inv_perm", torch.argsort(perm).long())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inv_perm]


class Reverse(ChannelPermutation):
    """Reverses the channel order (RealNVP / Glow's 'reverse' baseline)."""

    def __init__(self, channels: int):
        super().__init__(torch.arange(channels - 1, -1, -1))


class Shuffle(ChannelPermutation):
    """A fixed random channel permutation, drawn once and stored as a buffer."""

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__(torch.randperm(channels, generator=generator))
