"""Whole-model benchmark: parameters, training / evaluation / sampling images/s, peak memory,
reconstruction error and FLOPs per training step, for one model.

Training step = ``zero_grad`` + forward (mean bits/dim of a batch) + backward + ``Adam.step``, on
dequantised image-like batches in [-0.5, 0.5) (:func:`flowlab.bench.data.benchmark_batches`), with
the learning rate warmed up linearly over ``lr_warmup`` steps as a Glow run starts. Nothing in the
timed loop reads a value back to the host; the last loss is read once, after timing. ActNorm is
initialised on the first batch before timing. The reconstruction error is measured twice: right
after initialisation and after the timed steps.
"""

from __future__ import annotations

import gc
import math
import sys

import torch

from .data import benchmark_batches
from .flops import mfu, training_flops
from .memory import PeakMemory
from .models import build_model, count_parameters, initialize_actnorm
from .presets import Preset
from .switches import Switches
from .timing import rate_stats, time_per_call


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def reconstruction_error(model: torch.nn.Module, x: torch.Tensor, switches: Switches, device: torch.device) -> float:
    """``max |decode(encode(x)) - x|`` in eval mode, under the run's switches (not compiled)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), switches.autocast(device, model):
        zs, _ = model.encode(x)
        recon = model.decode(zs)
    model.train(was_training)
    return float((recon.float() - x.float()).abs().max().item())


def bench_model(name: str, preset: Preset, device: torch.device, switches: Switches, *, lr: float = 1e-3,
                lr_warmup: int = 200, seed: int = 0, peak_flops: float | None = None, count_flops: bool = True) -> dict:
    """Every whole-model number for ``name``; see the module docstring."""
    torch.manual_seed(seed)
    switches.activate(device)
    model = build_model(name, preset, switches.glow_kwargs).to(device)
    model = switches.prepare_model(model)
    result: dict = {"model": name, "switches": switches.label(), "amp_applied": switches.amp_applied(model),
                    "params": count_parameters(model)}

    batches = [switches.prepare_input(x) for x in benchmark_batches(
        4, preset.batch, preset.in_channels, preset.image_size, preset.n_bits, device, seed=seed)]
    initialize_actnorm(model, batches[0])
    result["max_reconstruction_error_init"] = reconstruction_error(model, batches[2], switches, device)
    model.train()

    def eager_loss(x):
        return model.bits_per_dim(x).mean()

    if count_flops:
        with switches.autocast(device, model):
            flops = training_flops(eager_loss, model, batches[0])
        result["flops_per_image"] = flops / preset.batch

    # -- training ------------------------------------------------------------------------
    opt = switches.optimizer(model.parameters(), lr, device)
    loss_fn = switches.wrap(eager_loss, device, model)
    state = {"i": 0, "loss": None}

    def train_step():
        x = batches[state["i"] % len(batches)]
        state["i"] += 1
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, state["i"] / max(1, lr_warmup))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        state["loss"] = loss

    with PeakMemory(device) as mem:
        secs = time_per_call(train_step, device, warmup=preset.warmup, repeats=preset.repeats, inner=preset.steps)
    train = rate_stats(secs, preset.batch)
    result["train_images_per_s"] = train.to_dict()
    result["train_step_ms"] = 1e3 * sorted(secs)[len(secs) // 2]
    result["train_steps_timed"] = preset.repeats * preset.steps
    result["final_train_loss"] = float(state["loss"].detach().float().item())
    result["peak_memory"] = mem.to_dict()
    if "flops_per_image" in result and peak_flops:
        result["mfu"] = mfu(result["flops_per_image"], train.median, peak_flops)
        result["achieved_tflops"] = result["flops_per_image"] * train.median / 1e12
    opt.zero_grad(set_to_none=True)
    del opt

    # -- evaluation and sampling ---------------------------------------------------------
    model.eval()
    eval_fn = switches.wrap(lambda x: model.bits_per_dim(x), device, model)
    sample_fn = switches.wrap(lambda n: model.sample(n), device, model)
    last = {}
    with torch.no_grad():
        def evaluate():
            last["bpd"] = eval_fn(batches[1])

        secs = time_per_call(evaluate, device, warmup=max(1, preset.warmup), repeats=preset.eval_repeats)
        result["eval_images_per_s"] = rate_stats(secs, preset.batch).to_dict()
        result["eval_bits_per_dim"] = float(last["bpd"].float().mean().item())

        def sample():
            last["x"] = sample_fn(preset.batch)

        secs = time_per_call(sample, device, warmup=max(1, preset.warmup), repeats=preset.eval_repeats)
        result["sample_images_per_s"] = rate_stats(secs, preset.batch).to_dict()
        result["sample_finite"] = bool(torch.isfinite(last["x"]).all().item())

    result["max_reconstruction_error"] = reconstruction_error(model, batches[2], switches, device)

    for key in ("final_train_loss", "eval_bits_per_dim", "max_reconstruction_error", "max_reconstruction_error_init"):
        if not math.isfinite(result[key]):
            log(f"warning: {name}: {key} = {result[key]} is not finite")
    del model, batches, last
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
