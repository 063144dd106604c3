"""Images of a flow: sample grids at a temperature and reconstructions x → z → x beside the inputs.

Everything here works on "model space" images (about [-0.5, 0.5], see flowlab.data.transforms)
and turns them into uint8 pictures with ``postprocess`` only at the end. Used by the training
callbacks and by ``flowlab-sample``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from flowlab.data.transforms import postprocess

__all__ = ["fixed_images", "eval_mode", "sample_images", "sample_rows", "cycled_labels", "reconstruct", "pair_grid",
           "image_grid", "save_grid", "log_grid", "temperature_tag"]


def fixed_images(datamodule, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``n`` images of the validation set (else the training set) and their indices.

    A fixed batch, so reconstructions and the invertibility monitor compare like with like from
    step to step; None when the datamodule has no images.
    """
    dataset = getattr(datamodule, "val_dataset", None) if datamodule is not None else None
    if dataset is None or len(dataset) == 0:
        dataset = getattr(datamodule, "train_dataset", None) if datamodule is not None else None
    if dataset is None or len(dataset) == 0:
        return None
    n = min(n, len(dataset))
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)]), torch.arange(n)


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


def _fork_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def sample_images(flow: nn.Module, n: int, temperature: float, seed: int | None = None, y=None) -> torch.Tensor:
    """``n`` samples at ``temperature`` (model space), of class ``y`` (an int or ``n`` labels) for a class-conditional
    flow; with ``seed`` the same every call, leaving the global RNG alone."""
    device = next(flow.parameters()).device
    kwargs = {} if y is None else {"y": y}
    with eval_mode(flow):
        if seed is None:
            return flow.sample(n, temperature=temperature, **kwargs).float()
        with _fork_rng(device):
            torch.manual_seed(seed)
            return flow.sample(n, temperature=temperature, **kwargs).float()


def sample_rows(flow: nn.Module, classes, per_class: int, temperature: float, seed: int | None = None) -> torch.Tensor:
    """``per_class`` samples of each class of a class-conditional flow, a row per class; with ``seed`` every row
    draws the same latents, so the rows differ only by their class."""
    return torch.cat([sample_images(flow, per_class, temperature, seed, y=int(c)) for c in classes])


def cycled_labels(flow: nn.Module, n: int) -> torch.Tensor | None:
    """Labels 0, 1, ... (cycling) for ``n`` samples of a class-conditional flow; None for any other flow."""
    return torch.arange(n) % flow.n_classes if getattr(flow, "y_condition", False) else None


def reconstruct(flow: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``decode(encode(x))`` and the largest absolute difference to ``x`` (model space)."""
    with eval_mode(flow):
        zs, _ = flow.encode(x)
        rec = flow.decode(zs).float()
    err = float((rec - x.float()).abs().max()) if x.numel() else 0.0
    return rec, err


def image_grid(x: torch.Tensor, n_bits: int, nrow: int | None = None) -> torch.Tensor:
    """A uint8 ``[C, H, W]`` grid of model-space images ``x`` ``[B, C, H, W]`` (square-ish by default)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    pictures = postprocess(x.detach().cpu(), n_bits)
    return make_grid(pictures, nrow=nrow, padding=2, pad_value=255)


def pair_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, n_bits: int, pairs_per_row: int = 4) -> torch.Tensor:
    """A grid in which each input is followed, to its right, by its reconstruction (the paper's Figure 1)."""
    if inputs.shape != reconstructions.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
    b = inputs.shape[0]
    both = torch.stack([inputs.detach().cpu().float(), reconstructions.detach().cpu().float()], dim=1)
    return image_grid(both.reshape(2 * b, *inputs.shape[1:]), n_bits, nrow=2 * min(pairs_per_row, max(b, 1)))


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 ``[C, H, W]`` grid as PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.float() / 255.0, path)
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
