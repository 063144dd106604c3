"""RealNVP's logit preprocessing (Dinh et al., 2017, section 4.1) as the first flow layer."""

import math

import torch
from torch import nn

from ..errors import check_number
from .utils import in_accumulation_dtype, sum_except_batch


class Logit(nn.Module):
    """``p = α + (1 − 2α)·(x + 0.5)``, ``y = logit(p)`` entrywise; log-det ``Σ [log(1 − 2α) − log p − log(1 − p)]``;
    inverse ``x = (σ(y) − α) / (1 − 2α) − 0.5``; in float32 (float64 stays). α = 0.05 and ``1 − 2α`` (the paper's
    ``1 − α`` maps intensity 1 to ∞) as in the released code and chrischute/real-nvp."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        self.alpha = check_number("model.logit_alpha", alpha, 0.0, 0.5, low_open=True, high_open=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * (in_accumulation_dtype(x) + 0.5)
        log_p, log_q = torch.log(p), torch.log1p(-p)
        logdet = sum_except_batch(math.log(1.0 - 2.0 * self.alpha) - log_p - log_q)
        return (log_p - log_q).to(x.dtype), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ((torch.sigmoid(in_accumulation_dtype(y)) - self.alpha) / (1.0 - 2.0 * self.alpha) - 0.5).to(y.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
