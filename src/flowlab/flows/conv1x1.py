"""Glow's invertible 1×1 convolution, plain and LU-decomposed."""

import torch
from torch import nn

from .utils import in_accumulation_dtype, per_sample, pointwise_conv, random_orthogonal


class InvertibleConv1x1(nn.Module):
    """``y = W x`` at every pixel; log-det ``H·W·log|det W|``.

    ``lu=False`` (plain): ``W`` is a free matrix initialised random orthogonal; its ``slogdet``
    and inverse are computed in float64. In eval mode the inverse weight is cached and recomputed
    only when ``W`` changes (tracked by the parameter's version counter).

    ``lu=True``: ``W = P · (L + I) · (U + diag(sign · exp(log_s)))`` with a fixed permutation P,
    strictly-lower L, strictly-upper U and a fixed sign; log-det ``H·W·Σ log_s`` costs O(C) and the
    inverse uses triangular solves.
    """

    def __init__(self, channels: int, lu: bool = False):
        super().__init__()
        self.channels = channels
        self.lu = lu
        w = random_orthogonal(channels)
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

    # -- weight algebra ---------------------------------------------------------------------
    def _lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.L * self.lower_mask + self.eye
        upper = self.U * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight_matrix(self) -> torch.Tensor:
        """``W`` as a [C, C] matrix in the parameters' dtype."""
        if not self.lu:
            return self.weight
        lower, upper = self._lu_factors()
        return self.P @ lower @ upper

    def logabsdet(self) -> torch.Tensor:
        """``log|det W|`` (a scalar, float32 or float64)."""
        if self.lu:
            return in_accumulation_dtype(self.log_s).sum()
        return torch.linalg.slogdet(self.weight.double())[1].to(in_accumulation_dtype(self.weight).dtype)

    def _factor_params(self) -> tuple[torch.Tensor, ...]:
        return (self.L, self.U, self.log_s) if self.lu else (self.weight,)

    def _compute_inverse(self) -> torch.Tensor:
        if not self.lu:
            return torch.linalg.inv(self.weight.double()).to(self.weight.dtype)
        lower, upper = (f.double() for f in self._lu_factors())
        eye = self.eye.double()
        # W^-1 = U^-1 L^-1 P^T, by two triangular solves.
        linv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        uinv_linv = torch.linalg.solve_triangular(upper, linv, upper=True)
        return (uinv_linv @ self.P.double().T).to(self.L.dtype)

    def inverse_matrix(self) -> torch.Tensor:
        """``W⁻¹`` in float64 arithmetic, cached while in eval mode without gradients.

        The cache holds a copy of the parameters it was computed from and is used only while they
        are unchanged (compared by value: version counters are not enough, torch's fused Adam
        updates parameters without bumping them).
        """
        if self.training or torch.is_grad_enabled():
            return self._compute_inverse()
        params = self._factor_params()
        cache = self._inverse_cache
        fresh = cache is not None and all(
            p.dtype == q.dtype and p.device == q.device and torch.equal(p, q) for p, q in zip(params, cache[0])
        )
        if not fresh:
            self._inverse_cache = (tuple(p.detach().clone() for p in params), self._compute_inverse())
        return self._inverse_cache[1]

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * self.logabsdet()

    # -- flow interface ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pointwise_conv(x, self.weight_matrix()), per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(y, self.inverse_matrix())
