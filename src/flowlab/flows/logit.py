"""RealNVP's logit preprocessing (Dinh et al., 2017, section 4.1) as the first flow layer.

With flowlab's data convention (:mod:`flowlab.flows.base`) an image is ``x ∈ [−0.5, 0.5]``; its pixel
intensity in [0, 1] is ``u = x + 0.5``. The layer maps

    p = α + (1 − 2α)·u ∈ [α, 1 − α],        y = logit(p) = log p − log(1 − p),

so a bounded image becomes an unbounded one and the flow never meets the boundary of [0, 1]. Per entry
``dy/dx = (1 − 2α) / (p (1 − p))``, so

    log|det ∂y/∂x| = Σ_entries [log(1 − 2α) − log p − log(1 − p)],

and the inverse is ``x = (σ(y) − α) / (1 − 2α) − 0.5``. Because ``du/dx = 1`` the log-det is that of
the map from the dequantised intensities in [0, 1]; ``bits_per_dim`` adds ``n_bits·ln 2`` per dimension
as for any flowlab model, so the number is the discrete 8-bit (n-bit) one, as in the paper's tables.

The paper writes ``logit(α + (1 − α)·x/256)``; its released code (tensorflow/models
research/real_nvp, ``data_constraint = .9``) and the PyTorch port chrischute/real-nvp compute
``α + (1 − 2α)·u`` (intensities in [.05, .95]), which is what is implemented here: with ``1 − α`` an
intensity of 1 would map to logit(1) = ∞. α = 0.05 in both.
"""

import math

import torch
from torch import nn

from ..errors import ConfigError
from .utils import exact, sum_except_batch


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
        p = self.alpha + (1.0 - 2.0 * self.alpha) * (exact(x) + 0.5)
        log_p, log_q = torch.log(p), torch.log1p(-p)
        logdet = sum_except_batch(math.log(1.0 - 2.0 * self.alpha) - log_p - log_q)
        return (log_p - log_q).to(x.dtype), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ((torch.sigmoid(exact(y)) - self.alpha) / (1.0 - 2.0 * self.alpha) - 0.5).to(y.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
