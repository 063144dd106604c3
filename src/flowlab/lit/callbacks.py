"""Training callbacks: checkpoints that include the final step, sample and reconstruction grids (PNG files in the
run directory and the loggers that take images, drawn on global zero), training and sampling speed."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ThroughputMonitor

from flowlab.errors import ConfigError, check_int
from flowlab.lit.images import image_grid, log_grid, pair_grid, reconstruct, sample_images, save_grid, temperature_tag


def check_temperatures(temperatures, key: str) -> list[float]:
    """The temperatures as a list of floats; a ConfigError naming ``key`` unless they are finite numbers ≥ 0."""
    values = [temperatures] if isinstance(temperatures, (int, float)) else temperatures
    if (not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf for t in values)):
        raise ConfigError(f"{key}={temperatures!r} is not allowed: give a list of finite temperatures ≥ 0, "
                          "e.g. [0.5, 0.7, 1.0]")
    return [float(t) for t in values]


def fixed_inputs(module, datamodule, n: int) -> torch.Tensor | None:
    """The first ``n`` validation (else training) images with the fixed evaluation noise, on ``module``'s device: the
    same batch at every step, so checks compare like with like; None without images."""
    for name in ("val_dataset", "train_dataset"):
        dataset = getattr(datamodule, name, None)
        if dataset is not None and len(dataset) > 0:
            n = min(n, len(dataset))
            x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)]).to(module.device)
            return module.dequantize_eval(x, torch.arange(n, device=module.device))
    return None


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves the final step, which need not be a multiple of ``every_n_train_steps``."""

    def __init__(self, every_n_train_steps: int, **kwargs):
        check_int("callbacks.checkpoint.every_n_train_steps", every_n_train_steps, 1)
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class EveryNSteps(Callback):
    """Runs ``_run(trainer, pl_module, step)`` on global zero every ``every_n_steps`` optimiser steps and at the end of
    training, never twice at one step; ``key`` names the callback's config (``callbacks.<key>``) in messages."""

    key = ""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = check_int(f"callbacks.{self.key}.every_n_steps", every_n_steps, 1)
        self._last_step = -1

    def _maybe_run(self, trainer, pl_module, force: bool = False) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step or not (force or step % self.every_n_steps == 0):
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._run(trainer, pl_module, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._maybe_run(trainer, pl_module, force=True)


class SampleGrid(EveryNSteps):
    """``n_samples`` samples at each temperature from fixed latents (``seed``): ``<out_dir>/step_<step>_T<t>.png`` and
    logger key ``samples/T<t>``; a class-conditional model's grid has a row for each of its first ``max_classes``."""

    key = "samples"

    def __init__(self, out_dir: str | Path, every_n_steps: int, temperatures: Sequence[float], n_samples: int, seed: int,
                 max_classes: int):
        super().__init__(every_n_steps)
        self.out_dir = Path(out_dir)
        self.temperatures = check_temperatures(list(temperatures), "callbacks.samples.temperatures")
        self.n_samples = check_int("callbacks.samples.n_samples", n_samples, 1)
        self.max_classes = check_int("callbacks.samples.max_classes", max_classes, 1)
        self.seed = int(seed)

    def _run(self, trainer, pl_module, step: int) -> None:
        flow, grids = pl_module.eval_flow, []
        classes = range(min(flow.n_classes, self.max_classes, self.n_samples)) if pl_module.conditional else None
        for t in self.temperatures:
            if classes is None:
                grid = image_grid(sample_images(flow, self.n_samples, t, seed=self.seed), pl_module.n_bits)
            else:  # a row per class, each drawing the same latents
                per_class = self.n_samples // len(classes)
                x = torch.cat([sample_images(flow, per_class, t, seed=self.seed, y=c) for c in classes])
                grid = image_grid(x, pl_module.n_bits, nrow=per_class)
            save_grid(grid, self.out_dir / f"step_{step:07d}_{temperature_tag(t)}.png")
            grids.append(grid)
        log_grid(trainer.loggers, "samples", grids, [temperature_tag(t) for t in self.temperatures], step)


class ReconstructionGrid(EveryNSteps):
    """The first ``n_images`` fixed images each beside decode(encode(x)): ``<out_dir>/step_<step>.png`` and logger key
    ``reconstructions``; the largest absolute error is logged as ``val/recon_error``."""

    key = "reconstructions"

    def __init__(self, out_dir: str | Path, every_n_steps: int, n_images: int):
        super().__init__(every_n_steps)
        self.out_dir = Path(out_dir)
        self.n_images = check_int("callbacks.reconstructions.n_images", n_images, 1)

    def _run(self, trainer, pl_module, step: int) -> None:
        x = fixed_inputs(pl_module, trainer.datamodule, self.n_images)
        if x is None:
            return
        rec, err = reconstruct(pl_module.eval_flow, x)
        grid = pair_grid(x, rec, pl_module.n_bits)
        save_grid(grid, self.out_dir / f"step_{step:07d}.png")
        log_grid(trainer.loggers, "reconstructions", [grid], ["inputs | reconstructions"], step)
        for logger in trainer.loggers:
            logger.log_metrics({"val/recon_error": err}, step=step)


def _images_in(batch) -> int:
    return int(batch[0].shape[0])


def throughput_monitor(window_size: int) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` counting images: ``train/device/samples_per_sec`` (and, under DDP, over all
    processes ``train/samples_per_sec``) over the last ``window_size`` training steps."""
    return ThroughputMonitor(batch_size_fn=_images_in, window_size=check_int("callbacks.throughput.window_size", window_size, 2))


class SampleSpeed(Callback):
    """``sample/images_per_s`` once at the end of training: ``n_samples`` drawn at temperature 1 by the evaluation
    weights, after a warm-up draw (ThroughputMonitor times only Lightning's own loops)."""

    def __init__(self, n_samples: int):
        self.n_samples = check_int("callbacks.sample_speed.n_samples", n_samples, 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        flow, times = pl_module.eval_flow, []
        for seed, n in ((0, min(4, self.n_samples)), (1, self.n_samples)):  # a warm-up draw, then the timed one
            start = time.perf_counter()
            sample_images(flow, n, 1.0, seed=seed, y=torch.arange(n) % flow.n_classes if pl_module.conditional else None)
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            times.append(time.perf_counter() - start)
        for logger in trainer.loggers:
            logger.log_metrics({"sample/images_per_s": self.n_samples / max(times[-1], 1e-9)}, step=trainer.global_step)
