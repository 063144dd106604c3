"""The paper's invertible shift function S (Truong et al., eq. 6)."""

import torch
from torch import nn

from .utils import bounded_log_scale, in_accumulation_dtype, per_sample


class InvertibleShift(nn.Module):
    """``S(x)_{c,i,j} = α_c · x_{c,i,j} + β_c``; inverse ``(y − β_c) / α_c``; log-det ``H·W·Σ_c log|α_c|``.

    ``α = sign · exp(log|α|)``, the learned log-magnitude clamped to ±``LOG_SCALE_BOUND``: α never reaches 0. A new
    layer (α = 1, β = 0) is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("sign", torch.ones(channels))

    def alpha(self) -> torch.Tensor:
        return self.sign * torch.exp(bounded_log_scale(self.log_alpha))

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * in_accumulation_dtype(bounded_log_scale(self.log_alpha)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * self.alpha().view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        return y, per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.beta.view(1, -1, 1, 1)) / self.alpha().view(1, -1, 1, 1)
