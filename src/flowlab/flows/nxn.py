"""The paper's invertible n×n convolution: the shift function S followed by an invertible 1×1 conv."""

import torch
from torch import nn

from .conv1x1 import InvertibleConv1x1
from .shift import InvertibleShift
from .utils import per_sample, pointwise_conv


class InvertibleNxNConv(nn.Module):
    """Invertible n×n convolution (Truong et al., "Generative Flow via Invertible n×n Convolution").

    The paper writes an n×n convolution as a sum of 1×1 convolutions over shifted copies of the input,
    ``Σ_k W_k · S_k(X)`` over the n² taps k (eq. 6), and makes it invertible by sharing one learnable, invertible
    shift function ``S`` across all taps:

        Σ_k W_k · S(X) = (Σ_k W_k) · S(X) = W · S(X),    S(x)_c = α_c · x_c + β_c.

    So the layer is ``S`` then one invertible 1×1 convolution ``W`` (plain or LU, ``lu``), with log-det
    ``H·W·(Σ_c log|α_c| + log|det W|)``. The composition is itself a 1×1 convolution with weight ``W·diag(α)`` and
    bias ``W·β``, evaluated in that folded form: it mixes no neighbouring pixels, and ``kernel_size`` (the paper's
    n) changes nothing in the computation; it is kept so runs are labelled as in the paper.
    """

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = kernel_size
        self.shift = InvertibleShift(channels)
        self.conv = InvertibleConv1x1(channels, lu=lu)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent 1×1 convolution: weight ``W·diag(α)`` [C, C] and bias ``W·β`` [C]."""
        w = self.conv.weight_matrix()
        return w * self.shift.alpha().unsqueeze(0), w @ self.shift.beta

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = self.shift.logdet(x.shape[2], x.shape[3]) + self.conv.logdet(x.shape[2], x.shape[3])
        return pointwise_conv(x, *self.folded()), per_sample(logdet, x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x = diag(1/α)·W⁻¹ y − β/α``."""
        inv_alpha = 1.0 / self.shift.alpha()
        return pointwise_conv(y, self.conv.inverse_matrix() * inv_alpha.unsqueeze(1), -self.shift.beta * inv_alpha)
