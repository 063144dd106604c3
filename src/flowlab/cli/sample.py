"""``flowlab-sample``: sample grids at a list of temperatures and reconstructions beside their inputs.

    flowlab-sample ckpt_path=outputs/runs/<run_name> 'sample.temperatures=[0,0.7,1]' sample.n_samples=36

Writes ``samples_T<t>.png`` for each temperature (``sample.n_samples`` images, ``sample.nrow`` per
row) and ``reconstructions.png`` (``sample.reconstructions`` test images, each followed by
decode(encode(x)), as the paper's Figure 1) into the run directory
``${paths.output_dir}/samples/${run_name}``. The model comes from the checkpoint alone; the data
(only read for reconstructions) from the config.
"""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

from flowlab.cli._hydra import run_hydra

__all__ = ["main", "sample"]


def sample(cfg: DictConfig) -> list[str]:
    from flowlab.cli import _build as build
    from flowlab.cli.validate import validate_sample_config
    from flowlab.lit.callbacks import check_temperatures
    from flowlab.lit.checkpoint import module_from_checkpoint
    from flowlab.lit.images import image_grid, pair_grid, reconstruct, sample_images, save_grid, temperature_tag

    validate_sample_config(cfg)
    out_dir = build.run_dir()
    s = cfg.sample
    temperatures = check_temperatures(list(s.temperatures), "sample.temperatures")
    n_rec = int(s.get("reconstructions", 0))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")

    module, ckpt, path = module_from_checkpoint(cfg.ckpt_path)
    if s.get("use_ema") is not None:
        module.use_ema = bool(s.use_ema)
    datamodule = None
    if n_rec > 0:  # read (and check) the data before drawing anything
        datamodule = build.instantiate_datamodule(cfg)
        build.check_data_fits_model(datamodule, ckpt["hyper_parameters"]["model"], f"checkpoint {path}")
        build.prepare_data(datamodule, ("test",))
    module.to(device).eval()
    flow = module.eval_flow
    out_dir = build.claim_output_dir(out_dir, ("samples.json",))  # checks passed: never overwrite earlier samples

    written = []
    for t in temperatures:
        x = sample_images(flow, int(s.n_samples), t, seed=int(s.seed))
        written.append(str(save_grid(image_grid(x, module.n_bits, nrow=s.get("nrow")),
                                     out_dir / f"samples_{temperature_tag(t)}.png")))
    rec_err = None
    if datamodule is not None:
        ds = datamodule.test_dataset
        n = min(n_rec, len(ds))
        items = [ds[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
        index = torch.tensor([int(it[2]) for it in items], device=device)
        x = module.dequantize_eval(x, index)
        rec, rec_err = reconstruct(flow, x)
        written.append(str(save_grid(pair_grid(x, rec, module.n_bits), out_dir / "reconstructions.png")))

    record = {"checkpoint": str(path), "global_step": int(ckpt.get("global_step", -1)), "temperatures": temperatures,
              "n_samples": int(s.n_samples), "seed": int(s.seed), "files": written,
              "reconstruction_max_abs_error": rec_err}
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
