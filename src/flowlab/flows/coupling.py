"""Affine and additive coupling layers (RealNVP / Glow) and Glow's coupling network."""

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm
from .utils import LOG_SCALE_BOUND, exact, pointwise_conv, sum_except_batch


class ZeroConv2d(nn.Module):
    """Glow's zero-initialised convolution with a learned output scale ``exp(3·logs)``.

    The last layer of a coupling network (a new affine coupling starts with shift 0 and the
    constant scale σ(2); a new additive one is the identity) and of the learned priors (a new
    prior is N(0, I)). The output scale is folded into the kernel and bias (weight-sized work).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.exp(self.logs * self.logscale_factor).view(-1)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight.to(x.dtype), (self.conv.bias * scale).to(x.dtype), padding=self.conv.padding)


class CouplingNet(nn.Module):
    """3×3 conv → ActNorm → ReLU → 1×1 conv → ActNorm → ReLU → zero-initialised 3×3 conv.

    Each ActNorm is folded into the convolution before it (``(W∗x + b)·s = (W·s)∗x + b·s``), so
    the hidden activations, the largest tensors of the model, see one fused operation instead of
    three; the 1×1 convolution runs as a matrix product. The ActNorms keep their own parameters
    and data-dependent initialisation (on the first training batch).

    ``compute_dtype`` (None, or e.g. ``torch.bfloat16``) runs the network under autocast in that
    dtype; its output is returned in float32, so the flow's own arithmetic (coupling maps,
    log-dets, priors) never leaves float32. Set it for a whole model with
    :meth:`flowlab.flows.MultiScaleFlow.set_coupling_dtype`.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.compute_dtype: torch.dtype | None = None
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden_channels)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.norm2 = ActNorm(hidden_channels)
        self.out = ZeroConv2d(hidden_channels, out_channels)
        nn.init.normal_(self.conv1.weight, std=0.05)
        nn.init.normal_(self.conv2.weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None or self.compute_dtype == x.dtype:
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return self._forward(x).to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.conv1.weight.to(x.dtype)
        if self.training and not self.norm1._initialized:
            self.norm1.initialize(F.conv2d(x, w1, padding=1))
        s1, c1 = self.norm1.scale_shift()
        h = F.relu(F.conv2d(x, (w1 * s1.view(-1, 1, 1, 1)).to(x.dtype), c1.to(x.dtype), padding=1), inplace=True)
        w2 = self.conv2.weight.view(self.conv2.out_channels, -1)
        if self.training and not self.norm2._initialized:
            self.norm2.initialize(pointwise_conv(h, w2))
        s2, c2 = self.norm2.scale_shift()
        h = F.relu(pointwise_conv(h, w2 * s2.view(-1, 1), c2), inplace=True)
        return self.out(h)


class _Coupling(nn.Module):
    """Splits channels into a conditioning half ``x_a`` (left unchanged) and a transformed half ``x_b``."""

    def __init__(self, channels: int, hidden_channels: int, params_per_channel: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
        self.split = channels // 2
        self.net = CouplingNet(self.split, params_per_channel * (channels - self.split), hidden_channels)


class AffineCoupling(_Coupling):
    """Glow's affine coupling: ``y_b = (x_b + t(x_a)) · σ(s(x_a) + 2)``; log-det ``Σ log σ(s + 2)``.

    ``log σ(s + 2)`` is clamped at ``−LOG_SCALE_BOUND`` so the scale stays invertible in float32.
    """

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__(channels, hidden_channels, params_per_channel=2)

    def _shift_logscale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw_scale = self.net(x_a).chunk(2, dim=1)
        # Bounded below so the scale can never underflow to 0 (which would make the layer
        # non-invertible and its inverse NaN); the map computed is exactly the one whose log-det
        # is returned. σ(h + 2) only reaches the bound for h < −9, where its gradient is ~1e-4.
        return shift, F.logsigmoid(exact(raw_scale) + 2.0).clamp_min(-LOG_SCALE_BOUND)

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

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__(channels, hidden_channels, params_per_channel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        y_b = (x_b + self.net(x_a)).to(x.dtype)
        return torch.cat([x_a, y_b], dim=1), exact(x.new_zeros(x.shape[0]))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        return torch.cat([y_a, (y_b - self.net(y_a)).to(y.dtype)], dim=1)
