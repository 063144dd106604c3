"""Affine and additive coupling layers (RealNVP / Glow) and Glow's coupling network."""

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm
from .utils import LOG_SCALE_BOUND, in_accumulation_dtype, pointwise_conv, sum_except_batch

_EDGE_MAPS: dict[tuple, torch.Tensor] = {}


def fast_coupling_dtype(device: torch.device | str) -> torch.dtype | None:
    """The coupling networks' compute dtype on the fast path: bfloat16 where the hardware multiplies it natively (CUDA
    GPUs that support it, AMX on recent Xeons), else None (float32; without AMX oneDNN's bfloat16 is slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        fast = device.type == "cpu" and bool(amx and amx() and (avx512_bf16 is None or avx512_bf16()))
    return torch.bfloat16 if fast else None


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              edge_bias: bool = False) -> torch.Tensor:
    """A 'SAME' (zero-padded) k×k convolution; ``edge_bias``: openai/glow's ``add_edge_padding``, one more input
    channel, 1 in the padding and 0 inside the image (``weight`` has C + 1 input channels), so the network can tell
    padding from zero pixels. That channel is the same for every image: ``conv(edge, W[:, C:])`` on a cached map."""
    pad = weight.shape[-1] // 2
    if not edge_bias:
        return F.conv2d(x, weight, bias, padding=pad)
    channels = x.shape[1]
    y = F.conv2d(x, weight[:, :channels], bias, padding=pad)
    if pad == 0:
        return y
    key = (x.shape[2], x.shape[3], pad, weight.dtype, x.device)
    if key not in _EDGE_MAPS:
        edge = torch.ones(1, 1, x.shape[2] + 2 * pad, x.shape[3] + 2 * pad, dtype=weight.dtype, device=x.device)
        edge[:, :, pad:-pad, pad:-pad] = 0
        _EDGE_MAPS[key] = edge
    return y + F.conv2d(_EDGE_MAPS[key], weight[:, channels:])


class ZeroConv2d(nn.Module):
    """Glow's zero-initialised 3×3 convolution with a learned output scale ``exp(3·logs)`` (folded into the kernel):
    the last layer of coupling networks (a new affine coupling scales by σ(2), an additive one is the identity) and of
    the learned priors (a new prior is N(0, I))."""

    def __init__(self, in_channels: int, out_channels: int, edge_bias: bool = False):
        super().__init__()
        self.edge_bias = bool(edge_bias)
        self.conv = nn.Conv2d(in_channels + int(self.edge_bias), out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.exp(self.logs * 3.0).view(-1)
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return conv_same(x, weight.to(x.dtype), bias.to(x.dtype), self.edge_bias)


class CouplingNet(nn.Module):
    """3×3 conv → ActNorm → ReLU → 1×1 conv → ActNorm → ReLU → zero-initialised 3×3 conv.

    Each ActNorm runs folded into the convolution before it (``(W∗x + b)·s = (W·s)∗x + b·s``), so the hidden
    activations see one operation instead of three. ``compute_dtype`` (e.g. bfloat16: input and folded weights cast
    to it, the output back to the input's dtype) and ``channels_last`` (NHWC hidden activations) change how, never
    what, it computes; :meth:`flowlab.flows.MultiScaleFlow.set_coupling_dtype` sets them for a whole model.
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
        if self.channels_last:  # one [B·H·W, C] × [C, C] product; ReLU in place on it, not on a view autograd would copy
            b, _, height, width = h.shape
            flat = torch.addmm(c2, h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), w2.t())
            h = F.relu(flat, inplace=True).view(b, height, width, -1).permute(0, 3, 1, 2)
        else:
            h = F.relu(pointwise_conv(h, w2, c2), inplace=True)
        return conv_same(h, w3, b3, self.edge_bias).to(x.dtype)


class _Coupling(nn.Module):
    """Splits channels into a conditioning half ``x_a`` (left unchanged) and a transformed half ``x_b``; ``net_out``:
    the network's output on ``x_a`` where the caller has it already (:mod:`.memory`)."""

    def __init__(self, channels: int, hidden_channels: int, params_per_channel: int, **net_options):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
        self.split = channels // 2
        self.net = CouplingNet(self.split, params_per_channel * (channels - self.split), hidden_channels, **net_options)

    def forward(self, x: torch.Tensor, net_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        y_b, logdet = self._couple(x_b, self.net(x_a) if net_out is None else net_out)
        return torch.cat([x_a, y_b.to(x.dtype)], dim=1), logdet

    def inverse(self, y: torch.Tensor, net_out: torch.Tensor | None = None) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        return torch.cat([y_a, self._uncouple(y_b, self.net(y_a) if net_out is None else net_out).to(y.dtype)], dim=1)


class AffineCoupling(_Coupling):
    """Glow's affine coupling: ``y_b = (x_b + t(x_a)) · σ(s(x_a) + 2)``; log-det ``Σ log σ(s + 2)``, clamped at
    ``−LOG_SCALE_BOUND`` (the map used is the clamped one) so the scale never underflows to 0 and stays invertible."""

    def __init__(self, channels: int, hidden_channels: int, **net_options):
        super().__init__(channels, hidden_channels, params_per_channel=2, **net_options)

    @staticmethod
    def _shift_logscale(net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw_scale = net_out.chunk(2, dim=1)
        return shift, F.logsigmoid(in_accumulation_dtype(raw_scale) + 2.0).clamp_min(-LOG_SCALE_BOUND)

    def _couple(self, x_b: torch.Tensor, net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self._shift_logscale(net_out)
        return (x_b + shift) * torch.exp(log_scale), sum_except_batch(log_scale)

    def _uncouple(self, y_b: torch.Tensor, net_out: torch.Tensor) -> torch.Tensor:
        shift, log_scale = self._shift_logscale(net_out)
        return y_b * torch.exp(-log_scale) - shift


class AdditiveCoupling(_Coupling):
    """NICE / Glow additive coupling: ``y_b = x_b + t(x_a)``; volume preserving."""

    def __init__(self, channels: int, hidden_channels: int, **net_options):
        super().__init__(channels, hidden_channels, params_per_channel=1, **net_options)

    def _couple(self, x_b: torch.Tensor, net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_b + net_out, in_accumulation_dtype(x_b.new_zeros(x_b.shape[0]))

    def _uncouple(self, y_b: torch.Tensor, net_out: torch.Tensor) -> torch.Tensor:
        return y_b - net_out
