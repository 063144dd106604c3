"""The benchmark: flowlab's models from conf/, stepped through the real training step (FlowModule without a Trainer,
so only the step is timed), beside the public-style reference Glow (float32 Adam, as those train); the model table,
alternating-round ratios, layers and the paper's claims, the memory table, the bits/dim check, and the goals."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import runpy
import sys
import time
import warnings
from collections import namedtuple
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning_fabric.utilities.throughput import get_available_flops, measure_flops
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.benchmark import Timer

from flowlab.cli._config import config_dir
from flowlab.data.transforms import dequantize, preprocess, reduce_bits
from flowlab.errors import UserError
from flowlab.flows import EmergingConv, InvertibleConv1x1, InvertibleNxNConv
from flowlab.flows.memory import MODES
from flowlab.lit.module import FlowModule

REFERENCE, RATIO_MODEL, SAMPLING_PAIR = "reference", "conv1x1_lu", ("nxn_lu", "conv1x1_lu")
REFERENCE_FILE = Path(__file__).resolve().parents[3] / "experiments" / "bench" / "reference_glow.py"
#: training without the fast path, through the same optim config (``--plain``, and the check's float32 run)
PLAIN = ("optim.optimizer.fused=false", "optim.coupling_dtype=float32", "optim.coupling_channels_last=false")
WARMUP = 2  # untimed steps before timing (the first initialises ActNorm); the Timer adds its own

#: sizes; timing: ``repeats`` blocks (``rounds`` in ratios) of ``calls`` calls (``layer_calls`` for layers); the check's length
Preset = namedtuple("Preset", "name image_size K L hidden_channels batch repeats rounds calls layer_calls layer_shapes "
                              "check_steps check_batch")
_SHAPES = ((12, 16, 16), (48, 16, 16), (48, 4, 4))  # level 1 of a 32x32x3 Glow; 4x its channels; level 3
PRESETS = {p.name: p for p in (
    Preset("cpu", 32, 8, 3, 128, 32, 5, 10, 2, 10, tuple((32, *s) for s in _SHAPES), 500, 32),
    Preset("gpu", 32, 32, 3, 512, 256, 5, 10, 10, 20, tuple((256, *s) for s in _SHAPES), 2000, 64),  # CIFAR-10's
    Preset("quick", 8, 2, 2, 16, 4, 2, 4, 1, 1, ((4, 12, 4, 4),), 4, 4),  # tests; not a performance number
)}
KS = (8, 16, 32)  # the memory table's K
CPU_RATIO_GOAL, GPU_IMAGES_PER_S_GOAL, SAMPLING_GOAL, CHECK_TOLERANCE = 2.0, 8000.0, 0.9, 0.01
LAYERS = {  # as Glow builds them (flowlab.flows.glow.PERMUTATIONS), beside a standard convolution
    "nxn": lambda c: InvertibleNxNConv(c, kernel_size=3, lu=True),
    "conv1x1": lambda c: InvertibleConv1x1(c),
    "conv1x1_lu": lambda c: InvertibleConv1x1(c, lu=True),
    "emerging": lambda c: EmergingConv(c, kernel_size=3, lu=False),
    "conv3x3": lambda c: torch.nn.Conv2d(c, c, 3, padding=1),
}
log = functools.partial(print, "[bench]", file=sys.stderr, flush=True)


@functools.cache
def configs(name: str, p: Preset, plain: bool = False) -> tuple[dict, dict]:
    """``(model, optim)`` as flowlab-train composes them from conf/train.yaml, at the preset's sizes."""
    sizes = ["model=realnvp"] if name == "realnvp" else [f"model/permutation={name}", f"model.K={p.K}",
                                                          f"model.hidden_channels={p.hidden_channels}"]
    overrides = ["data=cifar10", f"data.image_size={p.image_size}", f"model.L={p.L}", *sizes, *(PLAIN if plain else ())]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="flowlab-bench"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.optim, resolve=True)


@functools.cache
def reference_glow() -> type:
    if not REFERENCE_FILE.is_file():
        raise UserError(f"{REFERENCE_FILE} is missing: run flowlab-bench from flowlab's source checkout "
                        f"(pip install -e .), or leave 'reference' out of --models")
    return runpy.run_path(str(REFERENCE_FILE))["ReferenceGlow"]


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 ``[n, 3, size, size]`` with image-like statistics (smooth colour fields at four scales, grain)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(n, 3, size, size, generator=g)
    for res, amp in ((2, 1.0), (4, 0.7), (8, 0.35), (16, 0.15)):
        r = min(res, size)
        field = 0.5 * torch.randn(n, 3, r, r, generator=g) + torch.randn(n, 1, r, r, generator=g)
        x += amp * torch.nn.functional.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    return (torch.sigmoid(x) * 255).round().to(torch.uint8)


def batches(count: int, p: Preset, device: torch.device, x: torch.Tensor | None = None) -> list[tuple]:
    """``count`` batches ``(x, y, index)`` of ``x`` (default: synthetic 8-bit images), indexed 0, 1, ..."""
    x = (reduce_bits(images(count * p.batch, p.image_size, seed=0), 8) if x is None else x).to(device)
    b = len(x) // count
    return [(x[i:i + b], torch.zeros(b, dtype=torch.long, device=device), torch.arange(i, i + b, device=device))
            for i in range(0, count * b, b)]


class FlowRun:
    """A FlowModule stepped as Lightning's automatic optimisation does: ``optimizer_step`` runs a closure of
    ``training_step``, ``optimizer_zero_grad``, ``backward``, ``on_before_optimizer_step``; then the schedule."""

    def __init__(self, model: dict, optim: dict, device: torch.device):
        # without a Trainer, FlowModule's self.log returns at once (after a warning)
        warnings.filterwarnings("ignore", message=r".*reference is not registered on the model")
        torch.manual_seed(0)
        self.module = FlowModule(model, optim, eval_seed=0, seed=0, use_ema=False).to(device)  # no evaluation here
        opt = self.module.configure_optimizers()
        self.opt, self.sched = (opt["optimizer"], opt["lr_scheduler"]["scheduler"]) if isinstance(opt, dict) else (opt, None)
        self.module.on_fit_start()  # resolves optim.coupling_dtype on the device
        self.flow, self.n_bits, self.i = self.module.flow, self.module.n_bits, 0
        self.dtype = getattr(self.module, "_train_coupling_dtype", None) or torch.float32

    def loss(self, batch) -> torch.Tensor:
        return self.module.training_step(batch, self.i)

    def step(self, batch) -> None:
        m, opt = self.module, self.opt

        def closure():
            loss = self.loss(batch)
            m.optimizer_zero_grad(0, self.i, opt)
            m.backward(loss)
            m.on_before_optimizer_step(opt)
            return loss

        m.optimizer_step(0, self.i, opt, closure)
        if self.sched is not None:
            self.sched.step()
        self.i += 1

    def evaluate(self, batch) -> None:
        self.module.validation_step(batch, 0)


class ReferenceRun:
    """The public-style Glow at the same sizes, trained as those implementations train: float32 Adam."""

    def __init__(self, model: dict, optim: dict, device: torch.device):
        torch.manual_seed(0)
        keys = ("in_channels", "image_size", "K", "L", "hidden_channels", "n_bits")
        self.flow = reference_glow()(**{k: model[k] for k in keys}).to(device).train()
        self.opt = torch.optim.Adam(self.flow.parameters(), lr=optim["optimizer"]["lr"], betas=optim["optimizer"]["betas"])
        self.n_bits, self.dtype = model["n_bits"], torch.float32

    def loss(self, batch) -> torch.Tensor:
        return self.evaluate(batch).mean()

    def step(self, batch) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.opt.step()

    def evaluate(self, batch) -> torch.Tensor:
        return self.flow.bits_per_dim(dequantize(preprocess(batch[0], self.n_bits), self.n_bits))


def build(name: str, p: Preset, device: torch.device, plain: bool = False) -> FlowRun | ReferenceRun:
    """Model ``name`` (flowlab's, or the reference at RATIO_MODEL's sizes), seeded alike, ready to step."""
    if name == REFERENCE:
        return ReferenceRun(*configs(RATIO_MODEL, p), device)
    return FlowRun(*configs(name, p, plain), device)


def stepper(run: FlowRun | ReferenceRun, data: list[tuple]):
    """A no-argument training step cycling through ``data``."""
    return functools.partial(lambda it: run.step(next(it)), itertools.cycle(data))


def alternate(fns: list, rounds: int, calls: int) -> list[list[float]]:
    """Seconds per call of each function in ``rounds`` rounds, in order A B, then B A, ... (a drift in the
    machine's speed hits all alike), each a ``Timer.timeit(calls)`` (CUDA synchronised, two untimed calls first)."""
    out: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            out[i].append(Timer("fn()", globals={"fn": fns[i]}, num_threads=torch.get_num_threads()).timeit(calls).mean)
    return out


def quartiles(xs: list[float]) -> dict:
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return dict(zip(("q1", "median", "q3"), q.tolist()), n=len(xs))


def measure_memory(run: FlowRun | ReferenceRun, batch, device: torch.device) -> dict:
    """MiB the training step's forward keeps for backward (``activation_mib``) and its peak above the step's start,
    from the allocator's records (torch.profiler); on CUDA also ``max_memory_allocated`` over the step."""
    run.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = run.loss(batch)
        with record_function("flowlab.backward"):
            loss.backward()
    events = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in events if e.name() == "flowlab.backward")
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                    and e.device_type().name == device.type.upper())  # (time ns, bytes; negative when freed)
    totals = list(zip([0, *(t for t, _ in allocs)], itertools.accumulate((n for _, n in allocs), initial=0)))
    row = {"activation_mib": [n for t, n in totals if t < start][-1] / 2**20, "peak_mib": max(n for _, n in totals) / 2**20}
    if device.type == "cuda":
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def bench_model(name: str, p: Preset, device: torch.device, plain: bool = False) -> dict:
    """One row of the model table: parameters, images/s, peak memory, FLOPs and MFU (Lightning's), recon error."""
    def ips(fn) -> dict:  # images/s over the preset's blocks
        return quartiles([p.batch / s for s in alternate([fn], p.repeats, p.calls)[0]])

    run, data = build(name, p, device, plain), batches(4, p, device)
    for i in range(WARMUP):
        run.step(data[i])
    row = {"model": name, "plain": plain and name != REFERENCE, "dtype": str(run.dtype).removeprefix("torch."),
           "params": sum(q.numel() for q in run.flow.parameters()),
           "flops_per_image": measure_flops(run.flow, lambda: run.step(data[0])) / p.batch}
    row["train_images_per_s"] = ips(stepper(run, data))
    mem = measure_memory(run, data[1], device)
    row.update(peak_mib=mem.get("cuda_peak_mib", mem["peak_mib"]), memory_kind="CUDA max_memory_allocated"
               if device.type == "cuda" else "the allocator's peak above the step's start (torch.profiler)")
    achieved, peak = row["flops_per_image"] * row["train_images_per_s"]["median"], get_available_flops(device, run.dtype)
    row.update(achieved_tflops=achieved / 1e12, mfu=achieved / peak if peak else None)
    run.flow.eval()
    with torch.no_grad():
        row.update(eval_images_per_s=ips(lambda: run.evaluate(data[1])),
                   sample_images_per_s=ips(lambda: run.flow.sample(p.batch)),
                   sample_finite=bool(torch.isfinite(run.flow.sample(p.batch)).all()))
        x = dequantize(preprocess(data[2][0], run.n_bits), run.n_bits)
        row["max_reconstruction_error"] = float((run.flow.decode(run.flow.encode(x)[0]) - x).abs().max())
    return row


def ratio_summary(secs_a: list[float], secs_b: list[float], batch: int) -> dict:
    """A / B speed from alternating rounds: quartiles of the per-round ratios (B's seconds over A's)."""
    return {"ratio": quartiles([tb / ta for ta, tb in zip(secs_a, secs_b)]), "rounds": len(secs_a),
            "a_images_per_s": quartiles([batch / s for s in secs_a]), "b_images_per_s": quartiles([batch / s for s in secs_b])}


def paired(a: str, b: str, p: Preset, device: torch.device, plain: bool = False, sample: bool = False) -> dict:
    """Training (with ``sample``: sampling, in eval mode) images/s of models a / b in alternating rounds."""
    runs, data = [build(a, p, device, plain), build(b, p, device, plain)], batches(4, p, device)
    fns = [stepper(run, data) for run in runs]
    for fn in fns * WARMUP:  # ActNorm initialised as in training
        fn()
    if sample:
        for run in runs:
            run.flow.eval()
        fns = [lambda r=r: r.flow.sample(p.batch) for r in runs]
    with torch.no_grad() if sample else contextlib.nullcontext():
        return {"a": a, "b": b, **ratio_summary(*alternate(fns, p.rounds, p.calls), p.batch)}


def bench_layers(p: Preset, device: torch.device) -> dict:
    """float32, eval mode, no gradients: parameters, forward and inverse ms per call, max inverse error; the claims."""
    rows, ms = [], lambda fn: quartiles([1e3 * s for s in alternate([fn], p.repeats, p.layer_calls)[0]])
    for shape in p.layer_shapes:
        x = torch.rand(shape, device=device) - 0.5
        for name, make in LAYERS.items():
            torch.manual_seed(0)
            layer = make(shape[1]).to(device).eval()
            with torch.no_grad():
                for q in layer.parameters():  # away from the identity-like initialisation
                    q.add_(0.01 * torch.randn_like(q))
                row = {"shape": list(shape), "layer": name, "params": sum(q.numel() for q in layer.parameters()),
                       "forward_ms": ms(lambda: layer(x))}
                if hasattr(layer, "inverse"):
                    y = layer(x)[0]
                    row.update(inverse_ms=ms(lambda: layer.inverse(y)), inverse_error=float((layer.inverse(y) - x).abs().max()))
            rows.append(row)
    return {"rows": rows, "claims": claims(rows)}


def claims(rows: list[dict]) -> list[dict]:
    """The paper's layer claims, shape by shape: n×n vs a standard 3×3 conv and vs Emerging."""
    out = []
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        by = {r["layer"]: r for r in rows if tuple(r["shape"]) == shape}
        for what, key, other in (("fewer parameters than a standard 3×3 conv", "params", "conv3x3"),
                                 ("faster forward than a standard 3×3 conv", "forward_ms", "conv3x3"),
                                 ("faster inverse than Emerging", "inverse_ms", "emerging")):
            if "nxn" in by and other in by:
                a, b = (v if key == "params" else v["median"] for v in (by["nxn"][key], by[other][key]))
                out.append({"shape": list(shape), "claim": f"n×n conv: {what}", "nxn": a, "other": b, "holds": a < b})
    return out


def memory_table(device: str = "cpu", preset: str = "cpu", ks=KS, rounds: int | None = None,
                 calls: int | None = None) -> list[dict]:
    """One row per (K, model.memory_saving) of Glow ``nxn``: memory (activation: what the forward keeps for
    backward), seconds per training step (median of alternating rounds), both relative to ``none`` at the same K."""
    device, p = torch.device(device), PRESETS[preset]
    rows = []
    for k in ks:
        model_cfg, optim = configs("nxn", p._replace(K=k))
        data = batches(2, p, device)
        runs = [FlowRun({**model_cfg, "memory_saving": mode}, optim, device) for mode in MODES]
        for run in runs:  # initialises ActNorm, creates the optimiser's state
            run.step(data[0])
        mem = [measure_memory(run, data[1], device) for run in runs]
        times = alternate([stepper(run, data) for run in runs], rounds or p.rounds, calls or p.calls)
        medians = [quartiles(t)["median"] for t in times]
        for mode, m, t in zip(MODES, mem, medians):
            rows.append({"K": k, "memory_saving": mode, **m, "step_s": t,
                         "activation_vs_none": m["activation_mib"] / mem[0]["activation_mib"], "time_vs_none": t / medians[0]})
        del runs
    return rows


def bpd_check(p: Preset, device: torch.device, steps: int, on_point=lambda result: None) -> dict:
    """Bits/dim with the defaults vs strict float32 (PLAIN, TF32 convolutions off; matmuls keep torch's "highest"),
    same initial weights and batches, evaluated like validation in float32 on 4 held-out batches at 8 points."""
    runs = {"defaults": build(RATIO_MODEL, p, device), "float32": build(RATIO_MODEL, p, device, plain=True)}
    strict = functools.partial(torch.backends.cudnn.flags, enabled=torch.backends.cudnn.enabled, allow_tf32=False)
    runs["float32"].module.load_state_dict(runs["defaults"].module.state_dict())
    b = p.check_batch
    pool = reduce_bits(images(min(20000, 256 * b), p.image_size, seed=7), runs["float32"].n_bits).to(device)
    held, train = batches(4, p, device, pool[:4 * b]), pool[4 * b:]

    def evaluate(module) -> float:
        module.eval().val_bpd.reset()
        with torch.no_grad(), strict():
            for x in held:
                module.validation_step(x, 0)
        return float(module.train().val_bpd.compute())

    result = {"model": RATIO_MODEL, "steps": steps, "batch": b, "images": len(pool), "tolerance": CHECK_TOLERANCE,
              "points": [], "seconds": dict.fromkeys(runs, 0.0)}
    done = 0
    for end in sorted({math.ceil(steps * k / 8) for k in range(1, 9)}):
        for label, run in runs.items():
            with strict() if label == "float32" else contextlib.nullcontext():
                start = time.perf_counter()
                for i in range(done, end):  # batch i depends on i only
                    idx = torch.randint(len(train), (b,), generator=torch.Generator().manual_seed(i)).to(device)
                    run.step((train[idx], torch.zeros_like(idx), idx))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result["seconds"][label] += time.perf_counter() - start
        done, point = end, {"step": end, **{label: evaluate(run.module) for label, run in runs.items()}}
        diff = result["difference"] = point["defaults"] - point["float32"]
        result["points"].append({**point, "difference": diff})
        result["passed"] = end == steps and math.isfinite(diff) and abs(diff) <= CHECK_TOLERANCE
        log(f"check step {end}/{steps}: defaults {point['defaults']:.4f}, float32 {point['float32']:.4f} bits/dim")
        on_point(result)
    return result


def goals(r: dict, p: Preset, device: torch.device) -> list[dict]:
    row = next((m for m in r["models"] if m["model"] == RATIO_MODEL and not m["plain"]), None)
    found = [  # (goal, value where it applies, target)
        (f"CPU preset: flowlab {RATIO_MODEL} / reference training images/s",
         r.get("ratio") and p.name == "cpu" and r["ratio"]["ratio"]["median"], CPU_RATIO_GOAL),
        (f"GPU preset (target for an H200): flowlab {RATIO_MODEL} training images/s",
         row and p.name == "gpu" and device.type == "cuda" and row["train_images_per_s"]["median"], GPU_IMAGES_PER_S_GOAL),
        (f"sampling speed, {' / '.join(SAMPLING_PAIR)} (alternating rounds)",
         r.get("sampling") and r["sampling"]["ratio"]["median"], SAMPLING_GOAL)]
    found = [(g, v, f"≥ {t:,g}", v >= t) for g, v, t in found if v]
    for m in (m for m in r.get("memory") or () if m["K"] == 32 and m["memory_saving"] == "invertible"):
        found += [(f"K=32: invertible / none {what}", m[key], f"≤ {t:g}", m[key] <= t)
                  for what, key, t in (("activation memory", "activation_vs_none", 0.25), ("step time", "time_vs_none", 1.5))]
    if c := r.get("check"):
        found.append((f"bits/dim, training defaults − float32, after {c['points'][-1]['step']} of {c['steps']} steps",
                      c["difference"], f"within ±{CHECK_TOLERANCE:g}, all steps", c["passed"]))
    return [dict(zip(("goal", "value", "target", "met"), g)) for g in found]


def run(p: Preset, device: torch.device, models: list[str], result: dict, *, plain: bool = False,
        layers: bool = True, memory: bool = True, check_steps: int = 0, on_progress=lambda result: None) -> dict:
    """Everything asked for, into ``result``; ``on_progress(result)`` after every part (a run cut short keeps it)."""
    def done(key: str, value) -> None:
        result.update({key: value, "goals": goals({**result, key: value}, p, device)})
        gc.collect()
        on_progress(result)

    result.update(models=[], complete=False)
    rows = [(m, plain) for m in models]
    if not plain and RATIO_MODEL in models:  # what the fast path adds, next to the reference
        rows.insert(models.index(REFERENCE) if REFERENCE in models else len(rows), (RATIO_MODEL, True))
    for name, as_plain in rows:
        log(f"model {name}{' (plain)' if as_plain else ''} ...")
        done("models", result["models"] + [bench_model(name, p, device, as_plain)])
    parts = (  # (key, wanted, measurement)
        ("ratio", {RATIO_MODEL, REFERENCE} <= set(models), lambda: paired(RATIO_MODEL, REFERENCE, p, device, plain)),
        ("sampling", set(SAMPLING_PAIR) <= set(models), lambda: paired(*SAMPLING_PAIR, p, device, plain, sample=True)),
        ("layers", layers, lambda: bench_layers(p, device)),
        ("memory", memory, lambda: memory_table(str(device), p.name, ks=(p.K,) if p.name == "quick" else KS)),
        ("check", check_steps, lambda: bpd_check(p, device, check_steps, on_point=lambda c: done("check", c))))
    for key, wanted, measure in parts:
        if wanted:
            log(f"{key} ...")
            done(key, measure())
    done("complete", True)
    return result
