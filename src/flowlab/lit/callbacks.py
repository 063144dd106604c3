"""Training callbacks: periodic checkpoints that always include the final step, sample grids at
fixed temperatures, and reconstruction grids (inputs beside decode(encode(x))).

Images go to PNG files in the run directory and to the loggers that take images (W&B,
TensorBoard); only the global-zero process draws and writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from flowlab.errors import ConfigError
from flowlab.lit.images import fixed_images, image_grid, log_grid, pair_grid, reconstruct, sample_images, save_grid, temperature_tag

__all__ = ["StepCheckpoint", "SampleGrid", "ReconstructionGrid", "Throughput", "check_temperatures"]


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


def _positive_int(value, key: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be an integer ≥ {low}")
    return value


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves the state the training ended in.

    Lightning saves every ``every_n_train_steps``; when ``trainer.max_steps`` (or ``max_time``)
    is not a multiple of it the final weights would otherwise exist nowhere. Keeps ``last.ckpt``
    current as well.
    """

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
        self.every_n_steps = _positive_int(every_n_steps, f"callbacks.{self.config_key}.every_n_steps")
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

    The latents come from a fixed ``seed``, so grids of different steps show the same draws.
    """

    config_key = "samples"

    def __init__(self, out_dir: str | Path, every_n_steps: int = 1000, temperatures: Sequence[float] = (0.0, 0.5, 0.7, 1.0),
                 n_samples: int = 64, seed: int = 0):
        super().__init__(out_dir, every_n_steps)
        self.temperatures = check_temperatures(list(temperatures), "callbacks.samples.temperatures")
        self.n_samples = _positive_int(n_samples, "callbacks.samples.n_samples")
        self.seed = int(seed)

    def _draw(self, trainer, pl_module, step: int) -> None:
        flow = pl_module.eval_flow
        grids, captions = [], []
        for t in self.temperatures:
            x = sample_images(flow, self.n_samples, t, seed=self.seed)
            grid = image_grid(x, pl_module.n_bits)
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
        self.n_images = _positive_int(n_images, "callbacks.reconstructions.n_images")
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


class Throughput(Callback):
    """Speed, measured where it happens: ``train/images_per_s`` (images per second of training steps,
    forward + backward + optimiser, averaged over the last ``window`` steps; the ActNorm-initialising
    first step is left out) and, once at the end of training, ``sample/images_per_s`` (``n_samples``
    drawn at temperature 1 by the evaluation weights, after one warm-up draw).
    """

    def __init__(self, window: int = 50, n_samples: int = 64):
        self.window = _positive_int(window, "callbacks.throughput.window")
        self.n_samples = _positive_int(n_samples, "callbacks.throughput.n_samples")
        self._t0: float | None = None
        self._times: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if self._t0 is None:
            return
        elapsed = time.perf_counter() - self._t0
        self._t0 = None
        if trainer.global_step <= 1:  # the first step also initialises ActNorm
            return
        self._times.append((int(batch[0].shape[0]) * int(trainer.world_size), elapsed))
        self._times = self._times[-self.window:]
        n, t = sum(b for b, _ in self._times), sum(s for _, s in self._times)
        if t > 0:
            pl_module.log("train/images_per_s", n / t, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        import time

        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        flow = pl_module.eval_flow
        sample_images(flow, min(4, self.n_samples), 1.0, seed=0)  # warm-up
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        t = time.perf_counter()
        sample_images(flow, self.n_samples, 1.0, seed=1)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        rate = self.n_samples / max(time.perf_counter() - t, 1e-9)
        for logger in trainer.loggers:
            logger.log_metrics({"sample/images_per_s": rate}, step=trainer.global_step)
