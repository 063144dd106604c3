"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017): its own multi-scale architecture.

At each level but the last: K checkerboard-masked affine couplings (alternating parity) at the
current resolution → squeeze → K channel-wise masked affine couplings (alternating halves) →
factor out half the channels. The last level: K + 1 checkerboard couplings. The alternation is
fixed: there is no learned channel mixing, which is what the RealNVP row of Table 2 measures.

Scales are ``exp(scale · tanh(s))`` with a learned per-channel ``scale`` (RealNVP's stabilised
scale). Where RealNVP used batch normalisation, this implementation puts an ActNorm before each
coupling (same role, no train/eval mismatch). The coupling networks are the same as Glow's, so
the comparison is about the flow's structure. Priors follow Glow's split (learned conditional
prior, zero-initialised, i.e. N(0, I) at the start); ``learn_top=False`` keeps the top at N(0, I).
"""

from collections.abc import Sequence

import torch
from torch import nn

from .actnorm import ActNorm
from .base import MultiScaleFlow
from .coupling import CouplingNet
from .multiscale import Squeeze
from .utils import exact, sum_except_batch


class _MaskedAffineCoupling(nn.Module):
    """``y = m⊙x + (1−m)⊙(x·exp(s) + t)`` with ``s, t`` computed from ``m⊙x``; log-det ``Σ (1−m)⊙s``."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.net = CouplingNet(channels, 2 * channels, hidden_channels)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _s_t(self, x_masked: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x_masked)
        s = (self.scale * torch.tanh(exact(h[:, 0::2]))) * (1 - m)
        t = h[:, 1::2] * (1 - m)
        return s, t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mask(x)
        s, t = self._s_t(x * m, m)
        y = x * m + (1 - m) * (x * torch.exp(s) + t)
        return y.to(x.dtype), sum_except_batch(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        m = self.mask(y)
        s, t = self._s_t(y * m, m)
        return (y * m + (1 - m) * ((y - t) * torch.exp(-s))).to(y.dtype)


class CheckerboardCoupling(_MaskedAffineCoupling):
    """Spatial checkerboard mask; ``parity`` chooses which squares condition."""

    def __init__(self, channels: int, hidden_channels: int, parity: int):
        super().__init__(channels, hidden_channels)
        self.parity = parity

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        ii = torch.arange(h, device=x.device).view(h, 1)
        jj = torch.arange(w, device=x.device).view(1, w)
        return ((ii + jj + self.parity) % 2).to(x.dtype).view(1, 1, h, w)


class ChannelCoupling(_MaskedAffineCoupling):
    """Channel-wise mask: one half of the channels conditions the other; ``flip`` swaps the halves."""

    def __init__(self, channels: int, hidden_channels: int, flip: bool):
        super().__init__(channels, hidden_channels)
        m = torch.zeros(1, channels, 1, 1)
        half = channels // 2
        if flip:
            m[:, half:] = 1
        else:
            m[:, :half] = 1
        self.register_buffer("channel_mask", m)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mask.to(x.dtype)


class _NormThenCoupling(nn.Module):
    """ActNorm → masked affine coupling."""

    def __init__(self, channels: int, coupling: nn.Module):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.coupling = coupling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.coupling(x)
        return x, ld1 + ld2

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.coupling.inverse(y))


class RealNVP(MultiScaleFlow):
    """RealNVP's multi-scale architecture with the same contract as :class:`flowlab.flows.Glow`."""

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        K: int,
        L: int,
        hidden_channels: int,
        learn_top: bool = False,
        n_bits: int = 8,
    ):
        # Every level but the last squeezes once; the last works at the resolution it gets.
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits, squeezes=L - 1)
        self.permutation = "realnvp"

        def checker(c: int, count: int) -> list[nn.Module]:
            return [_NormThenCoupling(c, CheckerboardCoupling(c, hidden_channels, parity=i % 2)) for i in range(count)]

        def channelwise(c: int, count: int) -> list[nn.Module]:
            return [_NormThenCoupling(c, ChannelCoupling(c, hidden_channels, flip=bool(i % 2))) for i in range(count)]

        shape = (in_channels, *self.image_size)
        for level in range(L):
            c, h, w = shape
            if level < L - 1:
                layers = [*checker(c, K), Squeeze(), *channelwise(4 * c, K)]
                shape = self.add_level(layers, (4 * c, h // 2, w // 2))
            else:
                shape = self.add_level(checker(c, K + 1), shape)
        self.finish(shape, learn_top)
