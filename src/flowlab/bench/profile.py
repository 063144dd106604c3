"""``flowlab-bench --profile``: torch.profiler over a few training steps, top ops by self time.

Issue 6 asks to make the step fast *by measurement*; this is the measurement. For each model the
step (zero_grad, forward, backward, Adam) is warmed up, then ``steps`` steps run under
``torch.profiler``; the table of operators sorted by self CPU time (self CUDA time on a GPU) is
returned and written beside a Chrome trace that can be opened in chrome://tracing or Perfetto.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .model_bench import TrainingRun
from .presets import Preset
from .switches import Switches


def profile_training(name: str, preset: Preset, device: torch.device, switches: Switches, *, steps: int,
                     warmup: int, out_dir: Path | None, stem: str, row_limit: int = 25, lr: float = 1e-3,
                     seed: int = 0) -> str:
    run = TrainingRun(name, preset, device, switches, lr=lr, seed=seed)
    opt, loss_fn, batches = run.opt, run.loss_fn, run.batches

    def step(i):  # TrainingRun.step (at a constant lr), its parts labelled
        opt.zero_grad(set_to_none=True)
        with record_function("forward"):
            loss = loss_fn(batches[i % 2])
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()

    for i in range(warmup):
        step(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=row_limit)
    text = (f"# profile: {name} ({switches.label()}), preset {preset.name}, {steps} training steps on {device}\n\n"
            f"{table}\n\n## grouped by input shape\n\n{shapes}\n")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}_{name}.txt").write_text(text)
        prof.export_chrome_trace(str(out_dir / f"{stem}_{name}.trace.json"))
    return text
