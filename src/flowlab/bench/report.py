"""The benchmark's outputs: a markdown table for people and a JSON file for scripts.

Files are written under a new, timestamped name (never over an earlier result), via a temporary
file and an atomic rename.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from flowlab.errors import UserError

from .env import hardware_line


def _num(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a" if v is None else str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _rate(stats: dict | None) -> tuple[str, str]:
    if not stats:
        return "n/a", ""
    return _num(stats["median"]), f"{_num(stats['q1'])}–{_num(stats['q3'])}"


def _ms(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"{stats['median']:.3f} [{stats['q1']:.3f}–{stats['q3']:.3f}]"


def _sci(v) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def markdown(result: dict) -> str:
    env, p = result["env"], result["preset"]
    lines = [
        f"## flowlab bench: preset `{p['name']}` on {env['device']}",
        "",
        f"- hardware: {hardware_line(env)}",
        f"- command: `{env['command']}`  ({env['timestamp_utc']}, flowlab {env.get('flowlab_commit') or 'unknown commit'})",
        f"- model: {p['image_size']}×{p['image_size']}×{p['in_channels']}, K={p['K']}, L={p['L']}, "
        f"width {p['hidden_channels']}, affine coupling, batch {p['batch']}, Adam lr {result['lr']:g} "
        f"(linear warm-up over {result.get('lr_warmup', 0)} steps), image-like synthetic batches",
        f"- timing: training {p['warmup']} warm-up steps then {p['repeats']} × {p['steps']} steps; "
        f"evaluation/sampling {p['eval_repeats']} calls; median and interquartile range over repetitions",
        f"- switches: flowlab {result['switches']['flowlab']}; reference {result['switches']['reference']}",
    ]
    applied = sorted({m.get("amp_applied", "off") for m in result["models"]} - {"off"})
    if applied:
        lines.append(f"- reduced precision applied: {'; '.join(applied)}")
    if not result.get("complete", True):
        lines.append("- **incomplete: the run was cut short; the models below finished**")
    load = env.get("load_average_1m")
    if load is not None:
        line = f"- machine load (1-minute average) at start: {load:.2f} on {env['cpu_count']} CPUs"
        if load > 0.5 * (env["cpu_count"] or 1):
            line += " — **busy machine: these timings are not comparable with a quiet run**"
        lines.append(line)
    lines.append("")
    models = result["models"]
    if models:
        show_mfu = any("mfu" in m for m in models)
        head = ["model", "params", "train img/s", "(IQR)", "eval img/s", "sample img/s", "peak mem MiB",
                "max recon err (init / trained)", "GFLOP/img/step"] + (["MFU"] if show_mfu else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in models:
            train, iqr = _rate(m.get("train_images_per_s"))
            name = m["model"] if "variant" not in m else f"{m['model']} ({m['switches']})"
            row = [name, f"{m['params'] / 1e6:.2f} M", train, iqr, _rate(m.get("eval_images_per_s"))[0],
                   _rate(m.get("sample_images_per_s"))[0], _num(m["peak_memory"]["peak_mib"], 0),
                   f"{_sci(m.get('max_reconstruction_error_init'))} / {_sci(m.get('max_reconstruction_error'))}",
                   f"{m['flops_per_image'] / 1e9:.3g}" if "flops_per_image" in m else "n/a"]
            if show_mfu:
                row.append(f"{100 * m['mfu']:.2f}%" if "mfu" in m else "n/a")
            lines.append("| " + " | ".join(row) + " |")
        kind = models[0]["peak_memory"]["kind"]
        lines += ["", f"Peak memory: {kind} during training"
                  + (" (whole-process RSS, including ~{:.0f} MiB before the model was built)".format(
                      models[0]["peak_memory"]["baseline_mib"]) if kind.startswith("r") else "") + "."]
    ratio = result.get("ratio")
    if ratio and ratio.get("value") is not None:
        switches = f", {ratio['numerator_switches']}" if ratio.get("numerator_switches") else ""
        paired = ratio.get("paired")
        how = (f"median of {paired['rounds']} alternating rounds of {paired['steps_per_round']} steps, IQR "
               f"{paired['ratio']['q1']:.2f}–{paired['ratio']['q3']:.2f}; the rows above, timed one after the "
               f"other, give {ratio['sequential_value']:.2f}×" if paired else "the rows above, timed one after the other")
        lines += ["", f"**Training speed, flowlab `{ratio['numerator']}`{switches} / reference: {ratio['value']:.2f}×** "
                      f"({_num(ratio['numerator_images_per_s'])} vs {_num(ratio['reference_images_per_s'])} images/s; "
                      f"{how})"]
        if ratio.get("plain_value") is not None:
            lines.append(f"(flowlab `{ratio['numerator']}` in plain float32 eager / reference: {ratio['plain_value']:.2f}×, "
                         f"{_num(ratio['plain_images_per_s'])} images/s, sequential: what the model's own restructuring "
                         f"gives without reduced precision or layout changes)")
    sampling = result.get("sampling_ratio")
    if sampling:
        lines += ["", f"Sampling speed, `{sampling['numerator']}` / `{sampling['denominator']}`: "
                      f"{sampling['ratio']['median']:.2f}× (median of {sampling['rounds']} alternating rounds, IQR "
                      f"{sampling['ratio']['q1']:.2f}–{sampling['ratio']['q3']:.2f}; "
                      f"{_num(sampling['numerator_images_per_s']['median'])} vs "
                      f"{_num(sampling['denominator_images_per_s']['median'])} images/s)."]
    if result.get("goals"):
        lines += ["", "### Goals (issue 6)", "", "| goal | measured | target | met |", "|---|---|---|---|"]
        for g in result["goals"]:
            lines.append(f"| {g['goal']} | {_num(g['value'], 2)} | {g['target']} | {'yes' if g['met'] else 'NO'} |")
    if result.get("layers"):
        lines += ["", "### Layers (float32, eager, eval, no grad; ms per call, median [IQR])", "",
                  "| shape | layer | params | forward | inverse | log-det | max inverse error |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['layer']} | {r['params']:,} | {_ms(r['forward_ms'])} "
                         f"| {_ms(r.get('inverse_ms'))} | {_ms(r.get('logdet_ms'))} | {_sci(r.get('inverse_error'))} |")
    if result.get("claims"):
        lines += ["", "### The paper's layer claims, measured", "", "| shape | claim | n×n | other | holds |",
                  "|---|---|---|---|---|"]
        for c in result["claims"]:
            fmt = (lambda v: f"{v:,}") if isinstance(c["nxn"], int) else (lambda v: f"{v:.3f} ms")
            lines.append(f"| {'×'.join(map(str, c['shape']))} | {c['claim']} | {fmt(c['nxn'])} | {fmt(c['other'])} "
                         f"| {'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown_check(result: dict) -> str:
    env = result["env"]
    lines = [f"## flowlab bench: bits/dim check, preset `{result['preset']['name']}` on {env['device']}", "",
             f"- hardware: {hardware_line(env)}", f"- command: `{env['command']}`",
             f"- model {result['model']}, batch {result['batch']}, Adam lr {result['lr']:g} "
             f"(linear warm-up {result['warmup_steps']} steps), data {result['data']['kind']} "
             f"({result['data']['train_images']} train / {result['data']['eval_images']} held-out images)",
             f"- fast: {result['fast']['switches']} ({result['fast'].get('amp_applied', 'off')}); reference: {result['reference']['switches']} (TF32 off)",
             "", "| step | fast bits/dim | reference bits/dim | difference |", "|---|---|---|---|"]
    for pt in result["points"]:
        lines.append(f"| {pt['step']} | {pt['fast']:.4f} | {pt['reference']:.4f} | {pt['difference']:+.4f} |")
    speed = result.get("speedup_fast_over_reference")
    lines += ["", f"Steps done: {result['steps_done']} of {result['steps_requested']}"
              + ("" if result["complete"] else " (stopped early: time budget)")
              + (f"; training speed of the fast run: {speed:.2f}× the float32 run's" if speed else "") + ".",
              f"**Check {'PASSED' if result['passed'] else 'FAILED'}**: |difference| "
              f"{'≤' if result['passed'] else 'vs'} tolerance {result['tolerance']:g} bits/dim."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def output_paths(out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """``(json, md)`` paths in ``out_dir`` for ``stem`` that do not exist yet."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e}); pick a writable folder") from None
    n, candidate = 1, stem
    while (out / f"{candidate}.json").exists() or (out / f"{candidate}.md").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return out / f"{candidate}.json", out / f"{candidate}.md"


def strict_json(obj):
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write(result: dict, json_path: Path, md_path: Path, md_text: str) -> None:
    _atomic_write(json_path, json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
    _atomic_write(md_path, md_text)
