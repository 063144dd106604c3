"""Glow (Kingma & Dhariwal, 2018) with a choice of channel-mixing layer, the paper's n×n conv by default.

L levels of (squeeze → K flow steps → split), no split after the last level; a flow step is
ActNorm → channel mixing (``permutation``) → coupling. The data convention and bits/dim are
defined once, in :mod:`flowlab.flows.base`.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .actnorm import ActNorm
from .base import MultiScaleFlow, check_image_size, check_int, check_n_bits
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .emerging import EmergingConv
from .multiscale import Squeeze
from .nxn import InvertibleNxNConv
from .permute import Reverse, Shuffle

PERMUTATIONS = {
    "nxn": lambda c, k: InvertibleNxNConv(c, kernel_size=k, lu=True),
    "conv1x1": lambda c, k: InvertibleConv1x1(c, lu=False),
    "conv1x1_lu": lambda c, k: InvertibleConv1x1(c, lu=True),
    "reverse": lambda c, k: Reverse(c),
    "shuffle": lambda c, k: Shuffle(c),
    "emerging": lambda c, k: EmergingConv(c, kernel_size=k, lu=True),
}
COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling}


class FlowStep(nn.Module):
    """ActNorm → channel mixing → coupling."""

    def __init__(self, channels: int, hidden_channels: int, permutation: str, coupling: str, kernel_size: int = 3):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.permutation = PERMUTATIONS[permutation](channels, kernel_size)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.permutation(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.permutation.inverse(self.coupling.inverse(y)))


class Glow(MultiScaleFlow):
    """Glow with a configurable channel-mixing layer (``permutation``)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        K: int,
        L: int,
        hidden_channels: int,
        permutation: str = "nxn",
        coupling: str = "affine",
        learn_top: bool = True,
        n_bits: int = 8,
        kernel_size: int = 3,
    ):
        check_int("in_channels", in_channels, 1)
        check_int("model.K", K, 1)
        check_int("model.L", L, 1)
        check_int("model.hidden_channels", hidden_channels, 1)
        check_n_bits(n_bits)
        if permutation not in PERMUTATIONS:
            raise ConfigError(f"model.permutation={permutation!r} is unknown; allowed: {', '.join(PERMUTATIONS)}")
        if coupling not in COUPLINGS:
            raise ConfigError(f"model.coupling={coupling!r} is unknown; allowed: {', '.join(COUPLINGS)}")
        height, width = check_image_size(image_size, L)
        super().__init__(in_channels, (height, width), L, n_bits)
        self.K, self.permutation, self.coupling = K, permutation, coupling

        shape = (in_channels, height, width)
        for _ in range(L):
            channels, height, width = shape[0] * 4, shape[1] // 2, shape[2] // 2
            steps = [FlowStep(channels, hidden_channels, permutation, coupling, kernel_size) for _ in range(K)]
            shape = self.add_level([Squeeze(), *steps], (channels, height, width))
        self.finish(shape, learn_top)
