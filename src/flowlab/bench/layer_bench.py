"""Per-layer micro-benchmarks of the channel-mixing layers against a standard 3x3 convolution.

Layers (flowlab.flows): ``nxn`` = InvertibleNxNConv(C, kernel_size=3, lu=True), ``conv1x1`` =
InvertibleConv1x1(C, lu=False), ``conv1x1_lu`` = InvertibleConv1x1(C, lu=True), ``emerging`` =
EmergingConv(C, kernel_size=3), and ``conv3x3`` = ``nn.Conv2d(C, C, 3, padding=1)``, a standard,
non-invertible convolution (no inverse, no tractable log-det).

For each shape ``[B, C, H, W]`` we time, in float32, eager, eval mode, without gradients:
``forward`` (the layer's forward, which returns the output and its log-det), ``inverse``
(``layer.inverse(y)``; flowlab caches inverse weight matrices in eval mode, so this is the
steady-state inference cost), and ``logdet`` (the data-independent log-det on its own, through the
layers' ``logdet(H, W)``). We also record ``max |inverse(forward(x)) - x|``.

These numbers test two claims of the paper: the n x n convolution has fewer parameters and takes
less inference time than a standard convolution, and its inverse is faster than Emerging's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .models import _flows
from .timing import ms_stats, time_per_call

LAYERS = ("nxn", "conv1x1", "conv1x1_lu", "emerging", "conv3x3")


def build_layer(name: str, channels: int) -> nn.Module:
    if name == "conv3x3":
        return nn.Conv2d(channels, channels, 3, padding=1)
    flows = _flows()
    if name == "nxn":
        return flows.InvertibleNxNConv(channels, kernel_size=3, lu=True)
    if name == "conv1x1":
        return flows.InvertibleConv1x1(channels, lu=False)
    if name == "conv1x1_lu":
        return flows.InvertibleConv1x1(channels, lu=True)
    if name == "emerging":
        return flows.EmergingConv(channels, kernel_size=3)
    raise ValueError(f"unknown layer {name!r}")


def logdet_callable(layer: nn.Module, height: int, width: int) -> Callable[[], torch.Tensor] | None:
    """The layer's data-independent log-det on its own, or ``None`` where there is none."""
    if callable(getattr(layer, "logdet", None)):
        return lambda: layer.logdet(height, width)
    parts = [m for m in layer.children() if callable(getattr(m, "logdet", None))]
    if parts:
        return lambda: sum(m.logdet(height, width) for m in parts)
    return None


def bench_layer(name: str, shape: tuple[int, int, int, int], device: torch.device, *, inner: int, repeats: int,
                seed: int = 0) -> dict:
    b, c, h, w = shape
    torch.manual_seed(seed)
    layer = build_layer(name, c).to(device).eval()
    with torch.no_grad():  # move away from the identity-like initialisation so nothing is trivially cheap
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(b, c, h, w, device=device) - 0.5
    out = {"layer": name, "shape": list(shape), "params": sum(p.numel() for p in layer.parameters())}
    invertible = hasattr(layer, "inverse")
    with torch.no_grad():
        out["forward_ms"] = ms_stats(time_per_call(lambda: layer(x), device, warmup=1, repeats=repeats, inner=inner)).to_dict()
        if invertible:
            y, _ = layer(x)
            out["inverse_ms"] = ms_stats(time_per_call(lambda: layer.inverse(y), device, warmup=1, repeats=repeats,
                                                       inner=inner)).to_dict()
            out["inverse_error"] = float((layer.inverse(y) - x).abs().max().item())
        ld = logdet_callable(layer, h, w) if invertible else None
        if ld is not None:
            out["logdet_ms"] = ms_stats(time_per_call(ld, device, warmup=1, repeats=repeats, inner=inner)).to_dict()
    return out


def bench_layers(shapes, device: torch.device, *, inner: int, repeats: int, layers=LAYERS, log=None) -> list[dict]:
    results = []
    for shape in shapes:
        for name in layers:
            r = bench_layer(name, tuple(shape), device, inner=inner, repeats=repeats)
            if log:
                log(f"layer {name:10s} {list(shape)}: forward {r['forward_ms']['median']:.3f} ms"
                    + (f", inverse {r['inverse_ms']['median']:.3f} ms" if "inverse_ms" in r else ""))
            results.append(r)
    return results


def claims(layer_results: list[dict]) -> list[dict]:
    """The paper's per-layer claims, checked shape by shape against the measured numbers."""
    out = []
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in layer_results:
        by_shape.setdefault(tuple(r["shape"]), {})[r["layer"]] = r
    for shape, rs in by_shape.items():
        nxn, conv, emerging = rs.get("nxn"), rs.get("conv3x3"), rs.get("emerging")
        if nxn and conv:
            out.append({"shape": list(shape), "claim": "n x n conv has fewer parameters than a standard 3x3 conv",
                        "nxn": nxn["params"], "other": conv["params"], "holds": nxn["params"] < conv["params"]})
            a, o = nxn["forward_ms"]["median"], conv["forward_ms"]["median"]
            out.append({"shape": list(shape), "claim": "n x n conv forward is faster than a standard 3x3 conv",
                        "nxn": a, "other": o, "holds": a < o})
        if nxn and emerging:
            a, o = nxn["inverse_ms"]["median"], emerging["inverse_ms"]["median"]
            out.append({"shape": list(shape), "claim": "n x n conv inverse is faster than Emerging's inverse",
                        "nxn": a, "other": o, "holds": a < o})
    return out
