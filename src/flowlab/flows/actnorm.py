"""ActNorm (Kingma & Dhariwal, 2018): a per-channel affine map with data-dependent initialisation."""

import torch
import torch.distributed as dist
from torch import nn

from ..errors import check_number
from .utils import in_accumulation_dtype, per_sample


class ActNorm(nn.Module):
    """``y = (x + bias) · exp(s)`` per channel with ``s = logscale_factor · logs``; log-det ``H·W·Σ_c s_c``.

    The first training-mode forward sets ``bias`` and ``logs`` so that the output has zero mean and unit variance per
    channel on that batch (the global batch under ``torch.distributed``; a constant channel keeps scale 1).
    ``initialized`` is a saved buffer: a restored model is never re-initialised. ``logscale_factor``: openai/glow's
    reparameterisation (3 there), the same map with ``s`` moved that many times faster.
    """

    def __init__(self, channels: int, logscale_factor: float = 1.0):
        super().__init__()
        self.logscale_factor = check_number("model.actnorm_logscale_factor", logscale_factor, 0, low_open=True)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # host-side mirror: no device sync on the hot path

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and logs from the statistics of ``x`` (reduced over all processes)."""
        xd = x.detach().double()
        stats = torch.stack([xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3))])  # [2, C]
        count = torch.tensor(float(xd.numel() // xd.shape[1]), dtype=torch.float64, device=x.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(count)
        mean = stats[0] / count
        std = (stats[1] / count - mean * mean).clamp_min(0.0).sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.bias.copy_((-mean).view_as(self.bias))
        self.logs.copy_((-std.log() / self.logscale_factor).view_as(self.logs))
        self.initialized.fill_(True)
        self._initialized = True

    def log_scale(self) -> torch.Tensor:
        """``s = logscale_factor · logs``, [1, C, 1, 1]."""
        return self.logs if self.logscale_factor == 1.0 else self.logs * self.logscale_factor

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer as ``y = a·x + c`` per channel: (a, c), each [C]."""
        scale = torch.exp(self.log_scale()).view(-1)
        return scale, self.bias.view(-1) * scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self._initialized:
            self.initialize(x)
        logdet = x.shape[2] * x.shape[3] * in_accumulation_dtype(self.log_scale()).sum()
        return (x + self.bias) * torch.exp(self.log_scale()), per_sample(logdet, x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale()) - self.bias
