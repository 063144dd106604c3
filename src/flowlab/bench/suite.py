"""The measurements of one run: the model table, the two alternating-round ratios, the layer table and
the paper's layer claims, the bits/dim check, and the goals they are judged against."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time

import torch
from lightning_fabric.utilities.throughput import get_available_flops, measure_flops
from torch import nn

from flowlab.data.transforms import dequantize, preprocess, reduce_bits
from flowlab.flows import EmergingConv, InvertibleConv1x1, InvertibleNxNConv

from . import core
from .core import RATIO_MODEL, REFERENCE, SAMPLING_PAIR, Preset, build, per_call, quartiles, rates
from .memory import KS, memory_table

CPU_RATIO_GOAL, GPU_IMAGES_PER_S_GOAL, SAMPLING_GOAL, CHECK_TOLERANCE = 2.0, 8000.0, 0.9, 0.01
LAYERS = {  # as Glow builds them (flowlab.flows.glow.PERMUTATIONS), beside a standard convolution
    "nxn": lambda c: InvertibleNxNConv(c, kernel_size=3, lu=True),
    "conv1x1": lambda c: InvertibleConv1x1(c),
    "conv1x1_lu": lambda c: InvertibleConv1x1(c, lu=True),
    "emerging": lambda c: EmergingConv(c, kernel_size=3, lu=False),
    "conv3x3": lambda c: nn.Conv2d(c, c, 3, padding=1),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_model(name: str, p: Preset, device: torch.device, plain: bool = False) -> dict:
    """Parameters, training / evaluation / sampling images/s, peak training memory, FLOPs of a training
    step, and the reconstruction error after training, of one model."""
    run, data = build(name, p, device, plain), core.batches(4, p, device)
    for i in range(core.WARMUP):
        run.step(data[i])
    row = {"model": name, "plain": plain and name != REFERENCE, "dtype": str(run.dtype).removeprefix("torch."),
           "params": sum(q.numel() for q in run.flow.parameters()),
           "flops_per_image": measure_flops(run.flow, lambda: run.step(data[0])) / p.batch}  # one training step
    with core.peak_memory(device, row):
        row["train_images_per_s"] = rates(per_call(core.stepper(run, data), p.repeats, p.calls), p.batch)
    achieved = row["flops_per_image"] * row["train_images_per_s"]["median"]
    peak = get_available_flops(device, run.dtype)
    row.update(achieved_tflops=achieved / 1e12, mfu=achieved / peak if peak else None)
    run.flow.eval()
    with torch.no_grad():
        row["eval_images_per_s"] = rates(per_call(lambda: run.evaluate(data[1]), p.repeats, p.calls), p.batch)
        row["sample_images_per_s"] = rates(per_call(lambda: run.flow.sample(p.batch), p.repeats, p.calls), p.batch)
        row["sample_finite"] = bool(torch.isfinite(run.flow.sample(p.batch)).all())
        x = dequantize(preprocess(data[2][0], run.n_bits), run.n_bits)
        row["max_reconstruction_error"] = float((run.flow.decode(run.flow.encode(x)[0]) - x).abs().max())
    return row


def ratio_summary(secs_a: list[float], secs_b: list[float], batch: int) -> dict:
    """A / B speed from alternating rounds: quartiles of the per-round ratios (B's seconds over A's)."""
    return {"ratio": quartiles([tb / ta for ta, tb in zip(secs_a, secs_b)]), "rounds": len(secs_a),
            "a_images_per_s": rates(secs_a, batch), "b_images_per_s": rates(secs_b, batch)}


def paired(a: str, b: str, p: Preset, device: torch.device, plain: bool = False, sample: bool = False) -> dict:
    """Training (or, with ``sample``, sampling in eval mode as flowlab-sample) images/s of models a / b,
    both built, warmed up and timed in alternating rounds."""
    runs, data = [build(a, p, device, plain), build(b, p, device, plain)], core.batches(4, p, device)
    fns = [core.stepper(run, data) for run in runs]
    for fn in fns * core.WARMUP:  # ActNorm initialised as in training
        fn()
    if sample:
        for run in runs:
            run.flow.eval()
        fns = [lambda r=r: r.flow.sample(p.batch) for r in runs]
    with torch.no_grad() if sample else contextlib.nullcontext():
        return {"a": a, "b": b, **ratio_summary(*core.alternate(fns, p.rounds, p.calls), p.batch)}


def bench_layers(p: Preset, device: torch.device) -> dict:
    """float32, eval mode, no gradients: parameters, forward and inverse ms per call, max inverse error;
    and the claims they test."""
    rows, ms = [], lambda fn: quartiles([1e3 * s for s in per_call(fn, p.repeats, p.layer_calls)])
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
                    row["inverse_ms"] = ms(lambda: layer.inverse(y))
                    row["inverse_error"] = float((layer.inverse(y) - x).abs().max())
            rows.append(row)
    return {"rows": rows, "claims": claims(rows)}


def claims(rows: list[dict]) -> list[dict]:
    """The paper's layer claims, shape by shape: the n×n conv has fewer parameters and a faster forward
    than a standard 3×3 conv, and a faster inverse than Emerging."""
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


def bpd_check(p: Preset, device: torch.device, steps: int, on_point=lambda result: None) -> dict:
    """Bits/dim after ``steps`` training steps with the defaults vs strict float32 (PLAIN, TF32 off):
    same initial weights, same batches; both evaluated like validation, in float32, at 8 points."""
    runs = {"defaults": build(RATIO_MODEL, p, device), "float32": build(RATIO_MODEL, p, device, plain=True)}
    runs["float32"].module.load_state_dict(runs["defaults"].module.state_dict())
    b = p.check_batch
    pool = reduce_bits(core.images(min(20000, 256 * b), p.image_size, seed=7), runs["float32"].n_bits).to(device)
    held, train = core.batches(4, p, device, pool[:4 * b]), pool[4 * b:]  # the first 4 batches are held out

    def batch(i: int) -> tuple:  # batch i depends on i only
        idx = torch.randint(len(train), (b,), generator=torch.Generator().manual_seed(i)).to(device)
        return core.as_batch(train[idx], idx)

    def evaluate(module) -> float:
        module.eval().val_bpd.reset()
        with torch.no_grad(), core.strict_float32():
            for x in held:
                module.validation_step(x, 0)
        return float(module.train().val_bpd.compute())

    result = {"model": RATIO_MODEL, "steps": steps, "batch": b, "images": len(pool), "tolerance": CHECK_TOLERANCE,
              "points": [], "seconds": dict.fromkeys(runs, 0.0)}
    done = 0
    for end in sorted({math.ceil(steps * k / 8) for k in range(1, 9)}):
        for label, run in runs.items():
            with core.strict_float32() if label == "float32" else contextlib.nullcontext():
                start = time.perf_counter()
                for i in range(done, end):
                    run.step(batch(i))
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
    speeds = [  # (goal, value where it applies, at least)
        (f"CPU preset: flowlab {RATIO_MODEL} / reference training images/s",
         r.get("ratio") and p.name == "cpu" and r["ratio"]["ratio"]["median"], CPU_RATIO_GOAL),
        (f"GPU preset (target for an H200): flowlab {RATIO_MODEL} training images/s",
         row and p.name == "gpu" and device.type == "cuda" and row["train_images_per_s"]["median"],
         GPU_IMAGES_PER_S_GOAL),
        (f"sampling speed, {' / '.join(SAMPLING_PAIR)} (alternating rounds)",
         r.get("sampling") and r["sampling"]["ratio"]["median"], SAMPLING_GOAL)]
    out = [{"goal": g, "value": v, "target": f"≥ {t:,g}", "met": v >= t} for g, v, t in speeds if v]
    for m in (m for m in r.get("memory") or () if m["K"] == 32 and m["memory_saving"] == "invertible"):
        out += [{"goal": "K=32: invertible / none activation memory", "value": m["activation_vs_none"], "target": "≤ 0.25",
                 "met": m["activation_vs_none"] <= 0.25},
                {"goal": "K=32: invertible / none step time", "value": m["time_vs_none"], "target": "≤ 1.5",
                 "met": m["time_vs_none"] <= 1.5}]
    if c := r.get("check"):
        out.append({"goal": f"bits/dim, training defaults − float32, after {c['points'][-1]['step']} of "
                            f"{c['steps']} steps", "value": c["difference"],
                    "target": f"within ±{CHECK_TOLERANCE:g}, all steps", "met": c["passed"]})
    return out


def run(p: Preset, device: torch.device, models: list[str], result: dict, *, plain: bool = False,
        layers: bool = True, memory: bool = True, check_steps: int = 0, on_progress=None) -> dict:
    """Everything asked for, into ``result``; ``on_progress(result)`` after every part, so that a run cut
    short keeps what it measured."""
    def done(key: str, value) -> None:
        result.update({key: value, "goals": goals({**result, key: value}, p, device)})
        gc.collect()
        if on_progress:
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
