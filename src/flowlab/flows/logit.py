"""RealNVP's logit preprocessing (Dinh et al., 2017, section 4.1) as the first flow layer.

An image ``x ∈ [−0.5, 0.5]`` (:mod:`flowlab.flows.base`) has intensities ``u = x + 0.5``; the layer
maps ``p = α + (1 − 2α)·u`` and ``y = logit(p)``, so the flow never meets the boundary of [0, 1].
Log-det ``Σ [log(1 − 2α) − log p − log(1 − p)]``; inverse ``x = (σ(y) − α) / (1 − 2α) − 0.5``.
``bits_per_dim`` adds ``n_bits·ln 2`` per dimension as for any flowlab model, so the number is the
discrete one of the paper's tables. α = 0.05 and ``1 − 2α`` (not the paper's ``1 − α``, which maps
intensity 1 to ∞) as in the released code and chrischute/real-nvp.
"""

import math

import torch
from torch import nn

from ..errors import ConfigError
from .utils import in_accumulation_dtype, sum_except_batch


class Logit(nn.Module):
    """``y = logit(α + (1 − 2α)(x + 0.5))`` entrywise; log-det ``Σ [log(1 − 2α) − log p − log(1 − p)]``.

    Computed in float32 (float64 stays float64). Inputs must lie in about [−0.5, 0.5]: ``p`` stays in
    (0, 1) for ``x + 0.5 ∈ (−α/(1 − 2α), 1 + α/(1 − 2α))``.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 0.5:
            raise ConfigError(f"model.logit_alpha={alpha!r} is not allowed: it must be a number in (0, 0.5)")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * (in_accumulation_dtype(x) + 0.5)
        log_p, log_q = torch.log(p), torch.log1p(-p)
        logdet = sum_except_batch(math.log(1.0 - 2.0 * self.alpha) - log_p - log_q)
        return (log_p - log_q).to(x.dtype), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ((torch.sigmoid(in_accumulation_dtype(y)) - self.alpha) / (1.0 - 2.0 * self.alpha) - 0.5).to(y.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
