"""Emerging convolutions (Hoogeboom, van den Berg & Welling, 2019).

Two k×k convolutions with complementary autoregressive masks, then an invertible 1×1 conv.
Order the Jacobian's rows and columns by pixel (raster order) and then by channel: the first
("causal") convolution lets output (p, c) see inputs at earlier pixels and at pixel p in
channels ≤ c, so its Jacobian is lower-triangular with diagonal ``w[c, c, centre]`` at every
pixel; the second ("anti-causal") one mirrors that (later pixels, channels ≥ c) and is upper-
triangular. Hence log-det = ``H·W·Σ_c log|w[c, c, centre]|`` for each, plus the 1×1 conv's.

The exact inverse solves the triangular system by forward (or backward) substitution. Pixel
(i, j) of a causal k×k mask with radius r = k // 2 depends only on pixels whose
``(r+1)·i + j`` is smaller, so every pixel on one wavefront ``(r+1)·i + j = t`` is solved at once,
vectorised over the batch, the channels and the whole wavefront: ``(r+1)(H−1) + W`` steps instead
of H·W, each a gather, a small matmul and a triangular solve folded into a precomputed inverse.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conv1x1 import InvertibleConv1x1
from .utils import bounded_log_scale, exact, per_sample


def _autoregressive_mask(channels: int, kernel_size: int, causal: bool) -> torch.Tensor:
    """[C_out, C_in, k, k] mask; the centre tap's diagonal is left out (it is parameterised apart)."""
    r = kernel_size // 2
    mask = torch.zeros(channels, channels, kernel_size, kernel_size)
    for a in range(kernel_size):
        for b in range(kernel_size):
            di, dj = a - r, b - r
            before = di < 0 or (di == 0 and dj < 0)
            after = di > 0 or (di == 0 and dj > 0)
            if (before and causal) or (after and not causal):
                mask[:, :, a, b] = 1.0
    centre = torch.tril(torch.ones(channels, channels), -1) if causal else torch.triu(torch.ones(channels, channels), 1)
    mask[:, :, r, r] = centre
    return mask


class MaskedConv(nn.Module):
    """An autoregressive k×k convolution with a triangular Jacobian and a non-zero diagonal."""

    def __init__(self, channels: int, kernel_size: int = 3, causal: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.channels, self.kernel_size, self.causal = channels, kernel_size, causal
        self.register_buffer("mask", _autoregressive_mask(channels, kernel_size, causal))
        self.weight = nn.Parameter(0.05 * torch.randn(channels, channels, kernel_size, kernel_size) / kernel_size)
        self.log_d = nn.Parameter(torch.zeros(channels))  # centre diagonal, log-magnitude
        self.register_buffer("sign_d", torch.ones(channels))
        centre_eye = torch.zeros(channels, channels, kernel_size, kernel_size)
        centre_eye[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(channels)
        self.register_buffer("centre_eye", centre_eye)
        self._schedules: dict = {}

    def diagonal(self) -> torch.Tensor:
        return self.sign_d * torch.exp(bounded_log_scale(self.log_d))

    def kernel(self) -> torch.Tensor:
        """The masked [C, C, k, k] kernel with the learned diagonal on the centre tap."""
        return self.weight * self.mask + self.centre_eye * self.diagonal().view(-1, 1, 1, 1)

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * exact(bounded_log_scale(self.log_d)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, self.kernel().to(x.dtype), padding=self.kernel_size // 2)
        return y, per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    # -- exact inverse by wavefront substitution --------------------------------------------
    def _schedule(self, height: int, width: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        key = (height, width, str(device))
        if key not in self._schedules:
            r = self.kernel_size // 2
            wp = width + 2 * r
            ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            ii, jj = ii.flatten(), jj.flatten()
            t = (r + 1) * ii + jj if self.causal else (r + 1) * (height - 1 - ii) + (width - 1 - jj)
            offsets = torch.tensor([di * wp + dj for di in range(-r, r + 1) for dj in range(-r, r + 1)])
            steps = []
            for step in range(int(t.max()) + 1):
                sel = (t == step).nonzero().flatten()
                padded = (ii[sel] + r) * wp + (jj[sel] + r)
                plain = ii[sel] * width + jj[sel]
                steps.append((padded.to(device), plain.to(device), (padded.unsqueeze(1) + offsets).to(device)))
            self._schedules[key] = steps
        return self._schedules[key]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        r = self.kernel_size // 2
        kernel = self.kernel().to(y.dtype)
        centre = kernel[:, :, r, r]
        off = kernel.clone()
        off[:, :, r, r] = 0
        off = off.flatten(2)  # [C_out, C_in, k*k]
        centre_inv = torch.linalg.inv(centre.double()).to(y.dtype)  # triangular: exact and cheap
        x = y.new_zeros(b, c, (h + 2 * r) * (w + 2 * r))
        y_flat = y.reshape(b, c, h * w)
        for padded, plain, neighbours in self._schedule(h, w, y.device):
            known = x[:, :, neighbours]  # [B, C_in, n, k*k]
            rhs = y_flat[:, :, plain] - torch.einsum("oik,bink->bon", off, known)
            x[:, :, padded] = torch.einsum("oi,bin->bon", centre_inv, rhs)
        return x.view(b, c, h + 2 * r, w + 2 * r)[:, :, r : r + h, r : r + w].contiguous()


class EmergingConv(nn.Module):
    """Emerging k×k convolution: causal masked conv → anti-causal masked conv → invertible 1×1 conv."""

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.causal = MaskedConv(channels, kernel_size, causal=True)
        self.anticausal = MaskedConv(channels, kernel_size, causal=False)
        self.conv1x1 = InvertibleConv1x1(channels, lu=lu)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.causal(x)
        x, ld2 = self.anticausal(x)
        x, ld3 = self.conv1x1(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.causal.inverse(self.anticausal.inverse(self.conv1x1.inverse(y)))
