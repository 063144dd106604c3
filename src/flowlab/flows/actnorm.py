"""ActNorm (Kingma & Dhariwal, 2018): a per-channel affine map with data-dependent initialisation."""

import torch
import torch.distributed as dist
from torch import nn

from .utils import in_accumulation_dtype, per_sample

_MIN_STD = 1e-6


class ActNorm(nn.Module):
    """``y = (x + bias) · exp(s)`` per channel with ``s = logscale_factor · logs``; log-det ``H·W·Σ_c s_c``.

    On the first forward pass in training mode the layer sets ``bias`` and ``logs`` so that its
    output has zero mean and unit variance per channel on that batch. Under ``torch.distributed``
    the statistics are summed over every process first, so all ranks get identical parameters
    (the global batch), not one initialisation per replica. A channel with (near) zero variance
    keeps scale 1 instead of dividing by zero. ``initialized`` is a buffer: it is saved and
    loaded with the model, so a restored model is never re-initialised.

    ``logscale_factor`` is openai/glow's reparameterisation (``tfops.actnorm``, default 3): the
    parameter stored is ``s / logscale_factor``, so the optimiser moves the log-scale
    ``logscale_factor`` times faster. The map is the same for any factor; only training differs.
    """

    def __init__(self, channels: int, logscale_factor: float = 1.0):
        super().__init__()
        if not float(logscale_factor) > 0:
            raise ValueError(f"logscale_factor must be > 0, got {logscale_factor}")
        self.logscale_factor = float(logscale_factor)
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
        stats = torch.stack(
            [xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3))]
        )  # [2, C]
        count = torch.tensor(float(xd.numel() // xd.shape[1]), dtype=torch.float64, device=x.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(count)
        mean = stats[0] / count
        var = (stats[1] / count - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
        self.bias.copy_((-mean).view_as(self.bias))
        self.logs.copy_((-std.log() / self.logscale_factor).view_as(self.logs))
        self.initialized.fill_(True)
        self._initialized = True

    def log_scale(self) -> torch.Tensor:
        """The log-scale ``s = logscale_factor · logs``, [1, C, 1, 1]."""
        return self.logs if self.logscale_factor == 1.0 else self.logs * self.logscale_factor

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer as ``y = a·x + c`` per channel: (a, c), each [C]."""
        scale = torch.exp(self.log_scale()).view(-1)
        return scale, self.bias.view(-1) * scale

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """The data-independent log-det as a scalar."""
        return height * width * in_accumulation_dtype(self.log_scale()).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self._initialized:
            self.initialize(x)
        return (x + self.bias) * torch.exp(self.log_scale()), per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale()) - self.bias
