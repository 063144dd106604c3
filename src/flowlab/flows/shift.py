"""The paper's invertible shift function S (Truong et al., eq. 6)."""

import torch
from torch import nn

from .utils import bounded_log_scale, in_accumulation_dtype, per_sample


class InvertibleShift(nn.Module):
    """``S(x)_{c,i,j} = α_c · x_{c,i,j} + β_c``; inverse ``(y − β_c) / α_c``; log-det ``H·W·Σ_c log|α_c|``.

    α is parameterised as a fixed sign times ``exp`` of a learned log-magnitude, clamped to
    ±``LOG_SCALE_BOUND``, so it can never reach 0 (or overflow) however long it is trained.
    α starts at 1 and β at 0, so a new layer is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("sign", torch.ones(channels))

    def log_abs_alpha(self) -> torch.Tensor:
        return bounded_log_scale(self.log_alpha)

    def alpha(self) -> torch.Tensor:
        return self.sign * torch.exp(self.log_abs_alpha())

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """The data-independent log-det as a scalar."""
        return height * width * in_accumulation_dtype(self.log_abs_alpha()).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * self.alpha().view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        return y, per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.beta.view(1, -1, 1, 1)) / self.alpha().view(1, -1, 1, 1)
