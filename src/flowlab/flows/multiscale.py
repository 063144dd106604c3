"""Multi-scale parts of RealNVP / Glow: squeeze, splits with their priors, the top prior (class-conditional too)."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .coupling import ZeroConv2d
from .utils import in_accumulation_dtype, sum_except_batch


class Squeeze(nn.Module):
    """2×2 space-to-depth, [B, C, H, W] -> [B, 4C, H/2, W/2] in Glow's channel order ``c·4 + 2i + j``: a permutation of
    entries, log-det 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return y, in_accumulation_dtype(x.new_zeros(b))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        return y.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logs)²) summed per sample, in float32 (or float64)."""
    z, mean, logs = in_accumulation_dtype(z), in_accumulation_dtype(mean), in_accumulation_dtype(logs)
    return sum_except_batch(-0.5 * (math.log(2 * math.pi) + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs)))


def gaussian_sample(mean: torch.Tensor, logs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean + temperature · exp(logs) · ε``; temperature 0 gives the mean exactly."""
    if temperature == 0:
        return mean
    return mean + temperature * torch.exp(logs) * torch.randn_like(mean)


class StandardSplit(nn.Module):
    """RealNVP's split: factor out half the channels, scored under N(0, I) (``forward`` gives mean 0, log-std 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.out_channels = channels - self.keep

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.keep], x[:, self.keep :]

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the factored-out half, given the kept half."""
        zeros = kept.new_zeros(kept.shape[0], self.out_channels, *kept.shape[2:])
        return zeros, zeros


class SplitPrior(StandardSplit):
    """Glow's split: N(mean, exp(logs)²) of the factored-out half predicted from the kept half by a zero-initialised
    convolution (a new prior is N(0, I)); ``edge_bias`` as openai/glow's ``split2d_prior``."""

    def __init__(self, channels: int, edge_bias: bool = False):
        super().__init__(channels)
        self.conv = ZeroConv2d(self.keep, 2 * self.out_channels, edge_bias=edge_bias)

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(kept)
        return h[:, 0::2], h[:, 1::2]


class TopPrior(nn.Module):
    """Prior of the last level's latent: N(0, I), or per-channel learned mean and log-std (``learn_top``)."""

    def __init__(self, channels: int, learn: bool = True):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)

    def forward(self, shape: torch.Size, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std expanded to ``shape``; ``y`` is not used (see :class:`ConditionalTopPrior`)."""
        return self.mean.expand(shape), self.logs.expand(shape)


class LinearZeros(nn.Module):
    """openai/glow's ``linear_zeros``: ``(x W + b) · exp(3 · logs)``, all zero-initialised."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logs = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.exp(self.logs * 3.0)


class ConditionalTopPrior(TopPrior):
    """Glow's class-conditional top prior (openai/glow ``prior()`` with ``ycond``): N(mean(y), exp(logs(y))²), the
    :class:`TopPrior`'s mean and log-std plus ``[mean | logs] = LinearZeros(one_hot(y))`` at every position.
    ``classifier`` (with ``classify``) maps the mean-pooled top latent to the class logits of Glow's loss
    ``bits_x + y_weight · CE(logits, y) / ln 2``. Zero-initialised: a new prior is the unconditional one."""

    def __init__(self, channels: int, n_classes: int, learn: bool = True, classify: bool = True):
        super().__init__(channels, learn)
        self.n_classes = n_classes
        self.y_emb = LinearZeros(n_classes, 2 * channels)
        self.classifier = LinearZeros(channels, n_classes) if classify else None

    def forward(self, shape: torch.Size, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.y_emb(F.one_hot(y, self.n_classes).to(self.mean.dtype))[:, :, None, None]
        c = self.mean.shape[1]
        return (self.mean + h[:, :c]).expand(shape), (self.logs + h[:, c:]).expand(shape)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits [B, n_classes] from the top latent ``z`` [B, C, H, W] (mean over positions)."""
        return self.classifier(z.to(self.mean.dtype).mean(dim=(2, 3)))
