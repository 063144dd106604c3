"""Glow (Kingma & Dhariwal, 2018) with a choice of channel-mixing layer, the paper's n×n conv by default.

L levels of (squeeze → K flow steps → split), no split after the last level; a flow step is
ActNorm → channel mixing (``permutation``) → coupling. The data convention and bits/dim are
defined once, in :mod:`flowlab.flows.base`.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
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
#: forms of the 1×1 convolution inside the n×n conv (``nxn_conv1x1``)
CONV1X1_FORMS = ("plain", "lu")


class FlowStep(nn.Module):
    """ActNorm → channel mixing (``permutation``) → coupling."""

    def __init__(self, channels: int, hidden_channels: int, permutation: str, coupling: str, kernel_size: int = 3,
                 nxn_conv1x1: str = "plain", edge_bias: bool = False, actnorm_logscale_factor: float = 1.0):
        super().__init__()
        self.actnorm = ActNorm(channels, actnorm_logscale_factor)
        self.permutation = PERMUTATIONS[permutation](channels, kernel_size, nxn_conv1x1)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels, edge_bias=edge_bias,
                                            logscale_factor=actnorm_logscale_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.permutation(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.permutation.inverse(self.coupling.inverse(y)))


class Glow(MultiScaleFlow):
    """Glow with a configurable channel-mixing layer (``permutation``).

    ``nxn_conv1x1``: the form of the 1×1 convolution inside the n×n conv, ``"plain"`` (a free
    matrix, openai/glow's default 1×1, so ``permutation=nxn`` pairs with ``conv1x1``) or ``"lu"``
    (pairs with ``conv1x1_lu``); ignored by the other permutations. ``edge_bias`` and
    ``actnorm_logscale_factor``: openai/glow's edge-bias padding channel in the 3×3 convolutions
    of the coupling networks and priors (:func:`flowlab.flows.coupling.conv_same`) and its ActNorm
    log-scale factor (3 there; :class:`ActNorm`); both off (False, 1) by default.

    ``fused`` (True unless set otherwise): encode a level's ActNorm + 1×1 / n×n conv pairs as composed
    1×1 convolutions (:mod:`flowlab.flows.fused`), the same map, faster; False runs every layer's own
    ``forward``. Decoding always runs the layers' own ``inverse``.

    ``memory_saving``: what training keeps for backward, ``"none"`` (every activation), ``"checkpoint"`` (each
    flow step's input; recomputed) or ``"invertible"`` (nothing inside a level: reconstructed through the exact
    inverse); the same gradients, see :mod:`flowlab.flows.memory`.

    ``y_condition``, ``n_classes``, ``y_weight``: Glow's class-conditional prior (see :class:`MultiScaleFlow`).
    """

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
        nxn_conv1x1: str = "plain",
        edge_bias: bool = False,
        actnorm_logscale_factor: float = 1.0,
        y_condition: bool = False,
        n_classes: int | None = None,
        y_weight: float = 0.01,
        memory_saving: str = "none",
    ):
        if permutation not in PERMUTATIONS:
            raise ConfigError(f"model.permutation={permutation!r} is unknown; allowed: {', '.join(PERMUTATIONS)}")
        if coupling not in COUPLINGS:
            raise ConfigError(f"model.coupling={coupling!r} is unknown; allowed: {', '.join(COUPLINGS)}")
        if nxn_conv1x1 not in CONV1X1_FORMS:
            raise ConfigError(f"model.nxn_conv1x1={nxn_conv1x1!r} is unknown; allowed: {', '.join(CONV1X1_FORMS)}")
        if not isinstance(edge_bias, bool):
            raise ConfigError(f"model.edge_bias={edge_bias!r} is not allowed: it must be true or false")
        if isinstance(actnorm_logscale_factor, bool) or not isinstance(actnorm_logscale_factor, (int, float)) \
                or not actnorm_logscale_factor > 0:
            raise ConfigError(f"model.actnorm_logscale_factor={actnorm_logscale_factor!r} is not allowed: "
                              "it must be a number > 0 (openai/glow uses 3, 1 is the plain ActNorm)")
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits, y_condition=y_condition,
                         n_classes=n_classes, y_weight=y_weight)
        self.permutation, self.coupling = permutation, coupling
        self.edge_bias = edge_bias
        self.fused = True
        self.memory_saving = memory.check_mode(memory_saving)

        shape = (in_channels, *self.image_size)
        for _ in range(L):
            channels, height, width = shape[0] * 4, shape[1] // 2, shape[2] // 2
            steps = [FlowStep(channels, hidden_channels, permutation, coupling, kernel_size, nxn_conv1x1, edge_bias,
                              float(actnorm_logscale_factor)) for _ in range(K)]
            shape = self.add_level([Squeeze(), *steps], (channels, height, width))
        self.finish(shape, learn_top)

    def _encode_level(self, layers: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squeeze, then the K flow steps as ``memory_saving`` says (:func:`.memory.encode_steps`); with ``fused``,
        where :func:`.fused.applies`, their ActNorm and 1×1 / n×n conv run as composed 1×1 convolutions."""
        steps = list(layers[1:])
        h, logdet = layers[0](h)
        h, ld = memory.encode_steps(steps, h, self.memory_saving, self.fused and fused.applies(steps))
        return h, logdet + ld
