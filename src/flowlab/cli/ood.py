"""``flowlab-ood``: bits/dim as an out-of-distribution score (Nalisnick et al. 2019) and the typicality test
(Nalisnick et al. 2019b), e.g. ``flowlab-ood ckpt_path=outputs/runs/<run> data=fashion_mnist 'ood.datasets=[mnist,noise]'``.

Each test image of the in-distribution set (``data=``) and of every set of ``ood.datasets`` (a ``data=`` option at
the model's n_bits, or one of ``DERIVED``) gets evaluation's exact per-image bits/dim, so the in-distribution mean
is flowlab-eval's test/bpd. Writes ``bpd_<set>.csv``, ``histogram.png`` and ``ood.json``: per set the AUROC and AUPR
(the set positive) and the typicality test: Ĥ the mean bits/dim of the validation images, ε the ``alpha`` quantile
of |batch mean − Ĥ| over ``bootstrap`` batches of M drawn from them; a test batch of M is OOD when |mean − Ĥ| > ε.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections import namedtuple
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flowlab.cli._hydra import run_hydra
from flowlab.errors import ConfigError, check_bool, check_int, check_number

#: sets derived from the in-distribution test images: uniform noise, one random value per image and channel,
#: upside down, colour-inverted
DERIVED = ("noise", "constant", "vflip", "invert")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")

#: a set to score: its test loader and the map (uint8 batch, index) -> model input, None for the batch itself
ScoredSet = namedtuple("ScoredSet", "name loader transform")
#: everything flowlab-ood runs with, built once by :func:`prepare`; ``sets[0]`` is the in-distribution test set
OODRun = namedtuple("OODRun", "module ckpt path sets reference logger_cfg held o data_lines")


# ---- the numbers ---------------------------------------------------------------------------------------
def auroc_aupr(in_bpd: torch.Tensor, out_bpd: torch.Tensor) -> tuple[float, float]:
    """AUROC and AUPR (average precision) of bits/dim as the score of being out-of-distribution (``out`` positive)."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    # torchmetrics squashes scores outside [0, 1] with a sigmoid, which ties large bits/dim; dense ranks in [0, 1]
    # keep the order and the ties exactly
    ranks = torch.unique(torch.cat([in_bpd, out_bpd]).double(), return_inverse=True)[1].double()
    ranks = ranks / max(float(ranks.max()), 1.0)
    target = torch.cat([torch.zeros(len(in_bpd)), torch.ones(len(out_bpd))]).long()
    return round(float(binary_auroc(ranks, target)), 6), round(float(binary_average_precision(ranks, target)), 6)


def typicality_test(reference: torch.Tensor, sets: dict[str, torch.Tensor], m: int, bootstrap: int, alpha: float,
                    seed: int) -> dict:
    """Nalisnick et al. 2019b, as in the module docstring; each set is cut into batches of M (a seeded shuffle, the
    remainder dropped)."""
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
def _derived(name: str, n_bits: int, seed: int):
    """The map of a derived set; noise and constant are functions of (seed, image index), whatever the batching."""
    from flowlab.data.transforms import eval_uniform

    top = 2**n_bits - 1
    if name == "vflip":
        return lambda x, i: x.flip(-2)
    if name == "invert":
        return lambda x, i: top - x
    if name == "noise":
        return lambda x, i: (eval_uniform(i, x.shape, seed, draw=1, dtype=torch.float64) * (top + 1)).to(torch.uint8)
    return lambda x, i: (eval_uniform(i, (*x.shape[:2], 1, 1), seed, draw=2, dtype=torch.float64)
                         * (top + 1)).to(torch.uint8).expand_as(x).contiguous()  # constant


def _reshaper(channels: int, size: int, want_c: int, want_s: int, top: int):
    """uint8 ``[B, channels, size, size]`` -> ``[B, want_c, want_s, want_s]``: grey <-> RGB, bilinear resize; None
    where the shapes agree."""
    if (channels, size) == (want_c, want_s):
        return None

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
    """The DataModule of ``conf/data/<name>.yaml`` with the in-distribution data's paths, batch size and workers,
    at the model's n_bits."""
    from flowlab.cli import _build as build
    from flowlab.cli._config import config_dir

    folder = config_dir() / "data"
    if not (folder / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"ood.datasets: {name!r} is neither a data= option ({', '.join(options)}) nor a derived set "
                          f"({', '.join(DERIVED)})")
    node = OmegaConf.create({"paths": {"data_dir": cfg.paths.data_dir}, "data": OmegaConf.load(folder / f"{name}.yaml")})
    node.data.n_bits = n_bits
    node.data.batch_size, node.data.num_workers = cfg.data.batch_size, cfg.data.num_workers
    return build.instantiate(OmegaConf.to_container(node, resolve=True)["data"], f"ood.datasets[{name}]")


def prepare(cfg: DictConfig) -> OODRun:
    """Check the settings, load the checkpoint and read every set, writing nothing (called by the Hydra callback
    before the output directory exists)."""
    from flowlab.cli import _build as build

    c, t = cfg.ood, cfg.ood.typicality
    names = c.datasets
    if not OmegaConf.is_list(names) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise ConfigError(f"ood.datasets={build.container(names)!r} is not allowed: give a list of distinct set "
                          f"names, data= options or {', '.join(DERIVED)}, e.g. 'ood.datasets=[mnist,noise]'")
    o = {"datasets": list(names), "resize": check_bool("ood.resize", c.resize),
         "max_images": check_int("ood.max_images", c.max_images, 1, allow_none=True),
         "seed": check_int("ood.seed", c.seed, 0), "bins": check_int("ood.bins", c.bins, 1),
         "M": check_int("ood.typicality.batch_size", t.batch_size, 1, allow_none=True),
         "bootstrap": check_int("ood.typicality.bootstrap", t.bootstrap, 1),
         "alpha": check_number("ood.typicality.alpha", t.alpha, 0, 1, low_open=True, high_open=True)}
    datamodule = build.instantiate(cfg.data, "data")
    if datamodule.name in o["datasets"]:
        raise ConfigError(f"ood.datasets: {datamodule.name} is the in-distribution set (data={datamodule.name}); "
                          "leave it out")
    module, ckpt, path = build.checkpoint_module(cfg, datamodule)
    hp = ckpt["hyper_parameters"]["model"]
    want_c, want_s, n_bits = int(hp["in_channels"]), datamodule.image_size, module.n_bits
    others = {n: _other_datamodule(cfg, n, n_bits) for n in o["datasets"] if n not in DERIVED}
    for n, dm in others.items():
        convertible = {dm.channels, want_c} <= {1, 3}
        if (dm.channels, dm.image_size) != (want_c, want_s) and not (o["resize"] and convertible):
            how = "set ood.resize=true to convert and resize them, or leave" if convertible else "leave"
            raise ConfigError(f"ood.datasets: {n} has {dm.channels}x{dm.image_size}x{dm.image_size} images but the "
                              f"model of checkpoint {path} takes {want_c}x{want_s}x{want_s}; {how} {n} out")
    trained = ckpt["hyper_parameters"].get("data") or {}
    if o["M"] is not None and not datamodule.val_size:
        raise ConfigError(f"ood.typicality.batch_size={o['M']} needs in-distribution validation images (the entropy "
                          f"estimate and ε) but data.val_size={datamodule.val_size}; set data.val_size or "
                          "ood.typicality.batch_size=null")
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
    sets = [ScoredSet(datamodule.name, test, None)]
    for n in o["datasets"]:
        if n in DERIVED:
            sets.append(ScoredSet(n, test, _derived(n, n_bits, o["seed"])))
        else:
            dm = others[n]
            sets.append(ScoredSet(n, dm.test_dataloader(), _reshaper(dm.channels, dm.image_size, want_c, want_s,
                                                                     2**n_bits - 1)))
    reference = None if o["M"] is None else ScoredSet(f"{datamodule.name}_val", datamodule.val_dataloader(), None)
    return OODRun(module, ckpt, path, sets, reference, logger_cfg, held, o, lines)


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
    indices, values, seen = [], [], 0
    for x, _, index in scored.loader:
        keep = len(index) if limit is None else limit - seen
        if keep <= 0:
            break
        x, index = x[:keep].to(device), torch.as_tensor(index[:keep]).to(device)
        x = x if scored.transform is None else scored.transform(x, index)
        values.append(bits_per_dim(module.eval_flow, module.dequantize_eval(x, index)).float().cpu())
        indices.append(index.cpu())
        seen += len(index)
    indices, values = torch.cat(indices), torch.cat(values)
    with open(out_dir / f"bpd_{scored.name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([("index", "bpd"), *zip(indices.tolist(), (f"{v:.6f}" for v in values.tolist()))])
    return values


def _histogram(bpd: dict[str, torch.Tensor], bins: int, title: str, path: Path) -> Path:
    """Overlaid histograms of the sets (as Nalisnick et al.'s Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.cat(list(bpd.values()))
    edges = torch.linspace(float(values.min()), float(values.max()), bins + 1).numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in bpd.items():
        ax.hist(v.numpy(), bins=edges, density=True, alpha=0.45, histtype="stepfilled", label=f"{name} ({len(v)})")
    ax.set(xlabel="bits/dim", ylabel="density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log(loggers: list, pairs: list[dict], rows: list[list], bpd: dict[str, torch.Tensor], histogram: Path) -> str | None:
    """The pairs' AUROC/AUPR as metrics to every logger; to W&B also the table (a row per other set), the histogram
    image and a histogram per set."""
    hint = None
    for lg in loggers:
        lg.log_metrics({f"ood/{p['out']}/{k}": p[k] for p in pairs for k in ("auroc", "aupr")}, step=0)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.log_table("ood/pairs", columns=["in", "out", "images", "mean_bpd", "auroc", "aupr", "typicality_rate"],
                         data=rows[1:], step=0)
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
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    module, o, in_name = run.module.to(device).eval(), run.o, run.sets[0].name
    out_dir = build.output_dir("ood.json")
    bpd = {s.name: score(module, s, device, o["max_images"], out_dir) for s in run.sets}
    pairs = [{"in": in_name, "out": n, **dict(zip(("auroc", "aupr"), auroc_aupr(bpd[in_name], v)))}
             for n, v in bpd.items() if n != in_name]
    conditional = getattr(module.flow, "y_condition", False)
    record = {"checkpoint": str(run.path), "global_step": int(run.ckpt.get("global_step", -1)),
              "in_distribution": in_name, "eval_seed": int(module.hparams.eval_seed),
              "use_ema": bool(module.use_ema and module.ema is not None), "data": run.data_lines,
              "resize": o["resize"], "images": {n: len(v) for n, v in bpd.items()},
              "mean_bpd": {n: float(v.double().mean()) for n, v in bpd.items()},
              "score": ("bits/dim of the marginal over the classes (uniform prior)" if conditional else "bits/dim")
              + ", the other set positive", "pairs": pairs, "typicality": None}
    if run.reference is not None:
        ref = score(module, run.reference, device, o["max_images"], out_dir)
        record["typicality"] = {"reference": f"{run.reference.name} ({len(ref)} images)",
                                **typicality_test(ref, bpd, o["M"], o["bootstrap"], o["alpha"], o["seed"])}
    title = f"{Path(run.path).parent.parent.name}: {Path(run.path).name} (step {record['global_step']})"
    histogram = _histogram(bpd, o["bins"], title, out_dir / "histogram.png")
    (out_dir / "ood.json").write_text(json.dumps(record, indent=2) + "\n")
    # one row per set, the in-distribution one first: in, out, images, mean bpd, AUROC, AUPR, typicality OOD rate
    typical = (record["typicality"] or {}).get("sets", {})
    areas = {p["out"]: (p["auroc"], p["aupr"]) for p in pairs}
    rows = [[in_name, n, len(v), record["mean_bpd"][n], *areas.get(n, (None, None)), (typical.get(n) or {}).get("rate")]
            for n, v in bpd.items()]
    run.logger_cfg.paths.run_dir = str(out_dir)
    hint = _log(build.instantiate_loggers(run.logger_cfg), pairs, rows, bpd, histogram)
    print(f"{'set':<16} {'images':>7} {'mean bpd':>9} {'AUROC':>7} {'AUPR':>7} {'typicality OOD rate':>20}", flush=True)
    for _, n, images, mean, *rest in rows:  # AUROC, AUPR, typicality OOD rate: "-" where there is none
        auroc, aupr, rate = ("-" if v is None else format(v, spec) for v, spec in zip(rest, (".4f", ".4f", ".3f")))
        print(f"{n:<16} {images:>7} {mean:>9.4f} {auroc:>7} {aupr:>7} {rate:>20}", flush=True)
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
