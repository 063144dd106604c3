"""``flowlab-sample``: sample grids at a list of temperatures and reconstructions beside their inputs.

    flowlab-sample ckpt_path=outputs/runs/<run_name> 'sample.temperatures=[0,0.7,1]' sample.n_samples=36

Writes ``samples_T<t>.png`` per temperature (``samples_T<t>_class<c>.png`` per class of ``sample.classes`` for
a class-conditional model) and ``reconstructions.png`` (test images, each followed by decode(encode(x)), as the
paper's Figure 1). The model comes from the checkpoint alone; the data (read for reconstructions only) from the config.
"""

from __future__ import annotations

import json
from collections import namedtuple

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate

from flowlab.cli._hydra import run_hydra
from flowlab.errors import ConfigError, check_int

#: everything flowlab-sample runs with, built once by :func:`prepare`; ``classes`` is None for a model that is
#: not class-conditional, ``datamodule`` None when no reconstructions are drawn (then no data is read)
SampleRun = namedtuple("SampleRun", "module ckpt path temperatures n_samples nrow seed classes datamodule "
                                    "n_reconstructions device")


def prepare(cfg: DictConfig) -> SampleRun:
    """Check the settings, load the checkpoint and (for reconstructions) read the data; writes nothing."""
    from flowlab.cli import _build as build
    from flowlab.lit.callbacks import check_temperatures

    s = cfg.sample
    temperatures = check_temperatures(build.container(s.temperatures), "sample.temperatures")
    n_samples = check_int("sample.n_samples", s.n_samples, 1)
    nrow = check_int("sample.nrow", s.get("nrow"), 1, allow_none=True)
    seed = check_int("sample.seed", s.seed)
    n_rec = check_int("sample.reconstructions", s.reconstructions, 0)
    datamodule = build.instantiate(cfg.data, "data") if n_rec > 0 else None  # config values before the checkpoint
    module, ckpt, path = build.checkpoint_module(cfg, datamodule, ema_key="sample.use_ema")
    classes = _classes(build.container(s.get("classes")), module.flow)
    if datamodule is not None:  # read the data before drawing anything
        build.prepare_data(datamodule, ("test",))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    return SampleRun(module, ckpt, path, temperatures, n_samples, nrow, seed, classes, datamodule, n_rec, device)


def _classes(classes, flow) -> list[int] | None:
    """``sample.classes`` checked against the model: None for a model that is not class-conditional."""
    n = getattr(flow, "n_classes", None) if getattr(flow, "y_condition", False) else None
    if n is None and classes is not None:
        raise ConfigError(f"sample.classes={classes!r} is not allowed: the checkpoint's model is not "
                          "class-conditional (model.y_condition=false); leave sample.classes=null")
    if n is None or classes is None:
        return None if n is None else list(range(n))
    if not isinstance(classes, list) or not classes or any(isinstance(c, bool) or not isinstance(c, int)
                                                           or not 0 <= c < n for c in classes):
        raise ConfigError(f"sample.classes={classes!r} is not allowed: give a list of classes of the model, "
                          f"integers from 0 to {n - 1}, e.g. 'sample.classes=[0,1,2]'")
    return classes


def sample(cfg: DictConfig) -> list[str]:
    from flowlab.cli import _build as build
    from flowlab.cli._hydra import prepared
    from flowlab.lit.images import image_grid, pair_grid, reconstruct, sample_images, save_grid, temperature_tag

    run = prepared(cfg, prepare)
    module = run.module.to(run.device).eval()
    flow = module.eval_flow
    out_dir = build.output_dir("samples.json")

    written = []
    for t in run.temperatures:
        for c in run.classes or [None]:  # a grid per class of a class-conditional model, from the same latents
            x = sample_images(flow, run.n_samples, t, seed=run.seed, y=c)
            name = f"samples_{temperature_tag(t)}" + ("" if c is None else f"_class{c}")
            written.append(str(save_grid(image_grid(x, module.n_bits, nrow=run.nrow), out_dir / f"{name}.png")))
    rec_err = None
    if run.datamodule is not None:
        ds = run.datamodule.test_dataset
        x, _, index = default_collate([ds[i] for i in range(min(run.n_reconstructions, len(ds)))])
        x = module.dequantize_eval(x.to(run.device), index)
        rec, rec_err = reconstruct(flow, x)
        written.append(str(save_grid(pair_grid(x, rec, module.n_bits), out_dir / "reconstructions.png")))

    record = {"checkpoint": str(run.path), "global_step": int(run.ckpt.get("global_step", -1)),
              "temperatures": run.temperatures, "classes": run.classes, "n_samples": run.n_samples, "seed": run.seed,
              "files": written, "reconstruction_max_abs_error": rec_err}
    (out_dir / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in written:
        print(f"wrote {f}", flush=True)
    if rec_err is not None:
        print(f"reconstruction max |x - decode(encode(x))| = {rec_err:.3g}", flush=True)
    print(f"run directory: {out_dir}", flush=True)
    return written


def main() -> None:
    run_hydra(sample, "sample")


if __name__ == "__main__":
    main()
