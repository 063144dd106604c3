"""Pixel conventions shared by every dataset, the model and the samplers (openai/glow's).

An 8-bit image ``x`` in 0..255 is reduced to ``n_bits`` by dropping low bits,
``x >> (8 - n_bits)``, giving integers in ``0 .. 2**n_bits - 1`` (``n_bins = 2**n_bits``).
The model sees ``x / n_bins - 0.5`` (in ``[-0.5, 0.5)``) plus one bin of uniform noise
``U[0, 1/n_bins)``, so the continuous density it learns lies on ``[-0.5, 0.5)``.
The discrete log-likelihood then costs ``D * n_bits * ln 2`` nats per image in addition to
the continuous one, which the flow's ``bits_per_dim`` adds.
For display, a continuous image is floored back to its bin and spread over 0..255 as
``floor((x + 0.5) * n_bins) * (256 / n_bins)``.

DataModules yield images already reduced (``reduce_bits``); the LightningModule applies
``preprocess`` and ``dequantize``; samplers save ``postprocess`` of the model's output.
"""

from __future__ import annotations

import torch

from flowlab.errors import check_int

__all__ = ["reduce_bits", "preprocess", "dequantize", "postprocess"]


def reduce_bits(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Drop the low ``8 - n_bits`` bits of a uint8 image: values in 0..2**n_bits-1, still uint8."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    if x.dtype != torch.uint8:
        raise TypeError(f"reduce_bits expects a uint8 tensor, got {x.dtype}")
    if n_bits == 8:
        return x
    return torch.bitwise_right_shift(x, 8 - n_bits)


def preprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Map reduced integers 0..2**n_bits-1 to float32 ``x / 2**n_bits - 0.5`` in [-0.5, 0.5)."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    return x.to(torch.float32) / float(2 ** n_bits) - 0.5


def dequantize(x: torch.Tensor, n_bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add one bin of uniform noise ``U[0, 1/2**n_bits)`` to a preprocessed image."""
    n_bits = check_int("n_bits", n_bits, 1, 8)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + noise / float(2 ** n_bits)


def postprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Turn a model-space image (about [-0.5, 0.5]) into uint8 0..255 for saving or display.

    Inverse of ``preprocess`` up to the bin width: ``postprocess(preprocess(reduce_bits(x, b), b), b)``
    equals ``x`` with its low ``8 - b`` bits cleared. Values outside the range are clamped; NaN shows as 0 (black).
    """
    n_bits = check_int("n_bits", n_bits, 1, 8)
    n_bins = 2 ** n_bits
    x = torch.nan_to_num(x.detach().to(torch.float32), nan=-0.5)
    bins = torch.floor((x + 0.5) * n_bins).clamp_(0, n_bins - 1)
    return (bins * (256 // n_bins)).to(torch.uint8)
