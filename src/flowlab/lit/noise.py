"""Dequantisation noise for evaluation that depends only on (seed, image index, draw).

Training draws fresh noise every step. Validation and test use noise that is a fixed function of
the evaluation seed, the image's index in its dataset and the draw number, computed with a
counter-based integer hash instead of a random generator's stream. The reported bits/dim is
therefore the same for any batch size, any number of DDP processes and any device.
"""

from __future__ import annotations

import torch

__all__ = ["eval_uniform"]

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (lowbias32) on int64 tensors holding values in [0, 2**32).

    Products can exceed int64 and wrap, which leaves the low 32 bits (all we keep) correct.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def eval_uniform(index: torch.Tensor, shape: torch.Size | tuple[int, ...], seed: int, draw: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape`` = ``[B, ...]``; row ``b`` depends only on (seed, index[b], draw).

    Values are multiples of 2**-24, so they are exact in float32 and strictly below 1.
    """
    index = index.reshape(-1).to(torch.int64)
    if index.numel() != shape[0]:
        raise ValueError(f"{index.numel()} indices for a batch of {shape[0]}")
    per_item = 1
    for s in shape[1:]:
        per_item *= int(s)
    device = index.device
    key = _hash32(torch.tensor((int(seed) & _MASK32) ^ 0x9E3779B9, dtype=torch.int64, device=device))
    key = _hash32(key ^ (int(draw) & _MASK32))
    row = _hash32(key ^ _hash32(index & _MASK32) ^ ((index >> 32) & _MASK32))  # [B]
    col = _hash32(torch.arange(per_item, dtype=torch.int64, device=device) + 0x632BE5AB)  # [D]
    bits = _hash32(row[:, None] ^ col[None, :])  # [B, D]
    u = (bits >> 8).to(torch.float32) * (2.0 ** -24)  # exact: 24-bit integers times a power of two
    return u.to(dtype).reshape(shape)
