"""The pixel convention of every dataset, the model and the samplers (openai/glow's).

An 8-bit image is reduced to ``n_bits`` by dropping low bits, ``x >> (8 - n_bits)`` (``n_bins = 2**n_bits``).
The model sees ``x / n_bins - 0.5`` in ``[-0.5, 0.5)`` plus uniform noise ``U[0, 1/n_bins)``; the discrete
likelihood then costs ``D * n_bits * ln 2`` nats more than the continuous one (the flow's ``bits_per_dim`` adds it).
For display an image is floored to its bin and spread over 0..255: ``floor((x + 0.5) * n_bins) * (256 / n_bins)``.
Evaluation noise is a counter-based hash of (seed, image index, draw) rather than a random stream: the reported
bits/dim is the same for any batch size, number of DDP processes and device.
"""

from __future__ import annotations

import math

import torch

from flowlab.errors import check_int

_MASK32 = 0xFFFFFFFF


def reduce_bits(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Drop the low ``8 - n_bits`` bits of a uint8 image: values in 0..2**n_bits-1, still uint8."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    if x.dtype != torch.uint8:
        raise TypeError(f"reduce_bits expects a uint8 tensor, got {x.dtype}")
    return x if n_bits == 8 else torch.bitwise_right_shift(x, 8 - n_bits)


def preprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Reduced integers 0..2**n_bits-1 to float32 ``x / 2**n_bits - 0.5`` in [-0.5, 0.5)."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    return x.to(torch.float32) / float(2**n_bits) - 0.5


def dequantize(x: torch.Tensor, n_bits: int, generator: torch.Generator | None = None,
               u: torch.Tensor | None = None) -> torch.Tensor:
    """A preprocessed image plus one bin of uniform noise ``u / 2**n_bits``, ``u`` in [0, 1) (drawn from ``generator``
    when not given)."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) if u is None else u
    return x + u / float(2**n_bits)


def postprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """A model-space image to uint8 0..255: the inverse of ``preprocess`` up to the bin width (the low ``8 - n_bits``
    bits cleared); values outside the range are clamped, NaN shows as 0 (black)."""
    n_bins = 2 ** check_int("n_bits", n_bits, 1, 8)
    x = torch.nan_to_num(x.detach().to(torch.float32), nan=-0.5)
    return (torch.floor((x + 0.5) * n_bins).clamp_(0, n_bins - 1) * (256 // n_bins)).to(torch.uint8)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, a 32-bit integer mixing function, on int64 tensors of values in [0, 2**32) (products may wrap
    around int64; the low 32 bits, all that is kept, stay correct)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def eval_uniform(index: torch.Tensor, shape: torch.Size | tuple[int, ...], seed: int, draw: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape`` = ``[B, ...]``, row ``b`` a function of (seed, index[b], draw) only;
    multiples of 2**-24, so exact in float32 and strictly below 1."""
    index = index.reshape(-1).to(torch.int64)
    if index.numel() != shape[0]:
        raise ValueError(f"{index.numel()} indices for a batch of {shape[0]}")
    per_item, device = math.prod(int(s) for s in shape[1:]), index.device
    key = _hash32(torch.tensor((int(seed) & _MASK32) ^ 0x9E3779B9, dtype=torch.int64, device=device))
    key = _hash32(key ^ (int(draw) & _MASK32))
    row = _hash32(key ^ _hash32(index & _MASK32) ^ ((index >> 32) & _MASK32))  # [B]
    col = _hash32(torch.arange(per_item, dtype=torch.int64, device=device) + 0x632BE5AB)  # [D]
    bits = _hash32(row[:, None] ^ col[None, :])  # [B, D]
    u = (bits >> 8).to(torch.float32) * (2.0 ** -24)  # exact: 24-bit integers times a power of two
    return u.to(dtype).reshape(shape)
