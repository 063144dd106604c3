"""Inputs for the benchmark: random images for throughput, a fixed data stream for the bits/dim check.

Images follow the flowlab convention: integer values in ``0 .. 2**n_bits - 1`` mapped to
``x / 2**n_bits - 0.5`` plus one bin of uniform noise, i.e. continuous values in ``[-0.5, 0.5)``.
The benchmark imports only torch and numpy here (not ``flowlab.data``, which needs Lightning).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from flowlab.errors import DataError


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def to_model_input(x_int: torch.Tensor, n_bits: int, generator: torch.Generator | None) -> torch.Tensor:
    """Integer images in ``0 .. 2**n_bits - 1`` -> ``x / 2**n_bits - 0.5 + U[0, 2**-n_bits)`` (float32)."""
    bins = 2.0 ** n_bits
    x = x_int.float() / bins - 0.5
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise / bins


def benchmark_batches(count: int, batch: int, channels: int, size: int, n_bits: int, device: torch.device,
                      seed: int = 0) -> list[torch.Tensor]:
    """``count`` dequantised batches of :func:`structured_images` for the throughput benchmark.

    Speed does not depend on the pixels, but the model's state after the timed steps does: on
    image-like data the loss behaves as in a real run, so the reconstruction error measured
    afterwards describes a model in a realistic state, not one thrown about by fitting noise.
    """
    images = structured_images(count * batch, channels, size, device, seed=seed) // (2 ** (8 - n_bits))
    g = _generator(device, seed + 1)
    return [to_model_input(images[i * batch:(i + 1) * batch], n_bits, g) for i in range(count)]


def structured_images(count: int, channels: int, size: int, device: torch.device, seed: int,
                      chunk: int = 4096) -> torch.Tensor:
    """``count`` uint8 images with image-like statistics: smooth colour fields at a few scales plus grain.

    Stands in for a dataset where none is on disk; a flow reaches well under 8 bits/dim on it, so
    the bits/dim check compares models that are actually learning structure.
    """
    g = _generator(device, seed)
    out = []
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        x = torch.zeros(n, channels, size, size, device=device)
        for res, amp in ((2, 1.0), (4, 0.7), (8, 0.35), (16, 0.15)):
            res = min(res, size)
            field = torch.randn(n, channels, res, res, generator=g, device=device)
            mix = torch.randn(n, 1, res, res, generator=g, device=device)  # shared luminance across channels
            x += amp * F.interpolate(0.5 * field + mix, size=(size, size), mode="bilinear", align_corners=False)
        x += 0.05 * torch.randn(x.shape, generator=g, device=device)
        out.append((torch.sigmoid(x) * 255.0).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_npz(path: str | Path, channels: int, image_size: int) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` from an ``.npz`` (key ``x``, ``images``, ``data`` or its only array).

    Arrays may be ``[N, H, W, C]`` or ``[N, C, H, W]`` (or ``[N, H, W]`` for one channel).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data-npz {path}: no such file; give an .npz holding uint8 images [N, H, W, C]")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            key = next((k for k in ("x", "images", "data", "train") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(f"--data-npz {path}: arrays {keys}; name the image array 'x' (or 'images')")
            arr = npz[key]
    except (OSError, ValueError) as e:
        raise DataError(f"--data-npz {path}: not a readable .npz file ({e})") from None
    if arr.dtype != np.uint8:
        raise DataError(f"--data-npz {path}: array {key!r} has dtype {arr.dtype}; expected uint8 pixels 0..255")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataError(f"--data-npz {path}: array {key!r} has shape {arr.shape}; expected [N, H, W, C]")
    if arr.shape[-1] == channels and arr.shape[1] != channels:
        arr = arr.transpose(0, 3, 1, 2)
    if tuple(arr.shape[1:]) != (channels, image_size, image_size):
        raise DataError(f"--data-npz {path}: images of shape {tuple(arr.shape[1:])} do not fit the preset "
                        f"({channels}x{image_size}x{image_size}); resize them or pick another preset")
    if arr.shape[0] < 2:
        raise DataError(f"--data-npz {path}: needs at least 2 images, found {arr.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(arr))


class DataStream:
    """A reproducible stream of training batches and a fixed evaluation set from uint8 images.

    ``batch(step)`` depends only on ``(seed, step)``, so two models trained side by side (or one
    after the other) see exactly the same images with exactly the same dequantisation noise.
    """

    def __init__(self, images: torch.Tensor, batch: int, n_bits: int, device: torch.device, seed: int,
                 eval_count: int):
        if images.shape[0] <= eval_count:
            raise DataError(f"need more than {eval_count} images for a held-out evaluation set, got {images.shape[0]}")
        reduced = images.to(device) // (2 ** (8 - n_bits))  # stays uint8 (an eighth of int64's memory)
        self.train = reduced[:-eval_count]
        self.eval_int = reduced[-eval_count:]
        self.batch_size, self.n_bits, self.device, self.seed = batch, n_bits, device, seed
        self.eval_x = to_model_input(self.eval_int, n_bits, _generator(device, seed + 1))

    def batch(self, step: int) -> torch.Tensor:
        g = _generator(self.device, self.seed * 1_000_003 + step)
        idx = torch.randint(0, self.train.shape[0], (self.batch_size,), generator=g, device=self.device)
        return to_model_input(self.train[idx], self.n_bits, g)

    def eval_batches(self, batch: int):
        for start in range(0, self.eval_x.shape[0], batch):
            yield self.eval_x[start:start + batch]

