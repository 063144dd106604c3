"""Multi-scale parts of RealNVP / Glow: squeeze, split with a learned conditional prior, learned top prior."""

import math

import torch
from torch import nn

from .coupling import ZeroConv2d
from .utils import in_accumulation_dtype, sum_except_batch

_LOG_2PI = math.log(2 * math.pi)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """2×2 space-to-depth: [B, C, H, W] -> [B, 4C, H/2, W/2] (Glow's channel order)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class Squeeze(nn.Module):
    """Squeeze as a flow layer (a permutation of entries: log-det 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2d(x), in_accumulation_dtype(x.new_zeros(x.shape[0]))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze2d(y)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logs)²) summed per sample, in float32 (or float64)."""
    z, mean, logs = in_accumulation_dtype(z), in_accumulation_dtype(mean), in_accumulation_dtype(logs)
    return sum_except_batch(-0.5 * (_LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs)))


def gaussian_sample(mean: torch.Tensor, logs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean + temperature · exp(logs) · ε``; temperature 0 gives the mean exactly."""
    if temperature == 0:
        return mean
    return mean + temperature * torch.exp(logs) * torch.randn_like(mean)


class SplitPrior(nn.Module):
    """Glow's split: factor out half the channels, with N(mean, exp(logs)²) predicted from the kept half.

    The predicting convolution is zero-initialised, so a new prior is N(0, I); ``edge_bias`` as in
    openai/glow's ``split2d_prior`` (see :func:`flowlab.flows.coupling.conv_same`).
    """

    def __init__(self, channels: int, edge_bias: bool = False):
        super().__init__()
        self.keep = channels // 2
        self.conv = ZeroConv2d(self.keep, 2 * (channels - self.keep), edge_bias=edge_bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.keep], x[:, self.keep :]

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the factored-out half, given the kept half."""
        h = self.conv(kept)
        return h[:, 0::2], h[:, 1::2]


class TopPrior(nn.Module):
    """Prior of the last level's latent: N(0, I), or per-channel learned mean and log-std (``learn_top``)."""

    def __init__(self, channels: int, learn: bool = True):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)

    def forward(self, shape: torch.Size, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std expanded to ``shape``; ``y`` is not used (see :mod:`flowlab.flows.conditional`)."""
        return self.mean.expand(shape), self.logs.expand(shape)
