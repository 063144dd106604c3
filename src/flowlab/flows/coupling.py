"""Affine and additive coupling layers (RealNVP / Glow) and Glow's coupling network."""

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm
from .utils import LOG_SCALE_BOUND, in_accumulation_dtype, pointwise_conv, sum_except_batch

_EDGE_MAPS: dict[tuple, torch.Tensor] = {}


def _edge_map(height: int, width: int, pad: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, H + 2·pad, W + 2·pad]: 1 in the zero padding around the image, 0 inside it."""
    key = (height, width, pad, dtype, device)
    if key not in _EDGE_MAPS:
        edge = torch.ones(1, 1, height + 2 * pad, width + 2 * pad, dtype=dtype, device=device)
        edge[:, :, pad:pad + height, pad:pad + width] = 0
        _EDGE_MAPS[key] = edge
    return _EDGE_MAPS[key]


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              edge_bias: bool = False) -> torch.Tensor:
    """A 'SAME' (zero-padded) k×k convolution, optionally with Glow's edge bias.

    ``edge_bias`` is openai/glow's ``add_edge_padding`` (``tfops.conv2d`` / ``conv2d_zeros``,
    on by default there): the padded input gets one more channel that is 1 in the padding and 0
    inside the image, so the network can tell zero padding from zero pixels. ``weight`` then has
    ``C + 1`` input channels. That channel is the same for every image, so its contribution is a
    fixed [1, C_out, H, W] map, computed once and added: ``conv(x, W[:, :C]) + conv(edge, W[:, C:])``.
    """
    pad = weight.shape[-1] // 2
    if not edge_bias:
        return F.conv2d(x, weight, bias, padding=pad)
    channels = x.shape[1]
    y = F.conv2d(x, weight[:, :channels], bias, padding=pad)
    if pad == 0:
        return y
    edge = _edge_map(x.shape[2], x.shape[3], pad, weight.dtype, x.device)
    return y + F.conv2d(edge, weight[:, channels:])


class ZeroConv2d(nn.Module):
    """Glow's zero-initialised convolution with a learned output scale ``exp(3·logs)``.

    The last layer of a coupling network (a new affine coupling starts with shift 0 and the
    constant scale σ(2); a new additive one is the identity) and of the learned priors (a new
    prior is N(0, I)). The output scale is folded into the kernel and bias (weight-sized work).
    The convolution runs in the dtype and memory format of its input; ``edge_bias``: see
    :func:`conv_same`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0,
                 edge_bias: bool = False):
        super().__init__()
        self.edge_bias = bool(edge_bias)
        self.conv = nn.Conv2d(in_channels + int(self.edge_bias), out_channels, kernel_size,
                              padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel, bias) with the output scale ``exp(3·logs)`` folded in."""
        scale = torch.exp(self.logs * self.logscale_factor).view(-1)
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return conv_same(x, weight.to(x.dtype), bias.to(x.dtype), self.edge_bias)


class CouplingNet(nn.Module):
    """3×3 conv → ActNorm → ReLU → 1×1 conv → ActNorm → ReLU → zero-initialised 3×3 conv.

    Each ActNorm is applied folded into the convolution before it (``(W∗x + b)·s = (W·s)∗x + b·s``),
    so the hidden activations, the largest tensors of the model, see one operation instead of three
    (about a fifth of a CPU training step); the 1×1 convolution runs as a matrix product. The ActNorms
    keep their own parameters and data-dependent initialisation (:meth:`_initialize`).

    Two switches change how the network is computed, never what it computes (set them for a whole
    model with :meth:`flowlab.flows.MultiScaleFlow.set_coupling_dtype`):

    * ``compute_dtype`` (None, or e.g. ``torch.bfloat16``): the input and the folded weights are
      cast to it, so every convolution and matrix product runs in it (tensor cores, AMX); the
      master weights, their gradients and the output stay in the input's dtype, so the flow's own
      arithmetic (coupling maps, log-dets, priors) never leaves float32.
    * ``channels_last``: the hidden activations are NHWC, where the 1×1 convolution is one matrix
      product over all pixels and oneDNN / cuDNN run their fastest 3×3 kernels.

    ``edge_bias`` and ``logscale_factor`` (of the two ActNorms) are openai/glow's switches, see
    :func:`conv_same` and :class:`ActNorm`.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, edge_bias: bool = False,
                 logscale_factor: float = 1.0):
        super().__init__()
        self.compute_dtype: torch.dtype | None = None
        self.channels_last = False
        self.edge_bias = bool(edge_bias)
        self.conv1 = nn.Conv2d(in_channels + int(self.edge_bias), hidden_channels, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden_channels, logscale_factor)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.norm2 = ActNorm(hidden_channels, logscale_factor)
        self.out = ZeroConv2d(hidden_channels, out_channels, edge_bias=edge_bias)
        nn.init.normal_(self.conv1.weight, std=0.05)
        nn.init.normal_(self.conv2.weight, std=0.05)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of both ActNorms: the layers run unfolded, in the input's dtype."""
        h, _ = self.norm1(conv_same(x, self.conv1.weight.to(x.dtype), None, self.edge_bias))
        self.norm2(F.conv2d(F.relu(h), self.conv2.weight.to(x.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not (self.norm1._initialized and self.norm2._initialized):
            self._initialize(x)
        s1, c1 = self.norm1.scale_shift()
        s2, c2 = self.norm2.scale_shift()
        w1 = self.conv1.weight * s1.view(-1, 1, 1, 1)
        w2 = self.conv2.weight.view(self.conv2.out_channels, -1) * s2.view(-1, 1)
        dtype = self.compute_dtype or x.dtype
        w1, c1, w2, c2, w3, b3 = (t.to(dtype) for t in (w1, c1, w2, c2, *self.out.folded()))
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        h = F.relu(conv_same(x.to(dtype=dtype, memory_format=layout), w1, c1, self.edge_bias), inplace=True)
        if self.channels_last:
            # NHWC: the 1×1 convolution is one [B·H·W, C] × [C, C] product. ReLU in place on the
            # product itself (not on a view of it, which autograd would undo with full copies).
            b, _, height, width = h.shape
            flat = torch.addmm(c2, h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), w2.t())
            h = F.relu(flat, inplace=True).view(b, height, width, -1).permute(0, 3, 1, 2)
        else:
            h = F.relu(pointwise_conv(h, w2, c2), inplace=True)
        return conv_same(h, w3, b3, self.edge_bias).to(x.dtype)


class _Coupling(nn.Module):
    """Splits channels into a conditioning half ``x_a`` (left unchanged) and a transformed half ``x_b``."""

    def __init__(self, channels: int, hidden_channels: int, params_per_channel: int, **net_options):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
        self.split = channels // 2
        self.net = CouplingNet(self.split, params_per_channel * (channels - self.split), hidden_channels,
                               **net_options)


class AffineCoupling(_Coupling):
    """Glow's affine coupling: ``y_b = (x_b + t(x_a)) · σ(s(x_a) + 2)``; log-det ``Σ log σ(s + 2)``.

    ``log σ(s + 2)`` is clamped at ``−LOG_SCALE_BOUND`` so the scale stays invertible in float32.
    """

    def __init__(self, channels: int, hidden_channels: int, **net_options):
        super().__init__(channels, hidden_channels, params_per_channel=2, **net_options)

    def _shift_logscale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw_scale = self.net(x_a).chunk(2, dim=1)
        # Bounded below so the scale can never underflow to 0 (which would make the layer
        # non-invertible and its inverse NaN); the map computed is exactly the one whose log-det
        # is returned. σ(h + 2) only reaches the bound for h < −9, where its gradient is ~1e-4.
        return shift, F.logsigmoid(in_accumulation_dtype(raw_scale) + 2.0).clamp_min(-LOG_SCALE_BOUND)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, log_scale = self._shift_logscale(x_a)
        y_b = ((x_b + shift) * torch.exp(log_scale)).to(x.dtype)
        return torch.cat([x_a, y_b], dim=1), sum_except_batch(log_scale)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, log_scale = self._shift_logscale(y_a)
        x_b = (y_b * torch.exp(-log_scale) - shift).to(y.dtype)
        return torch.cat([y_a, x_b], dim=1)


class AdditiveCoupling(_Coupling):
    """NICE / Glow additive coupling: ``y_b = x_b + t(x_a)``; volume preserving."""

    def __init__(self, channels: int, hidden_channels: int, **net_options):
        super().__init__(channels, hidden_channels, params_per_channel=1, **net_options)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        y_b = (x_b + self.net(x_a)).to(x.dtype)
        return torch.cat([x_a, y_b], dim=1), in_accumulation_dtype(x.new_zeros(x.shape[0]))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        return torch.cat([y_a, (y_b - self.net(y_a)).to(y.dtype)], dim=1)
