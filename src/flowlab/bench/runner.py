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
from .model_bench import bench_model, log
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
    by_name = {m["model"]: m for m in result["models"]}
    ratio = result["ratio"]["value"]
    if ratio is not None and preset.name == "cpu":
        goals.append({"goal": f"CPU preset: flowlab {RATIO_MODEL} / reference training images/s", "value": ratio,
                      "target": f"≥ {CPU_RATIO_TARGET:g}", "met": ratio >= CPU_RATIO_TARGET})
    if RATIO_MODEL in by_name and preset.name == "gpu" and device.type == "cuda":
        v = by_name[RATIO_MODEL]["train_images_per_s"]["median"]
        goals.append({"goal": f"GPU preset: flowlab {RATIO_MODEL} training images/s ({result['env'].get('gpu')})",
                      "value": v, "target": f"≥ {GPU_IMAGES_PER_S_TARGET:,.0f} on an H200",
                      "met": v >= GPU_IMAGES_PER_S_TARGET})
    if "nxn" in by_name and "conv1x1_lu" in by_name:
        v = by_name["nxn"]["sample_images_per_s"]["median"] / by_name["conv1x1_lu"]["sample_images_per_s"]["median"]
        goals.append({"goal": "sampling speed, nxn / conv1x1_lu", "value": v, "target": f"≥ {SAMPLING_TARGET:g}",
                      "met": v >= SAMPLING_TARGET})
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
    for name in config.models:
        switches = ref_switches if name == REFERENCE else config.switches
        log(f"model {name} ({switches.label()}) ...")
        r = bench_model(name, preset, device, switches, lr=config.lr, lr_warmup=config.lr_warmup, seed=config.seed,
                        peak_flops=config.peak_flops if report_mfu else None, count_flops=config.count_flops)
        log(f"model {name}: train {r['train_images_per_s']['median']:.1f} img/s, "
            f"eval {r['eval_images_per_s']['median']:.1f} img/s, sample {r['sample_images_per_s']['median']:.1f} img/s")
        result["models"].append(r)
        gc.collect()
        if on_progress:
            on_progress({**result, "complete": False})

    by_name = {m["model"]: m for m in result["models"]}
    num, den = by_name.get(RATIO_MODEL), by_name.get(REFERENCE)
    result["ratio"] = {
        "numerator": RATIO_MODEL, "denominator": REFERENCE,
        "numerator_images_per_s": num["train_images_per_s"]["median"] if num else None,
        "reference_images_per_s": den["train_images_per_s"]["median"] if den else None,
        "value": (num["train_images_per_s"]["median"] / den["train_images_per_s"]["median"]) if num and den else None,
    }
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
