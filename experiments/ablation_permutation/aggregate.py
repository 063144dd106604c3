#!/usr/bin/env python
"""Aggregate a permutation-ablation sweep into a Table-2-style table and plots.

    python experiments/ablation_permutation/aggregate.py outputs/multirun/<run_name>
    python experiments/ablation_permutation/aggregate.py outputs/multirun/<run_name> --source wandb
    python experiments/ablation_permutation/aggregate.py --wandb-api --entity ME --project flowlab --group <run_name>

Reads every run of the sweep — from its local files (``metrics.csv``, ``results.json`` and
``.hydra/config.yaml`` in each job directory: ``--source csv``), from the W&B offline run in each
job directory (``--source wandb``), or from W&B's servers (``--wandb-api``) — and writes to
``--out`` (default: ``results/`` beside this script):

  runs.csv         one row per run: model, seed, test bits/dim, parameters, images/s, steps, source
  table.md         per model: test bits/dim mean ± std over seeds, number of seeds, the difference
                   from the reference row (Glow, plain 1×1 conv) and Welch's t-test p-value of it,
                   parameters, sampling and training images/s (medians over seeds)
  bpd_curves.png   validation (solid) and training (faint) bits/dim against steps, one colour per
                   model, mean over seeds
  final_bpd.png    bar chart of the test bits/dim, mean with ± one standard deviation over seeds

A run without a test bits/dim (unfinished or failed) is listed in runs.csv and left out of the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Rows in the order of the paper's Table 2 (its pair, then the fair LU pair), then the fixed permutations.
MODELS = {
    "realnvp": "RealNVP",
    "conv1x1": "Glow, 1×1 conv",
    "nxn": "n×n conv, plain 1×1 inside (paper)",
    "conv1x1_lu": "Glow, 1×1 conv (LU)",
    "nxn_lu": "n×n conv, LU 1×1 inside",
    "emerging": "Emerging conv",
    "reverse": "Glow, reverse",
    "shuffle": "Glow, shuffle",
}
#: the row every other is tested against
REFERENCE = "conv1x1"
#: training images/s, by the first of these a run logged: Lightning's ThroughputMonitor over all processes (DDP),
#: per process (one process: the same), and the name runs logged before flowlab used ThroughputMonitor
TRAIN_SPEED_KEYS = ("train/samples_per_sec", "train/device/samples_per_sec", "train/images_per_s")


class AggregateError(Exception):
    """Something the person running the script can fix; printed as one line."""


# ---- reading runs ---------------------------------------------------------------------------------
def model_key(config: dict) -> str:
    """``realnvp`` for RealNVP, else the Glow permutation name (from a run's config)."""
    model = config.get("model") or {}
    target = str(model.get("_target_", ""))
    if target.endswith("RealNVP"):
        return "realnvp"
    permutation = str(model.get("permutation", "?"))
    if permutation == "nxn" and model.get("nxn_conv1x1") == "lu":
        return "nxn_lu"
    return permutation


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _record(config: dict, rows: list[dict], scalars: dict, source: str, name: str) -> dict:
    """One run from its config, its logged rows (dicts with a step key) and its final scalars."""
    curves = {"train": [], "val": []}
    train_ips, sample_ips = [], []
    for r in rows:
        step = _num(r.get("step", r.get("trainer/global_step")))
        if step is None:
            continue
        for split in ("train", "val"):
            v = _num(r.get(f"{split}/bpd"))
            if v is not None:
                curves[split].append((int(step), v))
        speed = next((_num(r.get(k)) for k in TRAIN_SPEED_KEYS if _num(r.get(k)) is not None), None)
        if speed is not None:
            train_ips.append(speed)
        if _num(r.get("sample/images_per_s")) is not None:
            sample_ips.append(_num(r["sample/images_per_s"]))
        if scalars.get("test/bpd") is None and _num(r.get("test/bpd")) is not None:
            scalars["test/bpd"] = _num(r["test/bpd"])
    data = config.get("data") or {}
    trainer = config.get("trainer") or {}
    return {
        "name": name, "model": model_key(config), "seed": config.get("seed"),
        "dataset": str(data.get("_target_", "")).rsplit(".", 1)[-1].replace("DataModule", ""),
        "test_bpd": _num(scalars.get("test/bpd")), "params": scalars.get("params"),
        "train_images_per_s": statistics.median(train_ips) if train_ips else None,
        "sample_images_per_s": sample_ips[-1] if sample_ips else _num(scalars.get("sample/images_per_s")),
        "steps": max([s for s, _ in curves["train"] + curves["val"]], default=None) if scalars.get("global_step") is None
        else int(scalars["global_step"]),
        "max_steps": trainer.get("max_steps"), "batch_size": data.get("batch_size"),
        "curves": curves, "source": source,
    }


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def job_dirs(roots: list[Path]) -> list[Path]:
    """Job directories (holding ``.hydra/config.yaml``) under the given sweep or run directories."""
    out = []
    for root in roots:
        if not root.exists():
            raise AggregateError(f"{root} does not exist: give the sweep directory, e.g. outputs/multirun/<run_name>")
        out += sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml") if "previous" not in p.parts)
    if not out:
        raise AggregateError(f"no runs (folders with .hydra/config.yaml) under {', '.join(map(str, roots))}")
    return out


def read_csv_run(job: Path) -> dict:
    config = _load_yaml(job / ".hydra" / "config.yaml")
    rows = []
    if (job / "metrics.csv").is_file():
        with open(job / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    scalars = {}
    if (job / "results.json").is_file():
        scalars = json.loads((job / "results.json").read_text())
    return _record(config, rows, scalars, "csv", job.name)


def read_wandb_offline_run(job: Path) -> dict:
    from wandb_offline import find_runs, read_run

    runs = [read_run(p) for p in find_runs(job / "wandb")] if (job / "wandb").is_dir() else []
    if not runs:
        raise AggregateError(f"{job} holds no W&B offline run (wandb/offline-run-*): was it run with logger=wandb "
                             "and WANDB_MODE=offline? Use --source csv to read metrics.csv instead")
    # A resumed job has several W&B runs; the newest with a test bits/dim is the job's result.
    run = next((r for r in reversed(runs) if "test/bpd" in r["summary"]), runs[-1])
    config = run["config"].get("config") or run["config"]
    rows = [dict(r, step=r.get("trainer/global_step")) for r in run["history"]]
    return _record(config, rows, dict(run["summary"]), "wandb-offline", run["name"] or job.name)


def read_wandb_api(entity: str | None, project: str, group: str | None) -> list[dict]:
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group} if group else {}
    out = []
    for run in api.runs(path, filters=filters):
        config = dict(run.config).get("config") or dict(run.config)
        rows = [dict(r, step=r.get("trainer/global_step")) for r in run.scan_history()]
        out.append(_record(config, rows, dict(run.summary), "wandb-api", run.name))
    if not out:
        raise AggregateError(f"W&B has no runs in {path}" + (f" with group {group}" if group else ""))
    return out


def read_runs(roots: list[Path], source: str) -> list[dict]:
    runs = []
    for job in job_dirs(roots):
        if source == "wandb" or (source == "auto" and not (job / "metrics.csv").is_file()):
            runs.append(read_wandb_offline_run(job))
        else:
            runs.append(read_csv_run(job))
    return runs


# ---- summarising -----------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> list[dict]:
    by_model = defaultdict(list)
    for r in runs:
        if r["test_bpd"] is not None:
            by_model[r["model"]].append(r)
    order = [m for m in MODELS if m in by_model] + sorted(m for m in by_model if m not in MODELS)
    rows = []
    for m in order:
        rs = sorted(by_model[m], key=lambda r: (r["seed"] is None, r["seed"]))
        bpd = [r["test_bpd"] for r in rs]
        med = lambda k: statistics.median([r[k] for r in rs if r[k] is not None]) if any(r[k] is not None for r in rs) else None  # noqa: E731
        rows.append({"model": m, "label": MODELS.get(m, m), "mean": statistics.fmean(bpd),
                     "std": statistics.stdev(bpd) if len(bpd) > 1 else None, "n": len(bpd),
                     "seeds": [r["seed"] for r in rs], "params": med("params"),
                     "sample_images_per_s": med("sample_images_per_s"), "train_images_per_s": med("train_images_per_s"),
                     "bpd": bpd})
    reference = next((r for r in rows if r["model"] == REFERENCE), None)
    for r in rows:
        r["delta"], r["p_value"] = compare(r["bpd"], reference["bpd"]) if reference and r is not reference else (None, None)
    return rows


def compare(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """(mean difference, two-sided p-value of Welch's t-test) of a row against the reference row.

    Welch's test does not assume equal variances; with 3 seeds a row it detects only differences
    several standard deviations wide, and p-values of 8 rows are not corrected for multiple tests.
    """
    from scipy import stats

    delta = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) < 2 or len(reference) < 2:
        return delta, None
    p = float(stats.ttest_ind(values, reference, equal_var=False).pvalue)
    return delta, (p if math.isfinite(p) else None)


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table_markdown(rows: list[dict], runs: list[dict]) -> str:
    budget = sorted({(r["dataset"], r["max_steps"], r["batch_size"]) for r in runs if r["test_bpd"] is not None},
                    key=str)
    lines = []
    for dataset, steps, batch in budget:
        lines.append(f"Dataset {dataset or '?'}, {steps} steps at batch {batch} for every run.")
    ref = MODELS.get(REFERENCE, REFERENCE)
    lines += ["", f"| model | test bits/dim (mean ± std) | seeds | Δ vs {ref} | p (Welch) | parameters | "
              "sampling images/s | training images/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpd = f"{r['mean']:.4f} ± {r['std']:.4f}" if r["std"] is not None else f"{r['mean']:.4f}"
        delta = "(reference)" if r["model"] == REFERENCE else _fmt(r["delta"], "+.4f")
        lines.append(f"| {r['label']} | {bpd} | {r['n']} | {delta} | {_fmt(r['p_value'], '.3g')} | "
                     f"{_fmt(r['params'], ',.0f')} | {_fmt(r['sample_images_per_s'], ',.0f')} | "
                     f"{_fmt(r['train_images_per_s'], ',.0f')} |")
    missing = [r for r in runs if r["test_bpd"] is None]
    if missing:
        lines += ["", f"Left out (no test bits/dim, unfinished or failed): {', '.join(r['name'] for r in missing)}."]
    return "\n".join(lines) + "\n"


def write_runs_csv(runs: list[dict], path: Path) -> None:
    keys = ["name", "model", "seed", "dataset", "test_bpd", "params", "sample_images_per_s", "train_images_per_s",
            "steps", "max_steps", "batch_size", "source"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in sorted(runs, key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                             str(r["seed"]))):
            w.writerow(r)


def _mean_curve(runs: list[dict], split: str):
    by_step = defaultdict(list)
    for r in runs:
        for s, v in r["curves"][split]:
            by_step[s].append(v)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot(rows: list[dict], runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, row in enumerate(rows):
        rs = [r for r in runs if r["model"] == row["model"] and r["test_bpd"] is not None]
        steps, vals = _mean_curve(rs, "train")
        if steps:
            # smooth the noisy per-batch training values with a running mean over 5 logged points
            smooth = [statistics.fmean(vals[max(0, j - 4):j + 1]) for j in range(len(vals))]
            ax.plot(steps, smooth, color=colours(i), alpha=0.3, lw=1)
        steps, vals = _mean_curve(rs, "val")
        if steps:
            ax.plot(steps, vals, color=colours(i), marker="o", ms=3, lw=1.8, label=f"{row['label']} (n={row['n']})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("bits/dim")
    ax.set_title("validation (solid) and training (faint) bits/dim, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finals = [r["mean"] for r in rows]
    if finals:
        ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    fig.tight_layout()
    fig.savefig(out / "bpd_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = range(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] or 0.0 for r in rows], capsize=4,
           color=[colours(i) for i in x])
    for i, row in enumerate(rows):
        rs = [r["test_bpd"] for r in runs if r["model"] == row["model"] and r["test_bpd"] is not None]
        ax.plot([i] * len(rs), rs, "k.", ms=4)
    ax.set_xticks(list(x), [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test bits/dim (lower is better)")
    ax.set_title("test bits/dim: mean ± std over seeds (dots: single runs)")
    if rows:
        lo = min(r["mean"] - (r["std"] or 0) for r in rows)
        hi = max(r["mean"] + (r["std"] or 0) for r in rows)
        ax.set_ylim(lo - 0.5 * (hi - lo) - 0.05, hi + 0.25 * (hi - lo) + 0.05)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "final_bpd.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="*", type=Path, help="sweep (or run) directories, e.g. outputs/multirun/<run_name>")
    p.add_argument("--source", choices=("auto", "csv", "wandb"), default="auto",
                   help="local metrics.csv (csv), the W&B offline runs (wandb), or csv where present (auto)")
    p.add_argument("--wandb-api", action="store_true", help="read the runs from W&B's servers instead of files")
    p.add_argument("--entity", default=None)
    p.add_argument("--project", default="flowlab")
    p.add_argument("--group", default=None, help="the sweep's W&B group (its run_name)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.wandb_api:
            runs = read_wandb_api(a.entity, a.project, a.group)
        elif not a.sweeps:
            raise AggregateError("give a sweep directory (outputs/multirun/<run_name>) or --wandb-api")
        else:
            runs = read_runs(a.sweeps, a.source)
        rows = summarise(runs)
        if not rows:
            raise AggregateError(f"none of the {len(runs)} runs has a test bits/dim yet (unfinished or failed)")
    except AggregateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    write_runs_csv(runs, a.out / "runs.csv")
    table = table_markdown(rows, runs)
    (a.out / "table.md").write_text(table)
    if not a.no_plots:
        plot(rows, runs, a.out)
    print(table, end="")
    print(f"wrote {a.out}/table.md, runs.csv" + ("" if a.no_plots else ", bpd_curves.png, final_bpd.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
