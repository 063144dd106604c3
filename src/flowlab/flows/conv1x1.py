"""Glow's invertible 1×1 convolution, plain and LU-decomposed."""

import torch
from torch import nn

from .utils import in_accumulation_dtype, per_sample, pointwise_conv


class InvertibleConv1x1(nn.Module):
    """``y = W x`` at every pixel; log-det ``H·W·log|det W|``.

    Plain: ``W`` a free matrix (random orthogonal at first), its ``slogdet`` and inverse in float64. ``lu``:
    ``W = P · (L + I) · (U + diag(sign · exp(log_s)))``, fixed P and sign, strictly-lower L and strictly-upper U;
    log-det ``H·W·Σ log_s`` in O(C), the inverse by two triangular solves."""

    def __init__(self, channels: int, lu: bool = False):
        super().__init__()
        self.lu = lu
        q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        w = (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()  # Haar-uniform random orthogonal, Glow's init
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = torch.diagonal(upper)
            self.register_buffer("P", p)
            self.register_buffer("sign_s", torch.sign(s))
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
            self.register_buffer("eye", torch.eye(channels))
            self.L = nn.Parameter(lower)
            self.U = nn.Parameter(torch.triu(upper, 1))
            self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        else:
            self.weight = nn.Parameter(w)
        self._inverse_cache: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None

    def _lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.L * self.lower_mask + self.eye, self.U * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))

    def weight_matrix(self) -> torch.Tensor:
        """``W`` as a [C, C] matrix in the parameters' dtype."""
        if not self.lu:
            return self.weight
        lower, upper = self._lu_factors()
        return self.P @ lower @ upper

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """``H·W·log|det W|``, a scalar in float32 or float64."""
        if self.lu:
            return height * width * in_accumulation_dtype(self.log_s).sum()
        return height * width * torch.linalg.slogdet(self.weight.double())[1].to(in_accumulation_dtype(self.weight).dtype)

    def _compute_inverse(self) -> torch.Tensor:
        if not self.lu:
            return torch.linalg.inv(self.weight.double()).to(self.weight.dtype)
        lower, upper = (f.double() for f in self._lu_factors())
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ, by two triangular solves
        linv = torch.linalg.solve_triangular(lower, self.eye.double(), upper=False, unitriangular=True)
        return (torch.linalg.solve_triangular(upper, linv, upper=True) @ self.P.double().T).to(self.L.dtype)

    def inverse_matrix(self) -> torch.Tensor:
        """``W⁻¹`` in float64 arithmetic; in eval mode without gradients cached while the parameters are unchanged
        (compared by value: torch's fused Adam updates parameters without bumping their version counters)."""
        if self.training or torch.is_grad_enabled():
            return self._compute_inverse()
        params = (self.L, self.U, self.log_s) if self.lu else (self.weight,)
        cache = self._inverse_cache
        if cache is None or not all(p.dtype == q.dtype and p.device == q.device and torch.equal(p, q)
                                    for p, q in zip(params, cache[0])):
            self._inverse_cache = (tuple(p.detach().clone() for p in params), self._compute_inverse())
        return self._inverse_cache[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pointwise_conv(x, self.weight_matrix()), per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(y, self.inverse_matrix())
