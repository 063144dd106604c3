"""``flowlab-ood``: bits/dim as an out-of-distribution score (Nalisnick et al. 2019, "Do deep generative models
know what they don't know?") and the typicality test (Nalisnick et al. 2019b).

    flowlab-ood ckpt_path=outputs/runs/<run_name> data=fashion_mnist 'ood.datasets=[mnist,noise,invert]'

Scores every test image of the in-distribution set (``data=``, with the training's settings, as for flowlab-eval)
and of each set of ``ood.datasets`` with the exact per-image bits/dim of evaluation (``FlowModule.dequantize_eval``:
noise keyed by (eval seed, image index), EMA weights as stored); the in-distribution mean is flowlab-eval's
test/bpd. An entry of ``ood.datasets`` is a ``data=`` option, read with its own config (n_bits set to the model's,
batch size and workers the in-distribution's), or a set derived from the in-distribution test images: ``noise`` (uniform pixels),
``constant`` (one random value per image and channel), ``vflip`` (upside down), ``invert`` (colour-inverted).
A set whose images are not of the model's shape is refused unless ``ood.resize=true`` (then converted to the
model's channels, grey = ITU-R 601 luma, and resized bilinearly).

Writes into ``${paths.output_dir}/ood/${run_name}``: ``bpd_<set>.csv`` (index, bits/dim per image),
``histogram.png`` (overlaid histograms, as Nalisnick et al.'s Figure 1) and ``ood.json``: per (in-distribution,
other) pair the AUROC and AUPR of bits/dim as the score (the other set positive), and the typicality test:
the entropy estimate Ĥ is the mean bits/dim of the in-distribution validation images, ε the ``alpha`` quantile
of |mean of a batch − Ĥ| over ``bootstrap`` batches of M drawn with replacement from them, and a batch of M
test images is flagged OOD when |its mean − Ĥ| > ε (bits/dim is the NLL scaled by 1/(D ln 2) plus a constant,
so the test is the same as in NLL). The same goes to the loggers (W&B: a table, the histogram image and one
histogram per set). A class-conditional model is scored by its marginal p(x) over the classes.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowlab.cli._hydra import run_hydra
from flowlab.errors import ConfigError, check_bool, check_int, check_number

__all__ = ["main", "prepare", "ood", "OODRun", "auroc_aupr", "typicality_test", "bits_per_dim", "score", "DERIVED"]

DERIVED = ("noise", "constant", "vflip", "invert")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


@dataclass
class ScoredSet:
    """A set to score: its test loader and the map from a loaded uint8 batch (and its index) to model input."""

    name: str
    loader: Any
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class OODRun:
    """Everything ``flowlab-ood`` runs with, built once by :func:`prepare`."""

    module: Any
    ckpt: dict
    path: Path
    in_name: str
    sets: list[ScoredSet]  # the in-distribution test set first
    reference: ScoredSet | None  # in-distribution validation images for the typicality test
    logger_cfg: DictConfig  # the config with W&B's job_type set
    held: list
    o: dict  # the checked ood settings
    device: torch.device
    data_lines: list[str]


# ---- the numbers ---------------------------------------------------------------------------------------
def auroc_aupr(in_bpd: torch.Tensor, out_bpd: torch.Tensor) -> tuple[float, float]:
    """AUROC and AUPR (average precision) of bits/dim as the score of being out-of-distribution (``out`` positive)."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    scores = torch.cat([in_bpd, out_bpd]).double()
    # torchmetrics squashes scores outside [0, 1] with a sigmoid, which ties large bits/dim; dense ranks in [0, 1]
    # keep the order and the ties exactly, so both areas are those of the raw scores
    ranks = torch.unique(scores, return_inverse=True)[1].double()
    ranks = ranks / max(float(ranks.max()), 1.0)
    target = torch.cat([torch.zeros(len(in_bpd)), torch.ones(len(out_bpd))]).long()
    return round(float(binary_auroc(ranks, target)), 6), round(float(binary_average_precision(ranks, target)), 6)


def typicality_test(reference: torch.Tensor, sets: dict[str, torch.Tensor], m: int, bootstrap: int, alpha: float,
                    seed: int) -> dict:
    """Nalisnick et al. 2019b: Ĥ = mean of ``reference``, ε = ``alpha`` quantile of |mean of M − Ĥ| over ``bootstrap``
    batches of M reference values drawn with replacement; each set is cut into batches of M (a seeded shuffle,
    the remainder dropped), and a batch is flagged OOD when |its mean − Ĥ| > ε."""
    gen = torch.Generator().manual_seed(seed)
    reference = reference.double()
    entropy = reference.mean()
    draws = reference[torch.randint(len(reference), (bootstrap, m), generator=gen)].mean(1)
    epsilon = torch.quantile((draws - entropy).abs(), alpha)
    out = {"M": m, "bootstrap": bootstrap, "alpha": alpha, "entropy_bpd": float(entropy), "epsilon_bpd": float(epsilon),
           "sets": {}}
    for name, bpd in sets.items():
        n = len(bpd) // m
        means = bpd.double()[torch.randperm(len(bpd), generator=gen)[:n * m]].view(n, m).mean(1)
        flagged = int(((means - entropy).abs() > epsilon).sum())
        out["sets"][name] = {"batches": n, "flagged_ood": flagged, "rate": flagged / n if n else None}
    return out


# ---- the sets --------------------------------------------------------------------------------------------
def _unchanged(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x


def _derived(name: str, n_bits: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from flowlab.lit.noise import eval_uniform

    top = 2**n_bits - 1
    if name == "vflip":
        return lambda x, i: x.flip(-2)
    if name == "invert":
        return lambda x, i: top - x
    if name == "noise":  # a fixed function of (seed, image index), whatever the batching
        return lambda x, i: (eval_uniform(i, x.shape, seed, draw=1, dtype=torch.float64) * (top + 1)).to(torch.uint8)
    return lambda x, i: (eval_uniform(i, (*x.shape[:2], 1, 1), seed, draw=2, dtype=torch.float64)
                         * (top + 1)).to(torch.uint8).expand_as(x).contiguous()  # constant


def _reshaper(channels: int, size: int, want_c: int, want_s: int, top: int):
    """uint8 ``[B, channels, size, size]`` -> ``[B, want_c, want_s, want_s]``: grey <-> RGB, bilinear resize."""
    def reshape(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if channels == 3 and want_c == 1:
            x = torch.einsum("bchw,c->bhw", x, torch.tensor(_LUMA, device=x.device)).unsqueeze(1)
        elif channels == 1 and want_c == 3:
            x = x.expand(-1, 3, -1, -1)
        if size != want_s:
            x = torch.nn.functional.interpolate(x, size=(want_s, want_s), mode="bilinear", antialias=True)
        return x.round().clamp(0, top).to(torch.uint8)
    return reshape


def _other_datamodule(cfg: DictConfig, name: str, n_bits: int):
    """The DataModule of ``conf/data/<name>.yaml``, with the in-distribution data's paths and the model's n_bits."""
    from flowlab.cli import _build as build
    from flowlab.cli._config import config_dir

    folder = config_dir() / "data"
    if not (folder / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"ood.datasets: {name!r} is neither a data= option ({', '.join(options)}) nor a derived set "
                          f"({', '.join(DERIVED)})")
    node = OmegaConf.create({"paths": {"data_dir": cfg.paths.data_dir}, "data": OmegaConf.load(folder / f"{name}.yaml")})
    for key in ("n_bits", "batch_size", "num_workers"):
        if key in node.data:
            node.data[key] = n_bits if key == "n_bits" else cfg.data.get(key, node.data[key])
    return build.instantiate(OmegaConf.to_container(node, resolve=True)["data"], f"ood.datasets[{name}]")


def _check_settings(cfg: DictConfig) -> dict:
    from flowlab.cli._build import container

    o, t = cfg.ood, cfg.ood.typicality
    names = o.datasets
    if not OmegaConf.is_list(names) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise ConfigError(f"ood.datasets={container(names)!r} is not allowed: give a list of distinct set names, "
                          f"data= options or {', '.join(DERIVED)}, e.g. 'ood.datasets=[mnist,noise]'")
    m = check_int("ood.typicality.batch_size", t.batch_size, 1, allow_none=True)
    return {"datasets": list(names), "resize": check_bool("ood.resize", o.resize),
            "max_images": check_int("ood.max_images", o.max_images, 1, allow_none=True),
            "seed": check_int("ood.seed", o.seed, 0), "bins": check_int("ood.bins", o.bins, 1), "M": m,
            "bootstrap": check_int("ood.typicality.bootstrap", t.bootstrap, 1),
            "alpha": check_number("ood.typicality.alpha", t.alpha, 0, 1, low_open=True, high_open=True)}


def prepare(cfg: DictConfig) -> OODRun:
    """Check the settings, load the checkpoint and read every set, writing nothing (called by the Hydra callback
    before the output directory exists)."""
    from flowlab.cli import _build as build
    from flowlab.lit.checkpoint import module_from_checkpoint

    o = _check_settings(cfg)
    eval_seed = check_int("eval.seed", cfg.eval.get("seed"), allow_none=True)
    use_ema = None if cfg.eval.get("use_ema") is None else check_bool("eval.use_ema", cfg.eval.use_ema)
    datamodule = build.instantiate_datamodule(cfg)
    in_name = datamodule.name or type(datamodule).__name__
    if in_name in o["datasets"]:
        raise ConfigError(f"ood.datasets: {in_name} is the in-distribution set (data={in_name}); leave it out")
    module, ckpt, path = module_from_checkpoint(cfg.ckpt_path)
    hp = ckpt["hyper_parameters"]["model"]
    build.check_data_fits_model(datamodule, hp, f"checkpoint {path}")
    size = hp["image_size"]
    want_c, want_s, n_bits = int(hp["in_channels"]), int(size if isinstance(size, int) else size[0]), module.n_bits
    others = {n: _other_datamodule(cfg, n, n_bits) for n in o["datasets"] if n not in DERIVED}
    for n, dm in others.items():
        if (dm.channels, dm.image_size) != (want_c, want_s) and not (o["resize"] and {dm.channels, want_c} <= {1, 3}):
            how = "set ood.resize=true to convert and resize them, or leave" if {dm.channels, want_c} <= {1, 3} else "leave"
            raise ConfigError(f"ood.datasets: {n} has {dm.channels}x{dm.image_size}x{dm.image_size} images but the model "
                              f"of checkpoint {path} takes {want_c}x{want_s}x{want_s}; {how} {n} out")
    if eval_seed is not None:
        module.hparams.eval_seed = eval_seed
    if use_ema is not None:
        module.use_ema = use_ema
    if o["M"] is not None and not datamodule.val_size:
        raise ConfigError(f"ood.typicality.batch_size={o['M']} needs in-distribution validation images (the entropy "
                          f"estimate and ε) but data.val_size={datamodule.val_size}; set data.val_size or "
                          "ood.typicality.batch_size=null")
    trained = ckpt["hyper_parameters"].get("data") or {}
    if o["M"] is not None and trained.get("_target_") == cfg.data.get("_target_") \
            and (trained.get("val_size"), trained.get("seed")) != (datamodule.val_size, datamodule.seed):
        raise ConfigError(f"ood.typicality needs validation images the model did not train on, but data.val_size="
                          f"{datamodule.val_size} data.seed={datamodule.seed} differ from the training's data.val_size="
                          f"{trained.get('val_size')} data.seed={trained.get('seed')}; pass the training's data settings "
                          "(the same experiment=) or ood.typicality.batch_size=null")
    logger_cfg = copy.deepcopy(cfg)
    if OmegaConf.select(logger_cfg, "logger.wandb") is not None:
        logger_cfg.logger.wandb.job_type = "ood"
    with build.held_back() as held:
        build.instantiate_loggers(logger_cfg)  # checked now, made in the output directory once it exists
    lines = [build.prepare_data(datamodule, ("fit", "test") if o["M"] is not None else ("test",))]
    lines += [build.prepare_data(dm, ("test",)) for dm in others.values()]
    test = datamodule.test_dataloader()
    sets = [ScoredSet(in_name, test, _unchanged)]
    for n in o["datasets"]:
        if n in DERIVED:
            sets.append(ScoredSet(n, test, _derived(n, n_bits, o["seed"])))
        else:
            dm = others[n]
            fits = (dm.channels, dm.image_size) == (want_c, want_s)
            sets.append(ScoredSet(n, dm.test_dataloader(), _unchanged if fits else
                                  _reshaper(dm.channels, dm.image_size, want_c, want_s, 2**n_bits - 1)))
    reference = None
    if o["M"] is not None:
        reference = ScoredSet(f"{in_name}_val", datamodule.val_dataloader(), _unchanged)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    return OODRun(module, ckpt, path, in_name, sets, reference, logger_cfg, held, o, device, lines)


# ---- the command ---------------------------------------------------------------------------------------------
def bits_per_dim(flow, x: torch.Tensor) -> torch.Tensor:
    """Bits/dim [B]; for a class-conditional flow that of the marginal p(x) = mean over the classes of p(x|y) (a
    uniform class prior: the labels of other sets mean nothing)."""
    if not getattr(flow, "y_condition", False):
        return flow.bits_per_dim(x)
    log_p = torch.stack([flow.log_prob(x, k) for k in range(flow.n_classes)]).logsumexp(0) - math.log(flow.n_classes)
    return (-log_p / x[0].numel() + flow.n_bits * math.log(2)) / math.log(2)


@torch.inference_mode()
def score(module, scored: ScoredSet, device: torch.device, limit: int | None, out_dir: Path) -> torch.Tensor:
    """Bits/dim of the first ``limit`` images (all when None) of a set, as evaluation computes them; written with
    their indices to ``out_dir/bpd_<set>.csv``."""
    flow, indices, values, seen = module.eval_flow, [], [], 0
    for x, _, index in scored.loader:
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            x, index = x[:limit - seen], index[:limit - seen]
        x, index = x.to(device), torch.as_tensor(index).to(device)
        values.append(bits_per_dim(flow, module.dequantize_eval(scored.transform(x, index), index)).float().cpu())
        indices.append(index.cpu())
        seen += len(index)
    with open(out_dir / f"bpd_{scored.name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([("index", "bpd"), *zip(torch.cat(indices).tolist(),
                                                        (f"{v:.6f}" for v in torch.cat(values).tolist()))])
    return torch.cat(values)


def _histogram(bpd: dict[str, torch.Tensor], bins: int, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.cat(list(bpd.values()))
    edges = torch.linspace(float(values.min()), float(values.max()), bins + 1).numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in bpd.items():
        ax.hist(v.numpy(), bins=edges, density=True, alpha=0.45, histtype="stepfilled", label=f"{name} ({len(v)})")
    ax.set_xlabel("bits/dim")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log(loggers: list, record: dict, bpd: dict[str, torch.Tensor], histogram: Path) -> str | None:
    """The pairs as metrics to every logger; to W&B also a table, the histogram image and a histogram per set."""
    hint = None
    metrics = {f"ood/{p['out']}/{k}": p[k] for p in record["pairs"] for k in ("auroc", "aupr")}
    for lg in loggers:
        lg.log_metrics(metrics, step=0)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            columns = ["in", "out", "images", "mean_bpd", "auroc", "aupr", "typicality_rate"]
            typ = (record.get("typicality") or {}).get("sets", {})
            rows = [[p["in"], p["out"], record["images"][p["out"]], record["mean_bpd"][p["out"]], p["auroc"], p["aupr"],
                     (typ.get(p["out"]) or {}).get("rate")] for p in record["pairs"]]
            lg.log_table("ood/pairs", columns=columns, data=rows, step=0)
            run = lg.experiment
            run.log({"ood/histogram": wandb.Image(str(histogram)),
                     **{f"ood/bpd/{n}": wandb.Histogram(v.numpy()) for n, v in bpd.items()}})
            if getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "mode", "") == "offline":
                hint = f"W&B offline run: upload it with `wandb sync {Path(run.dir).parent}`"
            run.finish()
        else:
            lg.finalize("success")
    return hint


def ood(cfg: DictConfig) -> str:
    from flowlab.cli import _build as build
    from flowlab.cli._hydra import prepared

    run = prepared(cfg, prepare)
    build.show_held(run.held)
    module, o = run.module.to(run.device).eval(), run.o
    out_dir = build.output_dir("ood.json")
    bpd = {s.name: score(module, s, run.device, o["max_images"], out_dir) for s in run.sets}
    in_bpd = bpd[run.in_name]
    pairs = [{"in": run.in_name, "out": n, **dict(zip(("auroc", "aupr"), auroc_aupr(in_bpd, v)))}
             for n, v in bpd.items() if n != run.in_name]
    record = {"checkpoint": str(run.path), "global_step": int(run.ckpt.get("global_step", -1)),
              "in_distribution": run.in_name, "eval_seed": int(module.hparams.eval_seed),
              "use_ema": bool(module.use_ema and module.ema is not None), "data": run.data_lines,
              "resize": o["resize"], "images": {n: len(v) for n, v in bpd.items()},
              "mean_bpd": {n: float(v.double().mean()) for n, v in bpd.items()},
              "score": ("bits/dim of the marginal over the classes (uniform prior)" if getattr(module.flow, "y_condition", False)
                        else "bits/dim") + ", the other set positive", "pairs": pairs, "typicality": None}
    if run.reference is not None:
        ref = score(module, run.reference, run.device, o["max_images"], out_dir)
        record["typicality"] = {"reference": f"{run.reference.name} ({len(ref)} images)",
                                **typicality_test(ref, bpd, o["M"], o["bootstrap"], o["alpha"], o["seed"])}
    title = f"{Path(run.path).parent.parent.name}: {Path(run.path).name} (step {record['global_step']})"
    histogram = _histogram(bpd, o["bins"], title, out_dir / "histogram.png")
    (out_dir / "ood.json").write_text(json.dumps(record, indent=2) + "\n")
    run.logger_cfg.paths.run_dir = str(out_dir)
    hint = _log(build.instantiate_loggers(run.logger_cfg), record, bpd, histogram)
    typ = (record["typicality"] or {}).get("sets", {})
    print(f"{'set':<16} {'images':>7} {'mean bpd':>9} {'AUROC':>7} {'AUPR':>7} {'typicality OOD rate':>20}", flush=True)
    for n, v in bpd.items():
        p = next((p for p in pairs if p["out"] == n), None)
        areas = f"{p['auroc']:>7.4f} {p['aupr']:>7.4f}" if p else f"{'-':>7} {'-':>7}"
        rate = (typ.get(n) or {}).get("rate")
        print(f"{n:<16} {len(v):>7} {record['mean_bpd'][n]:>9.4f} {areas} {'-' if rate is None else f'{rate:.3f}':>20}",
              flush=True)
    if hint:
        print(hint, flush=True)
    print(f"run directory: {out_dir}", flush=True)
    summary = "auroc: " + " ".join(f"{p['out']}={p['auroc']:.4f}" for p in pairs)
    print(summary, flush=True)
    return summary


def main() -> None:
    run_hydra(ood, "ood")


if __name__ == "__main__":
    main()
