"""Training callbacks: periodic checkpoints that always include the final step, sample grids at
fixed temperatures, reconstruction grids (inputs beside decode(encode(x))) and the sampling speed.

Images go to PNG files in the run directory and to the loggers that take images (W&B,
TensorBoard); only the global-zero process draws and writes them. Training speed is Lightning's
``ThroughputMonitor`` (:func:`throughput_monitor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ThroughputMonitor

from flowlab.errors import ConfigError, check_int
from flowlab.lit.images import (
    cycled_labels,
    fixed_images,
    image_grid,
    log_grid,
    pair_grid,
    reconstruct,
    sample_images,
    sample_rows,
    save_grid,
    temperature_tag,
)

__all__ = ["StepCheckpoint", "SampleGrid", "ReconstructionGrid", "SampleSpeed", "throughput_monitor",
           "check_temperatures"]


def check_temperatures(temperatures, key: str) -> list[float]:
    """The list of temperatures as floats, or a ConfigError naming ``key`` unless all are numbers ≥ 0."""
    if isinstance(temperatures, (int, float)) and not isinstance(temperatures, bool):
        temperatures = [temperatures]
    if not isinstance(temperatures, Sequence) or isinstance(temperatures, str) or len(temperatures) == 0:
        raise ConfigError(f"{key}={temperatures!r} is not allowed: give a list of temperatures ≥ 0, e.g. [0.5, 0.7, 1.0]")
    out = []
    for t in temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise ConfigError(f"{key}={list(temperatures)!r} is not allowed: temperatures must be finite numbers ≥ 0 "
                              f"(got {t!r})")
        out.append(float(t))
    return out


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves the state the training ended in.

    Lightning saves every ``every_n_train_steps``; when ``trainer.max_steps`` (or ``max_time``)
    is not a multiple of it the final weights would otherwise exist nowhere. Keeps ``last.ckpt``
    current as well.
    """

    def __init__(self, every_n_train_steps: int, **kwargs):
        check_int("callbacks.checkpoint.every_n_train_steps", every_n_train_steps, 1)
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (not trainer.fast_dev_run and trainer.global_step > 0
                and self._last_global_step_saved != trainer.global_step):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class _EveryNSteps(Callback):
    """Runs ``_draw`` on global zero after every ``every_n_steps`` optimiser steps and once at the end."""

    def __init__(self, out_dir: str | Path, every_n_steps: int):
        self.out_dir = Path(out_dir)
        self.every_n_steps = check_int(f"callbacks.{self.config_key}.every_n_steps", every_n_steps, 1)
        self._last_step = -1

    config_key = ""

    def _maybe_draw(self, trainer: pl.Trainer, pl_module, force: bool = False) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step:
            return
        if not force and step % self.every_n_steps != 0:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._draw(trainer, pl_module, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._maybe_draw(trainer, pl_module, force=True)

    def _draw(self, trainer, pl_module, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SampleGrid(_EveryNSteps):
    """A grid of ``n_samples`` samples at each temperature: ``<out_dir>/step_<step>_T<t>.png`` and key ``samples/T<t>``.

    The latents come from a fixed ``seed``, so grids of different steps show the same draws. A class-conditional
    model's grid has a row per class (the first ``max_classes``), ``n_samples // rows`` images each.
    """

    config_key = "samples"

    def __init__(self, out_dir: str | Path, every_n_steps: int = 1000, temperatures: Sequence[float] = (0.0, 0.5, 0.7, 1.0),
                 n_samples: int = 64, seed: int = 0, max_classes: int = 10):
        super().__init__(out_dir, every_n_steps)
        self.temperatures = check_temperatures(list(temperatures), "callbacks.samples.temperatures")
        self.n_samples = check_int("callbacks.samples.n_samples", n_samples, 1)
        self.max_classes = check_int("callbacks.samples.max_classes", max_classes, 1)
        self.seed = int(seed)

    def _draw(self, trainer, pl_module, step: int) -> None:
        flow = pl_module.eval_flow
        grids, captions = [], []
        classes = range(min(flow.n_classes, self.max_classes, self.n_samples)) \
            if getattr(pl_module, "conditional", False) else None
        for t in self.temperatures:
            if classes is None:
                grid = image_grid(sample_images(flow, self.n_samples, t, seed=self.seed), pl_module.n_bits)
            else:
                per_class = self.n_samples // len(classes)
                x = sample_rows(flow, classes, per_class, t, seed=self.seed)
                grid = image_grid(x, pl_module.n_bits, nrow=per_class)
            save_grid(grid, self.out_dir / f"step_{step:07d}_{temperature_tag(t)}.png")
            grids.append(grid)
            captions.append(temperature_tag(t))
        log_grid(trainer.loggers, "samples", grids, captions, step)


class ReconstructionGrid(_EveryNSteps):
    """Each of ``n_images`` fixed validation images (training images when there is no validation set)
    beside decode(encode(x)): ``<out_dir>/step_<step>.png``, key ``reconstructions``; logs the largest
    absolute reconstruction error as ``val/recon_error``.
    """

    config_key = "reconstructions"

    def __init__(self, out_dir: str | Path, every_n_steps: int = 1000, n_images: int = 32):
        super().__init__(out_dir, every_n_steps)
        self.n_images = check_int("callbacks.reconstructions.n_images", n_images, 1)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _draw(self, trainer, pl_module, step: int) -> None:
        if self._batch is None:
            self._batch = fixed_images(trainer.datamodule, self.n_images)
        batch = self._batch
        if batch is None:
            return
        x, index = batch
        x = pl_module.dequantize_eval(x.to(pl_module.device), index.to(pl_module.device))
        rec, err = reconstruct(pl_module.eval_flow, x)
        grid = pair_grid(x, rec, pl_module.n_bits)
        save_grid(grid, self.out_dir / f"step_{step:07d}.png")
        log_grid(trainer.loggers, "reconstructions", [grid], ["inputs | reconstructions"], step)
        for logger in trainer.loggers:
            logger.log_metrics({"val/recon_error": err}, step=step)


def _images_in(batch) -> int:
    return int(batch[0].shape[0])


def throughput_monitor(window_size: int) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` counting images: ``train/device/samples_per_sec`` (per process) and, under
    DDP, ``train/samples_per_sec`` (all processes), averaged over the last ``window_size`` training steps and
    logged once that many have run (Lightning asserts ``window_size`` ≥ 2 only when training starts)."""
    return ThroughputMonitor(batch_size_fn=_images_in,
                             window_size=check_int("callbacks.throughput.window_size", window_size, 2))


class SampleSpeed(Callback):
    """``sample/images_per_s``, once at the end of training: ``n_samples`` drawn at temperature 1 by the
    evaluation weights, after one warm-up draw. (Lightning's ``ThroughputMonitor`` times its own loops;
    sampling happens outside them.)
    """

    def __init__(self, n_samples: int = 64):
        self.n_samples = check_int("callbacks.sample_speed.n_samples", n_samples, 1)

    def on_train_end(self, trainer, pl_module) -> None:
        import time

        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        flow = pl_module.eval_flow
        n = min(4, self.n_samples)
        sample_images(flow, n, 1.0, seed=0, y=cycled_labels(flow, n))  # warm-up
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        t = time.perf_counter()
        sample_images(flow, self.n_samples, 1.0, seed=1, y=cycled_labels(flow, self.n_samples))
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        rate = self.n_samples / max(time.perf_counter() - t, 1e-9)
        for logger in trainer.loggers:
            logger.log_metrics({"sample/images_per_s": rate}, step=trainer.global_step)
