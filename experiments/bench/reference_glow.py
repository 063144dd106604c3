"""A plain, eager, float32 Glow written the way the public PyTorch implementations write it.

The yardstick of ``flowlab-bench``: flowlab's Glow (``permutation=conv1x1_lu``, affine coupling) is
timed against it, side by side, in alternating rounds. It is not part of flowlab: it imports torch
only (never ``flowlab``), and the benchmark loads it by path.

It follows the structure of rosinality/glow-pytorch (ActNorm, InvConv2dLU, AffineCoupling with a
``sigmoid(h + 2)`` scale, ZeroConv2d, Flow, Block with squeeze / split / learned prior), in our
own code, with the architecture of ``flowlab.flows.Glow(permutation="conv1x1_lu",
coupling="affine")``: the coupling network is 3x3 conv -> ActNorm -> ReLU -> 1x1 conv -> ActNorm ->
ReLU -> zero-initialised 3x3 conv, as in openai/glow.

Written honestly, with the idioms of those implementations and nothing slowed down on purpose:

* the LU-decomposed 1x1 weight ``P L (U + diag(sign(s) exp(log|s|)))`` is recomposed on every
  forward and inverted with ``torch.inverse`` on every inverse call;
* the 1x1 log-determinant is ``H W sum(log|s|)`` (no slogdet);
* ActNorm keeps its ``initialized`` flag in a buffer (so it is saved) and checks it with a Python
  ``if`` on every call, which on a GPU is a host synchronisation, as in those implementations;
* element-wise work is left unfused, in float32, eager.

Interface (flowlab's contract, so the benchmark drives both models alike): ``encode(x) -> (zs,
logdet[B])`` with ``logdet = log|det dz/dx|`` (no prior term), ``decode(zs) -> x``,
``sample(n, temperature)``, ``log_prob(x)`` in nats and ``bits_per_dim(x)`` including the
discretisation term ``D n_bits ln 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialised from the first training batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.mean(1).view(1, -1, 1, 1)
        std = flat.std(1).view(1, -1, 1, 1)
        self.loc.copy_(-mean)
        self.scale.copy_(1 / (std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.initialized:
            self.initialize(x)
        logdet = x.shape[2] * x.shape[3] * torch.log(torch.abs(self.scale)).sum()
        return self.scale * (x + self.loc), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.scale - self.loc


class InvConv2dLU(nn.Module):
    """Glow's invertible 1x1 convolution with the weight kept as ``P L (U + diag(s))``."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(channels, channels), 1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(channels))
        self.w_l = nn.Parameter(lower)
        self.w_s = nn.Parameter(torch.log(torch.abs(s)))
        self.w_u = nn.Parameter(torch.triu(upper, 1))

    def weight(self) -> torch.Tensor:
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s))
        return self.w_p @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        logdet = x.shape[2] * x.shape[3] * self.w_s.sum()
        return F.conv2d(x, w.unsqueeze(2).unsqueeze(3)), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, self.weight().inverse().unsqueeze(2).unsqueeze(3))


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 convolution (padding with ones) with a learned ``exp(3 * scale)`` gain."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.pad(x, [1, 1, 1, 1], value=1))
        return out * torch.exp(self.scale * 3)


class ConvActNorm(nn.Module):
    """Convolution without bias followed by ActNorm (the log-det of this ActNorm is not used)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.conv.weight.data.normal_(0, 0.05)
        self.norm = ActNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))[0]


class AffineCoupling(nn.Module):
    """``y_b = (x_b + t) * sigmoid(h + 2)`` with ``(h, t) = NN(x_a)``; ``x_a`` passes through."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            ConvActNorm(channels // 2, hidden, 3),
            nn.ReLU(inplace=True),
            ConvActNorm(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x.chunk(2, 1)
        log_s, t = self.net(x_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        y_b = (x_b + t) * s
        logdet = torch.log(s).view(x.shape[0], -1).sum(1)
        return torch.cat([x_a, y_b], 1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y.chunk(2, 1)
        log_s, t = self.net(y_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([y_a, y_b / s - t], 1)


class Flow(nn.Module):
    """One flow step: ActNorm -> invertible 1x1 conv (LU) -> affine coupling."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv2dLU(channels)
        self.coupling = AffineCoupling(channels, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        return out, logdet + det1 + det2

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


def gaussian_log_p(x: torch.Tensor, mean: torch.Tensor, log_sd: torch.Tensor) -> torch.Tensor:
    return -0.5 * LOG_2PI - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


def squeeze2(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.contiguous().view(b, c * 4, h // 2, w // 2)


def unsqueeze2(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.contiguous().view(b, c // 4, h * 2, w * 2)


class Block(nn.Module):
    """One level: squeeze -> K flow steps -> split off half (learned conditional prior), or the top prior."""

    def __init__(self, in_channels: int, K: int, hidden: int, split: bool):
        super().__init__()
        c = in_channels * 4
        self.split = split
        self.flows = nn.ModuleList([Flow(c, hidden) for _ in range(K)])
        self.prior = ZeroConv2d(c // 2, c) if split else ZeroConv2d(c, 2 * c)

    def forward(self, x: torch.Tensor):
        out = squeeze2(x)
        logdet = 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        if self.split:
            out, z = out.chunk(2, 1)
            mean, log_sd = self.prior(out).chunk(2, 1)
        else:
            z = out
            mean, log_sd = self.prior(torch.zeros_like(out)).chunk(2, 1)
        log_p = gaussian_log_p(z, mean, log_sd).view(x.shape[0], -1).sum(1)
        return out, logdet, log_p, z

    def inverse(self, out: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([out, z], 1) if self.split else z
        for flow in reversed(self.flows):
            x = flow.inverse(x)
        return unsqueeze2(x)

    def prior_params(self, out: torch.Tensor | None, like: torch.Tensor | None = None):
        inp = out if self.split else torch.zeros_like(like)
        return self.prior(inp).chunk(2, 1)


class ReferenceGlow(nn.Module):
    """Multi-scale Glow (L levels of squeeze -> K steps -> split) with LU 1x1 convs and affine couplings."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, K: int = 32, L: int = 3,
                 hidden_channels: int = 512, n_bits: int = 8):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("K", K), ("L", L),
                           ("hidden_channels", hidden_channels), ("n_bits", n_bits)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ReferenceGlow: {key}={value!r} must be a positive integer")
        if image_size % (2 ** L):
            raise ValueError(f"ReferenceGlow: image_size={image_size} must be divisible by 2**L={2 ** L}")
        self.in_channels, self.image_size, self.n_bits = in_channels, image_size, n_bits
        self.blocks = nn.ModuleList()
        c = in_channels
        for level in range(L):
            split = level < L - 1
            self.blocks.append(Block(c, K, hidden_channels, split))
            c = c * 2 if split else c * 4
        self.top_shape = (c, image_size // 2 ** L, image_size // 2 ** L)

    def _forward(self, x: torch.Tensor):
        zs, logdet, log_p = [], 0, 0
        out = x
        for block in self.blocks:
            out, det, lp, z = block(out)
            zs.append(z)
            logdet = logdet + det
            log_p = log_p + lp
        return zs, logdet, log_p

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        zs, logdet, _ = self._forward(x)
        return zs, logdet

    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for block, z in zip(reversed(self.blocks), reversed(zs)):
            out = block.inverse(out, z)
        return out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _, logdet, log_p = self._forward(x)
        return log_p + logdet

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        dims = x[0].numel()
        return (-self.log_prob(x) + dims * self.n_bits * math.log(2)) / (dims * math.log(2))

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        p = self.blocks[0].prior.scale
        out = None
        for block in reversed(self.blocks):
            if block.split:
                mean, log_sd = block.prior_params(out)
            else:
                like = torch.zeros(n, *self.top_shape, device=p.device, dtype=p.dtype)
                mean, log_sd = block.prior_params(None, like)
            z = mean + torch.exp(log_sd) * temperature * torch.randn_like(mean)
            out = block.inverse(out, z)
        return out
