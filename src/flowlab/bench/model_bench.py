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
from .timing import Stats, alternate, rate_stats, time_per_call


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


class TrainingRun:
    """One model ready to be timed: built, switches applied, ActNorm initialised, optimiser made.

    ``step()`` is one training step as the module docstring defines it.
    """

    def __init__(self, name: str, preset: Preset, device: torch.device, switches: Switches, *, lr: float = 1e-3,
                 lr_warmup: int = 200, seed: int = 0):
        torch.manual_seed(seed)
        switches.activate(device)
        self.name, self.switches, self.device, self.lr, self.lr_warmup = name, switches, device, lr, lr_warmup
        model = build_model(name, preset, switches.glow_kwargs).to(device)
        self.model = model = switches.prepare_model(model)
        self.batches = [switches.prepare_input(x, model) for x in benchmark_batches(
            4, preset.batch, preset.in_channels, preset.image_size, preset.n_bits, device, seed=seed)]
        initialize_actnorm(model, self.batches[0])
        model.train()
        self.eager_loss = lambda x: model.bits_per_dim(x).mean()
        self.opt = switches.optimizer(model.parameters(), lr, device)
        self.loss_fn = switches.wrap(self.eager_loss, device, model)
        self.steps_done = 0
        self.loss: torch.Tensor | None = None

    def step(self) -> None:
        x = self.batches[self.steps_done % len(self.batches)]
        self.steps_done += 1
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, self.steps_done / max(1, self.lr_warmup))
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x)
        loss.backward()
        self.opt.step()
        self.loss = loss

    def evaluation_mode(self) -> bool:
        """Eval mode as the platform evaluates and samples: reduced precision is for training steps
        only, so flowlab's coupling networks go back to float32 (their layout stays). True if they did."""
        native = self.switches.native_amp(self.model)
        if native:
            self.model.set_coupling_dtype(None)
        self.model.eval()
        return native


def bench_model(name: str, preset: Preset, device: torch.device, switches: Switches, *, lr: float = 1e-3,
                lr_warmup: int = 200, seed: int = 0, peak_flops: float | None = None, count_flops: bool = True) -> dict:
    """Every whole-model number for ``name``; see the module docstring."""
    run = TrainingRun(name, preset, device, switches, lr=lr, lr_warmup=lr_warmup, seed=seed)
    model, batches = run.model, run.batches
    result: dict = {"model": name, "switches": switches.label(), "amp_applied": switches.amp_applied(model),
                    "params": count_parameters(model)}
    result["max_reconstruction_error_init"] = reconstruction_error(model, batches[2], switches, device)

    if count_flops:
        with switches.autocast(device, model):
            flops = training_flops(run.eager_loss, model, batches[0])
        result["flops_per_image"] = flops / preset.batch

    # -- training ------------------------------------------------------------------------
    train_step = run.step
    with PeakMemory(device) as mem:
        secs = time_per_call(train_step, device, warmup=preset.warmup, repeats=preset.repeats, inner=preset.steps)
    train = rate_stats(secs, preset.batch)
    result["train_images_per_s"] = train.to_dict()
    result["train_step_ms"] = 1e3 * sorted(secs)[len(secs) // 2]
    result["train_steps_timed"] = preset.repeats * preset.steps
    result["final_train_loss"] = float(run.loss.detach().float().item())
    result["peak_memory"] = mem.to_dict()
    if "flops_per_image" in result and peak_flops:
        result["mfu"] = mfu(result["flops_per_image"], train.median, peak_flops)
        result["achieved_tflops"] = result["flops_per_image"] * train.median / 1e12
    run.opt.zero_grad(set_to_none=True)
    run.opt = None

    # -- evaluation and sampling ---------------------------------------------------------
    if run.evaluation_mode():
        result["eval_dtype"] = "float32 (coupling networks; reduced precision is for training steps)"
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


def bench_ratio(numerator: tuple[str, Switches], denominator: tuple[str, Switches], preset: Preset,
                device: torch.device, *, rounds: int, steps: int, lr: float = 1e-3, lr_warmup: int = 200,
                seed: int = 0) -> dict:
    """Training speed of two models timed in alternation, for their ratio.

    Both models are built and warmed up, then timed in ``rounds`` rounds of ``steps`` steps each, in
    the order A B, B A, A B, ... so that a change in the machine's speed during the run (other
    tenants, clock changes) hits both alike. The ratio is the median over rounds of
    ``images/s(A) / images/s(B)`` within the round.
    """
    a = TrainingRun(numerator[0], preset, device, numerator[1], lr=lr, lr_warmup=lr_warmup, seed=seed)
    b = TrainingRun(denominator[0], preset, device, denominator[1], lr=lr, lr_warmup=lr_warmup, seed=seed)
    for _ in range(max(1, preset.warmup)):
        a.step()
        b.step()

    def timed(run):
        def call():
            run.switches.activate(device)
            run.step()
        return call

    secs_a, secs_b = alternate([timed(a), timed(b)], device, rounds=rounds, inner=steps)
    del a, b
    gc.collect()
    return {"numerator": numerator[0], "numerator_switches": numerator[1].label(),
            "denominator": denominator[0], "denominator_switches": denominator[1].label(),
            "rounds": rounds, "steps_per_round": steps, **_alternating_rates(secs_a, secs_b, preset.batch)}


def _alternating_rates(secs_a: list[float], secs_b: list[float], batch: int) -> dict:
    """Images/s of A and B and the median of their per-round ratio A / B."""
    return {"numerator_images_per_s": rate_stats(secs_a, batch).to_dict(),
            "denominator_images_per_s": rate_stats(secs_b, batch).to_dict(),
            "ratio": Stats.of([tb / ta for ta, tb in zip(secs_a, secs_b)]).to_dict()}


def bench_sampling_ratio(numerator: str, denominator: str, preset: Preset, device: torch.device,
                         switches: Switches, *, rounds: int, seed: int = 0) -> dict:
    """Sampling speed of two models (eval mode, float32 coupling networks as the platform samples),
    timed in alternating rounds like :func:`bench_ratio`; ratio = median of per-round ratios."""
    runs = [TrainingRun(name, preset, device, switches, seed=seed) for name in (numerator, denominator)]
    for run in runs:
        run.evaluation_mode()
    fns = [switches.wrap(lambda n, m=run.model: m.sample(n), device, run.model) for run in runs]
    with torch.no_grad():
        calls = [lambda f=f: f(preset.batch) for f in fns]
        for call in calls:
            call()
        secs_a, secs_b = alternate(calls, device, rounds=rounds)
    del runs
    gc.collect()
    return {"numerator": numerator, "denominator": denominator, "rounds": rounds,
            **_alternating_rates(secs_a, secs_b, preset.batch)}
