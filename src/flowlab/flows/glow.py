"""Glow (Kingma & Dhariwal, 2018): L levels of (squeeze → K flow steps → split), no split after the last; a flow step
is ActNorm → channel mixing (``permutation``, the paper's n×n conv by default) → coupling."""

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import check_bool, check_choice
from . import fused, memory
from .actnorm import ActNorm
from .base import MultiScaleFlow
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .emerging import EmergingConv
from .multiscale import Squeeze
from .nxn import InvertibleNxNConv
from .permute import Reverse, Shuffle

#: channel-mixing layers by name: (channels, kernel_size, form of the n×n conv's 1×1) -> layer
PERMUTATIONS = {
    "nxn": lambda c, k, inner: InvertibleNxNConv(c, kernel_size=k, lu=inner == "lu"),
    "conv1x1": lambda c, k, inner: InvertibleConv1x1(c, lu=False),
    "conv1x1_lu": lambda c, k, inner: InvertibleConv1x1(c, lu=True),
    "reverse": lambda c, k, inner: Reverse(c),
    "shuffle": lambda c, k, inner: Shuffle(c),
    # ehoogeboom/emerging trains with the plain 1×1 matrix (--decomposition '' by default)
    "emerging": lambda c, k, inner: EmergingConv(c, kernel_size=k, lu=False),
}
COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling}


class FlowStep(nn.Module):
    """ActNorm → channel mixing (``permutation``) → coupling."""

    def __init__(self, channels: int, hidden_channels: int, permutation: str, coupling: str, kernel_size: int = 3,
                 nxn_conv1x1: str = "plain", edge_bias: bool = False, actnorm_logscale_factor: float = 1.0):
        super().__init__()
        self.actnorm = ActNorm(channels, actnorm_logscale_factor)
        self.permutation = PERMUTATIONS[permutation](channels, kernel_size, nxn_conv1x1)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels, edge_bias=edge_bias,
                                            logscale_factor=actnorm_logscale_factor)

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.permutation(x)
        return x, ld1 + ld2

    def unmix(self, h: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.permutation.inverse(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, ld = self.mix(x)
        y, ld_coupling = self.coupling(h)
        return y, ld + ld_coupling

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.unmix(self.coupling.inverse(y))


class Glow(MultiScaleFlow):
    """Glow with a configurable channel-mixing layer (``permutation``).

    ``nxn_conv1x1``: the n×n conv's 1×1 form, ``"plain"`` (pairs with ``conv1x1``) or ``"lu"`` (``conv1x1_lu``).
    ``edge_bias``, ``actnorm_logscale_factor``: openai/glow's edge-bias channel (:func:`.coupling.conv_same`) and
    ActNorm log-scale factor, off (False, 1) by default. ``fused`` (attribute, True): encode ActNorm + 1×1 / n×n conv
    as composed 1×1 convolutions (:mod:`.fused`), the same map, faster. ``memory_saving``: :mod:`.memory`.
    """

    def __init__(self, in_channels: int, image_size: int | Sequence[int], K: int, L: int, hidden_channels: int,
                 permutation: str = "nxn", coupling: str = "affine", learn_top: bool = True, n_bits: int = 8,
                 kernel_size: int = 3, nxn_conv1x1: str = "plain", edge_bias: bool = False,
                 actnorm_logscale_factor: float = 1.0, y_condition: bool = False, n_classes: int | None = None,
                 y_weight: float = 0.01, memory_saving: str = "none"):
        check_choice("model.permutation", permutation, PERMUTATIONS)
        check_choice("model.coupling", coupling, COUPLINGS)
        check_choice("model.nxn_conv1x1", nxn_conv1x1, ("plain", "lu"))
        check_bool("model.edge_bias", edge_bias)
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits, y_condition=y_condition,
                         n_classes=n_classes, y_weight=y_weight)
        self.permutation, self.coupling, self.edge_bias = permutation, coupling, edge_bias
        self.fused = True
        self.memory_saving = check_choice("model.memory_saving", memory_saving, memory.MODES)
        shape = (in_channels, *self.image_size)
        for _ in range(L):
            channels, height, width = shape[0] * 4, shape[1] // 2, shape[2] // 2
            steps = [FlowStep(channels, hidden_channels, permutation, coupling, kernel_size, nxn_conv1x1, edge_bias,
                              actnorm_logscale_factor) for _ in range(K)]
            shape = self.add_level([Squeeze(), *steps], (channels, height, width))
        self.finish(shape, learn_top)

    def _encode_level(self, layers: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squeeze, then the K flow steps (fused where :func:`.fused.applies`) as ``memory_saving`` says."""
        steps = list(layers[1:])
        h, logdet = layers[0](h)
        h, ld = memory.encode_layers(steps, h, self.memory_saving, self.fused and fused.applies(steps))
        return h, logdet + ld
