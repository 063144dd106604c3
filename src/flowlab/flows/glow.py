"""Glow (Kingma & Dhariwal, 2018) with a choice of channel-mixing layer, the paper's n×n conv by default.

Data convention (written down once, here). An image with integer values ``v ∈ {0, …, 2^n_bits − 1}``
is preprocessed to ``x = v / 2^n_bits − 0.5 + u``, ``u ~ U[0, 1/2^n_bits)``: a continuous point in
the pixel's bin of width ``1/2^n_bits`` inside [−0.5, 0.5]. ``log_prob(x)`` is the continuous
log-density in nats; the discrete log-likelihood of ``v`` is bounded below by
``log_prob(x) − D·n_bits·ln 2`` (D = C·H·W), so bits/dim, the figure of the paper's Table 2, is

    bits_per_dim(x) = (−log_prob(x) / D + n_bits · ln 2) / ln 2.

Architecture: L levels of (squeeze → K flow steps → split), no split after the last level; a flow
step is ActNorm → channel mixing (``permutation``) → coupling. Each split factors out half the
channels with a learned conditional prior; the last level's latent has a learned per-channel prior
(``learn_top``) or N(0, I).
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .actnorm import ActNorm
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling
from .emerging import EmergingConv
from .multiscale import SplitPrior, TopPrior, gaussian_log_prob, gaussian_sample, squeeze2d, unsqueeze2d
from .nxn import InvertibleNxNConv
from .permute import Reverse, Shuffle
from .utils import exact

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


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed: it must be an integer ≥ {minimum}")
    return value


def check_image_size(image_size, L: int) -> tuple[int, int]:
    """(H, W) from an int or a pair; raise ConfigError unless both are divisible by 2^L."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
        raise ConfigError(f"image_size={image_size!r} is not allowed: give a positive int or (height, width)")
    factor = 2**L
    for s in sorted(set(hw)):
        if s % factor:
            raise ConfigError(
                f"model.L={L}: image size {s} is not divisible by 2^{L} = {factor}; "
                f"use a smaller L (at most {int(math.log2(s & -s))} for size {s}) or resize/pad the images"
            )
    return hw  # type: ignore[return-value]


class Glow(nn.Module):
    """Glow with a configurable channel-mixing layer; see the module docstring for the data convention."""

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
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("model.K", K, 1)
        _check_int("model.L", L, 1)
        _check_int("model.hidden_channels", hidden_channels, 1)
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
            raise ConfigError(f"n_bits={n_bits!r} is not allowed: it must be an integer in 1..8")
        if permutation not in PERMUTATIONS:
            raise ConfigError(f"model.permutation={permutation!r} is unknown; allowed: {', '.join(PERMUTATIONS)}")
        if coupling not in COUPLINGS:
            raise ConfigError(f"model.coupling={coupling!r} is unknown; allowed: {', '.join(COUPLINGS)}")
        height, width = check_image_size(image_size, L)

        self.in_channels, self.image_size = in_channels, (height, width)
        self.K, self.L, self.n_bits = K, L, n_bits
        self.permutation, self.coupling = permutation, coupling

        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        channels = in_channels
        self.latent_shapes: list[tuple[int, int, int]] = []
        for level in range(L):
            channels, height, width = channels * 4, height // 2, width // 2
            self.levels.append(
                nn.ModuleList(FlowStep(channels, hidden_channels, permutation, coupling, kernel_size) for _ in range(K))
            )
            if level < L - 1:
                split = SplitPrior(channels)
                self.splits.append(split)
                self.latent_shapes.append((channels - split.keep, height, width))
                channels = split.keep
        self.latent_shapes.append((channels, height, width))
        self.top_prior = TopPrior(channels, learn=learn_top)

    @property
    def dims(self) -> int:
        """D = C·H·W, the number of dimensions bits/dim divides by."""
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Glow expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got {list(x.shape)}"
            )

    # -- the map x -> z ---------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(zs, log-det, log prior) in one pass."""
        self._check_input(x)
        logdet = exact(x.new_zeros(x.shape[0]))
        log_prior = torch.zeros_like(logdet)
        zs = []
        h = x
        for level, steps in enumerate(self.levels):
            h = squeeze2d(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level < self.L - 1:
                split = self.splits[level]
                h, z = split.split(h)
                log_prior = log_prior + gaussian_log_prob(z, *split(h))
                zs.append(z)
        log_prior = log_prior + gaussian_log_prob(h, *self.top_prior(h.shape))
        zs.append(h)
        return zs, logdet, log_prior

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(zs, logdet)``: one latent per level (factored-out halves, then the top) and log|det ∂z/∂x| [B]."""
        zs, logdet, _ = self._encode(x)
        return zs, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous log-density of ``x`` in nats, [B] (prior + log-det)."""
        _, logdet, log_prior = self._encode(x)
        return log_prior + logdet

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Bits per dimension [B], including the discretisation term: the number of the paper's tables."""
        return (-self.log_prob(x) / self.dims + self.n_bits * math.log(2)) / math.log(2)

    def initialize(self, x: torch.Tensor) -> None:
        """Run the data-dependent ActNorm initialisation on ``x`` (a no-op once initialised)."""
        was_training = self.training
        self.train()
        with torch.no_grad():
            self._encode(x)
        self.train(was_training)

    # -- the map z -> x ---------------------------------------------------------------------
    def _decode(self, zs: Sequence[torch.Tensor] | None, n: int, temperature: float) -> torch.Tensor:
        """Decode level by level; latents not given are drawn from the prior at ``temperature``."""
        if zs is not None and len(zs) != self.L:
            raise ValueError(f"decode expects {self.L} latents (one per level), got {len(zs)}")
        ref = self.top_prior.mean
        h = zs[-1] if zs is not None else gaussian_sample(*self.top_prior((n, *self.latent_shapes[-1])), temperature)
        for level in reversed(range(self.L)):
            if level < self.L - 1:
                split = self.splits[level]
                z = zs[level] if zs is not None else gaussian_sample(*split(h), temperature)
                h = torch.cat([h, z.to(h.dtype)], dim=1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = unsqueeze2d(h)
        return h.to(ref.dtype)

    def decode(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x`` from the latents returned by :meth:`encode`."""
        return self._decode(list(zs), zs[0].shape[0], 1.0)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` images in [−0.5, 0.5] (roughly); temperature 0 decodes the prior means, level by level."""
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        return self._decode(None, n, temperature)
