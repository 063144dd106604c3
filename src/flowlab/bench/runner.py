"""Runs the benchmark: every requested model, the layer micro-benchmarks, the ratio and the goals.

``run(config)`` returns one JSON-ready dict; :mod:`flowlab.bench.report` turns it into the
markdown table. Everything here uses torch and ``flowlab.flows`` only (no Hydra, Lightning, W&B),
so it runs on a machine that has nothing but torch.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable

import torch

from flowlab.errors import UserError

from .env import environment
from .flops import H200_BF16_PEAK
from .layer_bench import LAYERS, bench_layers, claims
from .model_bench import bench_model, bench_ratio, bench_sampling_ratio, log
from .models import RATIO_MODEL, REFERENCE, flows_available
from .presets import Preset
from .switches import Switches

SCHEMA = "flowlab-bench/1"

#: issue 6 goals
CPU_RATIO_TARGET = 2.0
GPU_IMAGES_PER_S_TARGET = 8000.0
SAMPLING_TARGET = 0.9  # n x n samples within 10% of the LU 1x1 model's speed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine ({torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


@dataclass
class BenchConfig:
    preset: Preset
    device: torch.device
    models: list[str]
    switches: Switches = field(default_factory=Switches)
    reference_fast: bool = False
    plain_row: bool = True  # also time RATIO_MODEL in plain float32 eager when the switches are not plain
    paired_rounds: int = 10  # alternating rounds for the ratio (0: the ratio of the sequential rows)
    layers: bool = True
    layer_names: tuple[str, ...] = LAYERS
    lr: float = 1e-3
    lr_warmup: int = 200
    seed: int = 0
    peak_flops: float = H200_BF16_PEAK
    report_mfu: bool | None = None  # None: on CUDA only
    count_flops: bool = True
    argv: list[str] | None = None


def _goals(result: dict, preset: Preset, device: torch.device) -> list[dict]:
    goals = []
    by_name = {m["model"]: m for m in result["models"] if "variant" not in m}
    ratio = result["ratio"]["value"]
    if ratio is not None and preset.name == "cpu":
        goals.append({"goal": f"CPU preset: flowlab {RATIO_MODEL} / reference training images/s", "value": ratio,
                      "target": f"≥ {CPU_RATIO_TARGET:g}", "met": ratio >= CPU_RATIO_TARGET})
    if RATIO_MODEL in by_name and preset.name == "gpu" and device.type == "cuda":
        v = by_name[RATIO_MODEL]["train_images_per_s"]["median"]
        goals.append({"goal": f"GPU preset: flowlab {RATIO_MODEL} training images/s ({result['env'].get('gpu')})",
                      "value": v, "target": f"≥ {GPU_IMAGES_PER_S_TARGET:,.0f} on an H200",
                      "met": v >= GPU_IMAGES_PER_S_TARGET})
    sampling = result.get("sampling_ratio")
    if sampling:
        v = sampling["ratio"]["median"]
        goals.append({"goal": "sampling speed, nxn / conv1x1_lu (alternating rounds)", "value": v,
                      "target": f"≥ {SAMPLING_TARGET:g}", "met": v >= SAMPLING_TARGET})
    return goals


def run(config: BenchConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """The whole benchmark; ``on_progress(partial)`` after every model, so a run cut short keeps its results."""
    preset, device = config.preset, config.device
    report_mfu = device.type == "cuda" if config.report_mfu is None else config.report_mfu
    ref_switches = config.switches.for_reference() if config.reference_fast else Switches.plain(config.switches.tf32)
    result: dict = {
        "schema": SCHEMA,
        "env": environment(device, config.argv),
        "preset": preset.to_dict(),
        "lr": config.lr,
        "lr_warmup": config.lr_warmup,
        "seed": config.seed,
        "switches": {"flowlab": config.switches.label(), "reference": ref_switches.label(),
                     "flowlab_detail": config.switches.to_dict(), "reference_detail": ref_switches.to_dict()},
        "peak_flops": config.peak_flops if report_mfu else None,
        "models": [],
    }
    runs = [(name, ref_switches if name == REFERENCE else config.switches, None) for name in config.models]
    if config.plain_row and RATIO_MODEL in config.models and not config.switches.is_plain:
        plain = (RATIO_MODEL, Switches.plain(config.switches.tf32), "plain")
        at = config.models.index(REFERENCE) if REFERENCE in config.models else len(runs)
        runs.insert(at, plain)  # timed next to the reference
    for name, switches, variant in runs:
        label = name if variant is None else f"{name} ({switches.label()})"
        log(f"model {label} ({switches.label()}) ...")
        r = bench_model(name, preset, device, switches, lr=config.lr, lr_warmup=config.lr_warmup, seed=config.seed,
                        peak_flops=config.peak_flops if report_mfu else None, count_flops=config.count_flops)
        if variant is not None:
            r["variant"] = variant
        log(f"model {label}: train {r['train_images_per_s']['median']:.1f} img/s, "
            f"eval {r['eval_images_per_s']['median']:.1f} img/s, sample {r['sample_images_per_s']['median']:.1f} img/s")
        result["models"].append(r)
        gc.collect()
        if on_progress:
            on_progress({**result, "complete": False})

    by_name = {m["model"]: m for m in result["models"] if "variant" not in m}
    plain_num = next((m for m in result["models"] if m.get("variant") == "plain"), None)
    num, den = by_name.get(RATIO_MODEL), by_name.get(REFERENCE)
    result["ratio"] = {
        "numerator": RATIO_MODEL, "denominator": REFERENCE,
        "numerator_switches": num["switches"] if num else None,
        # sequential: each model's own row above, timed one after the other
        "sequential_numerator_images_per_s": num["train_images_per_s"]["median"] if num else None,
        "sequential_reference_images_per_s": den["train_images_per_s"]["median"] if den else None,
        "sequential_value": (num["train_images_per_s"]["median"] / den["train_images_per_s"]["median"])
        if num and den else None,
        "plain_images_per_s": plain_num["train_images_per_s"]["median"] if plain_num else None,
        "plain_value": (plain_num["train_images_per_s"]["median"] / den["train_images_per_s"]["median"])
        if plain_num and den else None,
        "value": None,
    }
    if num and den and config.paired_rounds:
        log(f"ratio: {RATIO_MODEL} and {REFERENCE} timed in alternation ({config.paired_rounds} rounds) ...")
        paired = bench_ratio((RATIO_MODEL, config.switches), (REFERENCE, ref_switches), preset, device,
                             rounds=config.paired_rounds, steps=preset.steps, lr=config.lr,
                             lr_warmup=config.lr_warmup, seed=config.seed)
        result["ratio"]["paired"] = paired
        result["ratio"].update(value=paired["ratio"]["median"],
                               numerator_images_per_s=paired["numerator_images_per_s"]["median"],
                               reference_images_per_s=paired["denominator_images_per_s"]["median"])
        log(f"ratio: {paired['ratio']['median']:.2f}x (IQR {paired['ratio']['q1']:.2f}-{paired['ratio']['q3']:.2f})")
    elif num and den:
        result["ratio"].update(value=result["ratio"]["sequential_value"],
                               numerator_images_per_s=result["ratio"]["sequential_numerator_images_per_s"],
                               reference_images_per_s=result["ratio"]["sequential_reference_images_per_s"])
    if "nxn" in by_name and "conv1x1_lu" in by_name and config.paired_rounds:
        log(f"sampling: nxn and conv1x1_lu timed in alternation ({config.paired_rounds} rounds) ...")
        result["sampling_ratio"] = bench_sampling_ratio("nxn", "conv1x1_lu", preset, device, config.switches,
                                                        rounds=config.paired_rounds, seed=config.seed)
        log(f"sampling: nxn / conv1x1_lu = {result['sampling_ratio']['ratio']['median']:.2f}")
    if config.layers and flows_available():
        result["layers"] = bench_layers(preset.layer_shapes, device, inner=preset.layer_inner,
                                        repeats=preset.layer_repeats, layers=config.layer_names, log=log)
        result["claims"] = claims(result["layers"])
    elif config.layers:
        log("flowlab.flows cannot be imported: layer micro-benchmarks skipped")
        result["layers_skipped"] = "flowlab.flows cannot be imported"
    result["goals"] = _goals(result, preset, device)
    result["complete"] = True
    return result
