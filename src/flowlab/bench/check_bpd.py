"""The numerics check of the GPU goal: bits/dim after N steps of the fast path vs the float32 reference run.

Two copies of the same flowlab model start from the same initial weights (one is built, its ActNorm
initialised on the first batch in float32, and its state copied into the other), and train with
Adam on the same data stream (the same images with the same dequantisation noise at every step):

* ``fast``: the switches given on the command line (autocast, compile, channels-last, TF32,
  fused Adam, ``--glow-kw`` options of flowlab's Glow);
* ``reference``: plain float32, eager, TF32 off (IEEE float32 matmuls and convolutions).

They train in alternating chunks of ``eval_every`` steps; after each chunk both are evaluated on
the same held-out images in strict float32, and the JSON is rewritten, so a run stopped by a time
limit still reports the last completed point. The check passes when both runs finished all
steps with finite numbers and ``|bpd_fast - bpd_reference| <= tolerance`` (0.01 by default).

Data: ``--data-npz`` (uint8 images, e.g. CIFAR-10 saved with numpy) or, where no dataset exists,
:func:`flowlab.bench.data.structured_images` drawn from a fixed seed.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from flowlab.errors import ConfigError

from .data import DataStream, load_npz, structured_images
from .models import build_model, initialize_actnorm
from .presets import Preset
from .switches import Switches, set_tf32


def _float32_couplings(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object, object]]:
    """Plain float32 NCHW coupling networks (flowlab's ``compute_dtype`` and ``channels_last`` off);
    returns what to restore."""
    saved = [(m, m.compute_dtype, getattr(m, "channels_last", False)) for m in model.modules()
             if hasattr(m, "compute_dtype")]
    for module, _, _ in saved:
        module.compute_dtype = None
        module.channels_last = False
    return saved


class _Run:
    def __init__(self, label: str, model: torch.nn.Module, switches: Switches, device: torch.device, lr: float,
                 warmup_steps: int):
        self.label, self.model, self.switches, self.device = label, model, switches, device
        self.lr, self.warmup_steps = lr, warmup_steps
        self.opt = switches.optimizer(model.parameters(), lr, device)
        self.loss_fn = switches.wrap(lambda x: model.bits_per_dim(x).mean(), device, model)
        self.step = 0
        self.seconds = 0.0
        self.curve: list[dict] = []

    def train(self, stream: DataStream, steps: int) -> None:
        self.switches.activate(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(steps):
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(1.0, (self.step + 1) / max(1, self.warmup_steps))
            x = self.switches.prepare_input(stream.batch(self.step), self.model)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(x)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach().float()
            self.step += 1
        mean_loss = float((loss_sum / steps).item())  # one host read per chunk
        self.seconds += time.perf_counter() - start
        self.curve.append({"step": self.step, "mean_train_bits_per_dim": mean_loss})

    @torch.no_grad()
    def evaluate(self, stream: DataStream, batch: int, fast: bool = False) -> float:
        """Mean bits/dim on the held-out images; strict float32 unless ``fast`` (the run's own switches)."""
        self.model.eval()
        saved = []
        if fast:
            self.switches.activate(self.device)
            fn = self.switches.wrap(lambda x: self.model.bits_per_dim(x), self.device, self.model)
        else:
            set_tf32(False)
            fn = self.model.bits_per_dim
            saved = _float32_couplings(self.model)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x in stream.eval_batches(batch):
            x = self.switches.prepare_input(x, self.model) if fast else x
            total += fn(x).double().sum()
            count += x.shape[0]
        for module, dtype, channels_last in saved:
            module.compute_dtype, module.channels_last = dtype, channels_last
        self.model.train()
        return float(total.item()) / count

    def summary(self, batch: int) -> dict:
        return {"switches": self.switches.label(), "amp_applied": self.switches.amp_applied(self.model), "steps": self.step, "train_seconds": self.seconds,
                "train_images_per_s": self.step * batch / self.seconds if self.seconds else None,
                "curve": self.curve}


def check_bpd(preset: Preset, device: torch.device, switches: Switches, steps: int, *, model_name: str = "conv1x1_lu",
              data_npz: str | None = None, n_images: int = 20000, eval_count: int | None = None,
              lr: float = 1e-3, warmup_steps: int = 200, eval_every: int | None = None, tolerance: float = 0.01,
              seed: int = 0, time_budget_s: float | None = None,
              on_progress: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    if steps < 1:
        raise ConfigError(f"--check-bpd {steps}: the number of training steps must be at least 1")
    if tolerance <= 0:
        raise ConfigError(f"--check-tolerance {tolerance}: must be positive")
    eval_every = min(steps, eval_every or max(1, steps // 8))
    eval_count = eval_count or min(2048, max(preset.batch, 8 * preset.batch))
    t_start = time.perf_counter()

    if data_npz:
        images = load_npz(data_npz, preset.in_channels, preset.image_size)
        data_desc = {"kind": "npz", "path": str(data_npz), "images": int(images.shape[0])}
    else:
        images = structured_images(n_images + eval_count, preset.in_channels, preset.image_size, device, seed=seed + 7)
        data_desc = {"kind": "synthetic-structured", "seed": seed + 7, "images": int(images.shape[0])}
    stream = DataStream(images, preset.batch, preset.n_bits, device, seed, eval_count)
    data_desc.update(train_images=int(stream.train.shape[0]), eval_images=int(stream.eval_int.shape[0]))
    del images

    torch.manual_seed(seed)
    fast_model = build_model(model_name, preset, switches.glow_kwargs).to(device)
    set_tf32(False)
    initialize_actnorm(fast_model, stream.batch(0))  # the same first batch both runs start with
    ref_model = build_model(model_name, preset, {}).to(device)
    try:
        ref_model.load_state_dict(fast_model.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"--glow-kw {switches.glow_kwargs} changes the model's parameters, so the fast and the "
                          f"reference run cannot start from the same weights: {e}") from None
    _float32_couplings(ref_model)  # the reference run is float32 whatever the model's defaults
    fast_model = switches.prepare_model(fast_model)
    ref_switches = Switches.plain(tf32=False)
    runs = [_Run("fast", fast_model, switches, device, lr, warmup_steps),
            _Run("reference", ref_model, ref_switches, device, lr, warmup_steps)]

    result = {"mode": "check_bpd", "model": model_name, "steps_requested": steps, "lr": lr,
              "warmup_steps": warmup_steps, "batch": preset.batch, "eval_every": eval_every,
              "tolerance": tolerance, "seed": seed, "data": data_desc, "points": []}

    def finish(complete: bool) -> dict:
        last = result["points"][-1] if result["points"] else None
        result["complete"] = complete
        result["steps_done"] = runs[0].step
        for run in runs:
            result[run.label] = run.summary(preset.batch)
        if last:
            result["bits_per_dim_fast"] = last["fast"]
            result["bits_per_dim_reference"] = last["reference"]
            result["difference"] = last["fast"] - last["reference"]
            finite = math.isfinite(last["fast"]) and math.isfinite(last["reference"])
            result["passed"] = bool(complete and finite and abs(result["difference"]) <= tolerance)
        else:
            result["passed"] = False
        if runs[0].seconds and runs[1].seconds:
            result["speedup_fast_over_reference"] = runs[1].seconds / runs[0].seconds
        return result

    done = 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        for run in runs:
            run.train(stream, chunk)
        done += chunk
        point = {"step": done, "fast": runs[0].evaluate(stream, preset.batch),
                 "reference": runs[1].evaluate(stream, preset.batch)}
        point["difference"] = point["fast"] - point["reference"]
        result["points"].append(point)
        log(f"check-bpd step {done}/{steps}: fast {point['fast']:.4f}, reference {point['reference']:.4f}, "
            f"difference {point['difference']:+.4f} bits/dim")
        if on_progress:
            on_progress(finish(done >= steps))
        elapsed = time.perf_counter() - t_start
        per_chunk = (runs[0].seconds + runs[1].seconds) / done * eval_every
        if done < steps and time_budget_s is not None and elapsed + 1.2 * per_chunk > time_budget_s:
            log(f"check-bpd: stopping at step {done} of {steps}: the next chunk would pass --time-budget {time_budget_s:g}s")
            break
    result["bits_per_dim_fast_own_switches"] = runs[0].evaluate(stream, preset.batch, fast=True)
    result["wall_seconds"] = time.perf_counter() - t_start
    return finish(done >= steps)
