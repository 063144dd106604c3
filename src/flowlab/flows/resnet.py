"""RealNVP's s/t network: a residual network with batch and weight normalisation (Dinh et al., 2017, sections 3.7
and 4.1), following the released code (``resnet`` / ``residual_block`` in ``real_nvp_multiscale_dataset.py``) and
chrischute/real-nvp::

    h   = BN(x)  (×2 for checkerboard couplings)
    h   = ReLU([h, −h (, mask)])                      concatenated ReLU; the checkerboard mask as a channel
    h   = conv3×3(h);  out = conv1×1(h)               input convolution and skip
    for each residual block:
        h = h + conv3×3(ReLU(BN(conv3×3(ReLU(BN(h))))))
        out = out + conv1×1(h)                          a skip connection from every block
    return conv1×1(ReLU(BN(out)))                      zero-initialised: a new coupling is the identity

Every convolution is weight-normalised, ``w = g · v/‖v‖`` per output channel (Salimans & Kingma, 2016). The batch
norms learn a shift only (``scale=False`` in the reference), ε = 1e-4, momentum 0.1, batch statistics in a
training-mode forward and running averages otherwise (always when a coupling is inverted); per process under DDP,
as PyTorch's BatchNorm2d. The network runs in its input's dtype (RealNVP has no bfloat16 fast path).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .utils import pointwise_conv


class WNConv2d(nn.Module):
    """Weight-normalised convolution (stride 1, 'same' padding): ``w = g · v / ‖v‖`` per output channel; ``v`` starts
    as PyTorch's default initialisation, ``g`` as ``‖v‖`` (or 0 with ``zero``), the bias at 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, zero: bool = False):
        super().__init__()
        v = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False).weight.detach().clone()
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(torch.zeros(out_channels) if zero else v.flatten(1).norm(dim=1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.v * (self.g / self.v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if w.shape[2] == 1 and w.shape[3] == 1:
            return pointwise_conv(x, w.flatten(1), bias)
        return F.conv2d(x, w, bias, padding=self.padding)


class NetBatchNorm(nn.Module):
    """Batch norm inside the s/t network: ``(x − μ)/sqrt(σ² + ε) + β`` (a learned shift, no scale)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias.to(x.dtype),
                            training=batch_stats, momentum=self.momentum, eps=self.eps)


class ResidualBlock(nn.Module):
    """``h + conv3×3(ReLU(BN(conv3×3(ReLU(BN(h))))))``; the first convolution has no bias (a BN follows)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = NetBatchNorm(channels)
        self.conv1 = WNConv2d(channels, channels, 3, bias=False)
        self.norm2 = NetBatchNorm(channels)
        self.conv2 = WNConv2d(channels, channels, 3)

    def forward(self, h: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        r = self.conv1(F.relu(self.norm1(h, batch_stats)))
        return h + self.conv2(F.relu(self.norm2(r, batch_stats)))


class ResNet(nn.Module):
    """The s/t network of a RealNVP coupling (module docstring); ``double_after_norm`` and ``extra`` (of
    ``extra_channels``, after the concatenated ReLU) are the reference's for checkerboard couplings."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, num_blocks: int,
                 double_after_norm: bool = False, extra_channels: int = 0):
        super().__init__()
        self.double_after_norm = double_after_norm
        self.in_norm = NetBatchNorm(in_channels)
        self.in_conv = WNConv2d(2 * in_channels + extra_channels, hidden_channels, 3)
        self.in_skip = WNConv2d(hidden_channels, hidden_channels, 1)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_channels) for _ in range(num_blocks))
        self.skips = nn.ModuleList(WNConv2d(hidden_channels, hidden_channels, 1) for _ in range(num_blocks))
        self.out_norm = NetBatchNorm(hidden_channels)
        self.out_conv = WNConv2d(hidden_channels, out_channels, 1, zero=True)

    def forward(self, x: torch.Tensor, batch_stats: bool, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_norm(x, batch_stats)
        if self.double_after_norm:
            h = 2.0 * h
        parts = [h, -h] if extra is None else [h, -h, extra.to(h.dtype)]
        h = self.in_conv(F.relu(torch.cat(parts, dim=1)))
        out = self.in_skip(h)
        for block, skip in zip(self.blocks, self.skips):
            h = block(h, batch_stats)
            out = out + skip(h)
        return self.out_conv(F.relu(self.out_norm(out, batch_stats)))
