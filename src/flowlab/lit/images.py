"""Images of a flow: sample grids and reconstructions x → z → x beside the inputs, from model-space images
(about [-0.5, 0.5]) made uint8 by ``postprocess`` at the end. Used by the callbacks and ``flowlab-sample``."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from torchvision.io import write_png
from torchvision.utils import make_grid

from flowlab.data.transforms import postprocess


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Evaluation mode and no gradients inside the block; the previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def sample_images(flow: nn.Module, n: int, temperature: float, seed: int | None = None, y=None) -> torch.Tensor:
    """``n`` samples at ``temperature`` (model space), of class ``y`` (an int or ``n`` labels) for a class-conditional
    flow; with ``seed`` the same every call, leaving the global RNG alone."""
    device = next(flow.parameters()).device
    kwargs = {} if y is None else {"y": y}
    with eval_mode(flow), torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return flow.sample(n, temperature=temperature, **kwargs).float()


def reconstruct(flow: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``decode(encode(x))`` and the largest absolute difference to ``x`` (model space)."""
    with eval_mode(flow):
        rec = flow.decode(flow.encode(x)[0]).float()
    return rec, float((rec - x.float()).abs().max()) if x.numel() else 0.0


def image_grid(x: torch.Tensor, n_bits: int, nrow: int | None = None) -> torch.Tensor:
    """A uint8 ``[C, H, W]`` grid of model-space images ``x`` ``[B, C, H, W]`` (square-ish by default)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    return make_grid(postprocess(x.detach().cpu(), n_bits), nrow=nrow, padding=2, pad_value=255)


def pair_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, n_bits: int) -> torch.Tensor:
    """A grid in which each input is followed, to its right, by its reconstruction, 4 pairs a row (the paper's Figure 1)."""
    if inputs.shape != reconstructions.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
    b = inputs.shape[0]
    both = torch.stack([inputs.detach().cpu().float(), reconstructions.detach().cpu().float()], dim=1)
    return image_grid(both.reshape(2 * b, *inputs.shape[1:]), n_bits, nrow=2 * min(4, max(b, 1)))


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 ``[C, H, W]`` grid as PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(path))
    return path


def temperature_tag(t: float) -> str:
    return f"T{float(t):.2f}"


def log_grid(loggers, key: str, grids: list[torch.Tensor], captions: list[str], step: int) -> None:
    """Send uint8 ``[C, H, W]`` grids to every logger that takes images (W&B, TensorBoard)."""
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[g.permute(1, 2, 0).numpy() for g in grids], caption=captions, step=step)
        elif name == "TensorBoardLogger":
            for g, c in zip(grids, captions):
                logger.experiment.add_image(f"{key}/{c}", g, global_step=step)
