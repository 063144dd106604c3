"""A run's record: its environment, markdown for people, JSON for scripts. Files get new, timestamped names
(never over an earlier result) and are replaced atomically as the run progresses."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

from flowlab.errors import UserError


def environment(device: torch.device, argv: list[str]) -> dict:
    git = ["git", "-C", str(Path(__file__).resolve().parents[3]), "describe", "--always", "--dirty", "--abbrev=12"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() if shutil.which("git") else ""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    return {"time_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"), "command": shlex.join(argv),
            "flowlab_commit": os.environ.get("FLOWLAB_COMMIT") or commit or None, "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_1m": os.getloadavg()[0]}


def table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def _n(v, digits: int = 1) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"


def _q(q: dict, unit: str = "") -> str:  # median [interquartile range]
    d = 3 if unit else 1
    return f"{_n(q['median'], d)}{unit} [{_n(q['q1'], d)}–{_n(q['q3'], d)}]"


def _cfg(v) -> str:  # {"_target_": "torch.optim.Adam", "lr": 0.001} -> Adam(lr=0.001)
    if isinstance(v, dict):
        args = ", ".join(f"{k}={_cfg(x)}" for k, x in v.items() if not k.startswith("_"))
        return f"{v['_target_'].rsplit('.', 1)[-1]}({args})" if "_target_" in v else "{" + args + "}"
    return str(v)


def markdown(r: dict) -> str:
    env, p, hw = r["env"], r["preset"], r["env"]["gpu"] or f"{r['env']['cpu']} ({r['env']['threads']} threads)"
    about = [f"- {hw}; torch {env['torch']}; python {env['python']}; flowlab {env['flowlab_commit']}; {env['time_utc']} UTC",
             f"- command: `{env['command']}`",
             f"- Glow {p['image_size']}×{p['image_size']}×3, K={p['K']}, L={p['L']}, width {p['hidden_channels']}, "
             f"batch {p['batch']}, image-like synthetic batches; flowlab trains through FlowModule with "
             f"conf/train.yaml's optim{' and --plain' if r['plain'] else ''}: {_cfg(r['optim'])[1:-1]}",
             f"- timing: torch.utils.benchmark's Timer.timeit, {p['repeats']} blocks of {p['calls']} calls "
             f"({p['layer_calls']} for layers) after 2 untimed ones; median [IQR] over blocks"]
    if env["load_1m"] and env["load_1m"] > 0.5 * (env["cpu_count"] or 1):
        about.append(f"- **busy machine (load {env['load_1m']:.2f} on {env['cpu_count']} CPUs): "
                     "not comparable with a quiet run**")
    if not r["complete"]:
        about.append("- **incomplete: the run was cut short; what finished is below**")
    out = [f"## flowlab bench: preset `{p['name']}` on {env['device']}", "\n".join(about)]
    if r["models"]:
        out += [table(["model", "params", "coupling dtype", "train img/s", "eval img/s", "sample img/s", "peak MiB",
                       "max recon err", "GFLOP/img/step", "TFLOP/s", "MFU"], [
            [m["model"] + " (plain)" * m["plain"], f"{m['params'] / 1e6:.2f} M", m["dtype"],
             _q(m["train_images_per_s"]), _n(m["eval_images_per_s"]["median"]),
             _n(m["sample_images_per_s"]["median"]), _n(m["peak_mib"]),
             f"{m['max_reconstruction_error']:.1e}", f"{m['flops_per_image'] / 1e9:.3g}", f"{m['achieved_tflops']:.3g}",
             "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"] for m in r["models"]]),
                f"Peak memory: {r['models'][0]['memory_kind']} while training. MFU: over the peak that Lightning's "
                "get_available_flops gives for the device and dtype (n/a where it has none)."]
    for key, what in (("ratio", "Training"), ("sampling", "Sampling")):
        if x := r.get(key):
            out.append(f"**{what} speed, `{x['a']}` / `{x['b']}`: {x['ratio']['median']:.2f}×** (median of "
                       f"{x['rounds']} alternating rounds, IQR {x['ratio']['q1']:.2f}–{x['ratio']['q3']:.2f}; "
                       f"{_n(x['a_images_per_s']['median'])} vs {_n(x['b_images_per_s']['median'])} images/s)")
    if r.get("goals"):
        out += ["### Goals", table(["goal", "measured", "target", "met"], [
            [g["goal"], _n(g["value"], 2 if abs(g["value"]) >= 0.1 else 4), g["target"], "yes" if g["met"] else "NO"]
            for g in r["goals"]])]
    if r.get("layers"):
        out += ["### Layers (float32, eval, no grad; ms per call, median [IQR])", table(
            ["shape", "layer", "params", "forward", "inverse", "max inverse error"],
            [["×".join(map(str, x["shape"])), x["layer"], f"{x['params']:,}", _q(x["forward_ms"], " ms"),
              *((_q(x["inverse_ms"], " ms"), f"{x['inverse_error']:.1e}") if "inverse_ms" in x else ("n/a", "n/a"))]
             for x in r["layers"]["rows"]]),
            "### The paper's layer claims, measured", table(["shape", "claim", "n×n", "other", "holds"], [
                ["×".join(map(str, c["shape"])), c["claim"],
                 *(f"{v:,}" if isinstance(v, int) else f"{v:.3f} ms" for v in (c["nxn"], c["other"])),
                 "yes" if c["holds"] else "no"] for c in r["layers"]["claims"]])]
    if r.get("memory"):
        out += ["### Training memory by model.memory_saving (nxn; activation = kept for backward)",
                memory_markdown(r["memory"])]
    if c := r.get("check"):
        out += [f"### bits/dim: training defaults vs strict float32 ({c['model']}, batch {c['batch']}, {c['images']} "
                "synthetic images; same initial weights and batches)", table(
                    ["step", "defaults", "float32", "difference"],
                    [[x["step"], f"{x['defaults']:.4f}", f"{x['float32']:.4f}", f"{x['difference']:+.4f}"]
                     for x in c["points"]]),
                f"Training time: defaults {c['seconds']['defaults']:.1f} s, float32 {c['seconds']['float32']:.1f} s. "
                f"**Check {'PASSED' if c['passed'] else 'FAILED'}** (|difference| ≤ {c['tolerance']:g} after all "
                f"{c['steps']} steps)."]
    return "\n\n".join(out) + "\n"


def memory_markdown(rows: list[dict]) -> str:
    cuda = "cuda_peak_mib" in rows[0]
    return table(["K", "memory_saving", "activation MiB", "× none", "peak MiB", "step s", "× none"] + ["CUDA peak MiB"] * cuda,
                 [[r["K"], r["memory_saving"], f"{r['activation_mib']:.1f}", f"{r['activation_vs_none']:.3f}",
                   f"{r['peak_mib']:.1f}", f"{r['step_s']:.3f}", f"{r['time_vs_none']:.2f}"]
                  + ([f"{r['cuda_peak_mib']:.0f}"] if cuda else []) for r in rows])


def output_paths(out_dir: str, stem: str) -> tuple[Path, Path]:
    """``(json, md)`` in ``out_dir`` named ``stem``, or ``stem-2``, ... if taken."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create the folder ({e}); pick a writable folder") from None
    for name in (stem if n == 1 else f"{stem}-{n}" for n in itertools.count(1)):
        if not any((Path(out_dir) / f"{name}{ext}").exists() for ext in (".json", ".md")):
            return Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"


def write(result: dict, paths: tuple[Path, Path]) -> None:
    strict = json.loads(json.dumps(result), parse_constant=lambda _: None)  # strict JSON: NaN, Infinity -> null
    for path, text in zip(paths, (json.dumps(strict, indent=1, allow_nan=False) + "\n", markdown(result))):
        path.with_name(path.name + ".tmp").write_text(text)
        os.replace(path.with_name(path.name + ".tmp"), path)
