"""Emerging convolutions (Hoogeboom, van den Berg & Welling, ICML 2019), as in ``ehoogeboom/emerging``.

A flow step's mixing (their ``flow_permutation == 3``): ``z → 1×1 invertible conv W → square autoregressive conv
K₁ → its flipped mirror K₂ → + bias``. For a receptive field k (odd), r = (k − 1)/2, K₁ keeps the bottom-right
(r+1)×(r+1) quadrant of a k×k kernel (output (i, j) reads pixels (i + a, j + b), a, b ∈ 0..r) and at the centre
tap the channels ``in ≤ out``; K₂ is that mask flipped on all four axes (pixels (i − a, j − b), channels
``in ≥ out``), with its own weights. As their ``forward_fast``, only the q×q quadrant (q = r + 1) is stored and
applied after zero-padding by r; K₂∘K₁ reads exactly the k×k window. Both Jacobians are triangular:
``log|det| = H·W·(Σ log|d₁| + Σ log|d₂| + log|det W|)`` with d the centre diagonals. Initialisation as their
``stable_init``: kernel entries N(0, 0.02²) plus the identity on the centre tap, bias 0, W random orthogonal.

The inverse solves K₂ (K₁ in reverse) one anti-diagonal t = i + j at a time, all its pixels at once:
``x_p = C⁻¹ y_p − Σ_t (C⁻¹ K_t) x_{p+offset_t}`` with C the centre tap (formed in float64), ``H + W − 1`` steps.

Differences from the reference: the centre diagonal is ``sign·exp(clamp(log_d, ±7))`` (it can never reach 0,
theirs can); the inverse runs on the input's device and is differentiable (theirs: a float64 Cython loop on the
CPU); log-dets are accumulated in float32/float64; no dilation. ``lu`` selects the 1×1 form; their training
commands use the plain matrix, as Glow's ``permutation="emerging"`` does.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .conv1x1 import InvertibleConv1x1
from .utils import bounded_log_scale, in_accumulation_dtype, per_sample

#: std of the initial kernel entries, as ``get_conv_weight_np`` in the reference.
INIT_STD = 0.02


def quadrant_mask(channels: int, size: int, flipped: bool = False) -> torch.Tensor:
    """[C_out, C_in, q, q] mask of a square autoregressive convolution, q = ``size``: every tap, but at the centre
    (tap [0, 0]) only ``in < out`` (the diagonal is parameterised apart); ``flipped``: the reference's
    ``mask[::-1, ::-1, ::-1, ::-1]`` (centre [q−1, q−1], ``in > out``)."""
    mask = torch.ones(channels, channels, size, size)
    mask[:, :, 0, 0] = torch.tril(torch.ones(channels, channels), -1)
    return mask.flip(0, 1, 2, 3) if flipped else mask


class _Schedule(NamedTuple):
    """The wavefront order of one masked conv's inverse on an H×W image: ``order`` (raster pixel indices in solve
    order), ``rank`` (its inverse permutation) and per wavefront ``(start, stop, neighbours)``: the pixels
    ``order[start:stop]`` are solved together; ``neighbours`` holds, per pixel and non-centre tap, ``1 + rank`` of the
    pixel the tap reads, or 0 outside the image (row 0 of the solution buffer is zero)."""

    order: torch.Tensor
    rank: torch.Tensor
    steps: list[tuple[int, int, torch.Tensor]]


class MaskedConv(nn.Module):
    """A square autoregressive q×q convolution (q = ``kernel_size``), K₁ or (``flipped``) K₂ of the module docstring;
    log-det ``H·W·Σ_c log|d_c|`` with d the centre tap's diagonal."""

    def __init__(self, channels: int, kernel_size: int = 2, flipped: bool = False):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size (the quadrant's side) must be an integer >= 1, got {kernel_size!r}")
        self.kernel_size, self.flipped = kernel_size, flipped
        r = kernel_size - 1
        self.centre = (r, r) if flipped else (0, 0)
        self.padding = (r, 0, r, 0) if flipped else (0, r, 0, r)  # F.pad order: left, right, top, bottom
        self.register_buffer("mask", quadrant_mask(channels, kernel_size, flipped))
        self.weight = nn.Parameter(INIT_STD * torch.randn(channels, channels, kernel_size, kernel_size))
        d = 1.0 + INIT_STD * torch.randn(channels)  # the reference's centre diagonal: 1 + N(0, 0.02²)
        self.log_d = nn.Parameter(torch.log(d.abs()))  # centre diagonal, log-magnitude
        self.register_buffer("sign_d", torch.sign(d))
        centre_eye = torch.zeros(channels, channels, kernel_size, kernel_size)
        centre_eye[:, :, self.centre[0], self.centre[1]] = torch.eye(channels)
        self.register_buffer("centre_eye", centre_eye)
        # Non-centre taps: kernel index (a, b) and the pixel offset (di, dj) it reads.
        taps = [(a, b) for a in range(kernel_size) for b in range(kernel_size) if (a, b) != self.centre]
        self.taps = [(a * kernel_size + b, (a - r, b - r) if flipped else (a, b)) for a, b in taps]
        self._schedules: dict = {}

    def diagonal(self) -> torch.Tensor:
        return self.sign_d * torch.exp(bounded_log_scale(self.log_d))

    def kernel(self) -> torch.Tensor:
        """The masked [C, C, q, q] kernel with the learned diagonal on the centre tap."""
        return self.weight * self.mask + self.centre_eye * self.diagonal().view(-1, 1, 1, 1)

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * in_accumulation_dtype(bounded_log_scale(self.log_d)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(F.pad(x, self.padding), self.kernel().to(x.dtype))
        return y, per_sample(self.logdet(x.shape[2], x.shape[3]), x)

    # -- exact inverse by wavefront substitution --------------------------------------------
    def _schedule(self, height: int, width: int, device: torch.device) -> _Schedule:
        key = (height, width, str(device))
        if key not in self._schedules:
            ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            ii, jj = ii.flatten(), jj.flatten()
            if self.kernel_size == 1:
                t = torch.zeros_like(ii)
            else:
                t = ii + jj if self.flipped else (height - 1 - ii) + (width - 1 - jj)
            order = torch.argsort(t, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            neighbours = []
            for _, (di, dj) in self.taps:
                ni, nj = ii[order] + di, jj[order] + dj
                inside = (ni >= 0) & (ni < height) & (nj >= 0) & (nj < width)
                index = ni.clamp(0, height - 1) * width + nj.clamp(0, width - 1)
                neighbours.append(torch.where(inside, 1 + rank[index], 0))
            neighbours = torch.stack(neighbours, 1) if neighbours else torch.zeros(order.numel(), 0, dtype=torch.long)
            bounds = torch.cumsum(torch.bincount(t), 0).tolist()
            steps = [(start, stop, neighbours[start:stop].flatten().to(device)) for start, stop in zip([0, *bounds[:-1]], bounds)]
            self._schedules[key] = _Schedule(order.to(device), rank.to(device), steps)
        return self._schedules[key]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        kernel = self.kernel().double()
        centre_inv = torch.linalg.solve_triangular(kernel[:, :, self.centre[0], self.centre[1]],
                                                   torch.eye(c, dtype=torch.float64, device=kernel.device), upper=self.flipped)
        rhs = torch.matmul(centre_inv.to(y.dtype), y.reshape(b, c, h * w))  # C⁻¹ y, [B, C, HW]
        if not self.taps:
            return rhs.view(b, c, h, w)
        taps = kernel.flatten(2)[:, :, [index for index, _ in self.taps]].permute(2, 0, 1)  # [T, C_out, C_in]
        # solved[t·C + i, o] = (C⁻¹ K_t)[o, i]: the step's product over all taps and input channels at once
        solved = (centre_inv @ taps).transpose(1, 2).reshape(-1, c).to(y.dtype)
        schedule = self._schedule(h, w, y.device)
        rhs = rhs.transpose(1, 2).index_select(1, schedule.order)  # [B, HW, C] in solve order
        x = y.new_zeros(b, 1 + h * w, c)  # row 0 stays zero: the padding every outside tap reads
        weight = solved.expand(b, -1, -1)
        for start, stop, neighbours in schedule.steps:
            known = x.index_select(1, neighbours).view(b, stop - start, -1)  # [B, n, T·C]
            x[:, 1 + start : 1 + stop] = torch.baddbmm(rhs[:, start:stop], known, weight, alpha=-1)
        x = x[:, 1:].index_select(1, schedule.rank)  # back to raster order
        return x.transpose(1, 2).reshape(b, c, h, w)


class EmergingConv(nn.Module):
    """Emerging k×k convolution (k = ``kernel_size``, odd): invertible 1×1 conv → square autoregressive (k+1)/2 conv
    → its flipped mirror → bias."""

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = True):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.kernel_size = kernel_size
        quadrant = (kernel_size + 1) // 2
        self.conv1x1 = InvertibleConv1x1(channels, lu=lu)
        self.first = MaskedConv(channels, quadrant, flipped=False)  # the reference's W1
        self.second = MaskedConv(channels, quadrant, flipped=True)  # W2, the flipped mirror
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.conv1x1(x)
        x, ld2 = self.first(x)
        x, ld3 = self.second(x)
        return x + self.bias.to(x.dtype).view(1, -1, 1, 1), ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = y - self.bias.to(y.dtype).view(1, -1, 1, 1)
        return self.conv1x1.inverse(self.first.inverse(self.second.inverse(y)))
