"""Glow (Kingma & Dhariwal, 2018) with a choice of channel-mixing layer, the paper's n×n conv by default.

L levels of (squeeze → K flow steps → split), no split after the last level; a flow step is
ActNorm → channel mixing (``permutation``) → coupling. The data convention and bits/dim are
defined once, in :mod:`flowlab.flows.base`.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from . import batched
from .actnorm import ActNorm
from .base import MultiScaleFlow
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .emerging import EmergingConv
from .multiscale import Squeeze
from .nxn import InvertibleNxNConv
from .permute import Reverse, Shuffle
from .utils import per_sample, pointwise_conv

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
    """ActNorm → channel mixing → coupling."""

    def __init__(self, channels: int, hidden_channels: int, permutation: str, coupling: str, kernel_size: int = 3,
                 nxn_conv1x1: str = "plain", edge_bias: bool = False, actnorm_logscale_factor: float = 1.0):
        super().__init__()
        self.actnorm = ActNorm(channels, actnorm_logscale_factor)
        self.permutation = PERMUTATIONS[permutation](channels, kernel_size, nxn_conv1x1)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels, edge_bias=edge_bias,
                                            logscale_factor=actnorm_logscale_factor)

        # ActNorm followed by a mixing layer that is affine per pixel (1×1 conv, n×n conv) is one
        # composed 1×1 convolution: weights composed once per step, one matrix product per pixel.
        self.foldable = hasattr(self.permutation, "affine")

    def forward(self, x: torch.Tensor, mixing: tuple[torch.Tensor, torch.Tensor] | None = None,
                net_weights: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)``. ``mixing`` = (A, c), the composed ActNorm + mixing layer computed beforehand
        (see :mod:`flowlab.flows.batched`): then its data-independent log-det is left to the caller and
        only the coupling's is returned. ``net_weights``: the coupling network's folded weights."""
        if mixing is not None:
            x, ld3 = self.coupling(pointwise_conv(x, *mixing), net_weights)
            return x, ld3
        if not self.foldable:
            x, ld1 = self.actnorm(x)
            x, ld2 = self.permutation(x)
        else:
            if self.training and not self.actnorm._initialized:
                self.actnorm.initialize(x)
            weight, bias = self.permutation.affine()
            scale, shift = self.actnorm.scale_shift()
            composed_bias = weight @ shift if bias is None else weight @ shift + bias
            x = pointwise_conv(x, weight * scale.unsqueeze(0), composed_bias)
            ld1 = per_sample(self.actnorm.logdet(x.shape[2], x.shape[3]), x)
            ld2 = per_sample(self.permutation.logdet(x.shape[2], x.shape[3]), x)
        x, ld3 = self.coupling(x, net_weights)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.inverse(y)
        if not self.foldable:
            return self.actnorm.inverse(self.permutation.inverse(y))
        # x = diag(1/s)·(A⁻¹ y + c') − b  with the mixing layer's inverse (A⁻¹, c').
        weight_inv, bias_inv = self.permutation.inverse_affine()
        inv_scale = torch.exp(-self.actnorm.log_scale()).view(-1, 1)
        weight = weight_inv * inv_scale
        bias = -self.actnorm.bias.view(-1)
        if bias_inv is not None:
            bias = bias + bias_inv * inv_scale.view(-1)
        return pointwise_conv(y, weight, bias)


class Glow(MultiScaleFlow):
    """Glow with a configurable channel-mixing layer (``permutation``).

    ``nxn_conv1x1``: the form of the 1×1 convolution inside the n×n conv, ``"plain"`` (a free
    matrix, openai/glow's default 1×1, so ``permutation=nxn`` pairs with ``conv1x1``) or ``"lu"``
    (pairs with ``conv1x1_lu``); ignored by the other permutations. ``edge_bias`` and
    ``actnorm_logscale_factor``: openai/glow's edge-bias padding channel in the 3×3 convolutions
    of the coupling networks and priors (:func:`flowlab.flows.coupling.conv_same`) and its ActNorm
    log-scale factor (3 there; :class:`ActNorm`); both off (False, 1) by default.
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
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits)
        self.permutation, self.coupling = permutation, coupling
        self.edge_bias = edge_bias

        shape = (in_channels, *self.image_size)
        for _ in range(L):
            channels, height, width = shape[0] * 4, shape[1] // 2, shape[2] // 2
            steps = [FlowStep(channels, hidden_channels, permutation, coupling, kernel_size, nxn_conv1x1, edge_bias,
                              float(actnorm_logscale_factor)) for _ in range(K)]
            shape = self.add_level([Squeeze(), *steps], (channels, height, width))
        self.finish(shape, learn_top)

    @staticmethod
    def _actnorms(layers: nn.ModuleList) -> list[ActNorm]:
        """Every ActNorm of a level, found once and kept on the level (a copy of the model copies the
        list with it, pointing at its own ActNorms): the training step asks on every forward."""
        found = layers.__dict__.get("_actnorms")
        if found is None:
            found = layers.__dict__["_actnorms"] = [m for m in layers.modules() if isinstance(m, ActNorm)]
        return found

    def _encode_level(self, layers: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The level's steps with their weights computed for all K steps at once (:mod:`.batched`).

        Falls back to step-by-step weights where that is not possible: while any ActNorm still
        waits for its data-dependent initialisation, and for mixing layers other than 1×1 / n×n
        convolutions (their coupling networks are still batched).
        """
        squeeze, steps = layers[0], list(layers[1:])
        needs_init = self.training and any(not m._initialized for m in self._actnorms(layers))
        if len(steps) < 2 or needs_init:
            return super()._encode_level(layers, h)
        h, logdet = squeeze(h)
        nets = [s.coupling.net for s in steps]
        net_weights = (batched.coupling_net_weights(nets, nets[0].compute_dtype or h.dtype)
                       if batched.nets_supported(nets) else [None] * len(steps))
        permutations = [s.permutation for s in steps]
        if batched.mixing_supported(permutations):
            mixing, mixing_logdet = batched.mixing_weights([s.actnorm for s in steps], permutations, *h.shape[2:])
            logdet = logdet + per_sample(mixing_logdet, h)
        else:
            mixing = [None] * len(steps)
        for step, mix, weights in zip(steps, mixing, net_weights):
            h, ld = step(h, mix, weights)
            logdet = logdet + ld
        return h, logdet
