"""``flowlab-eval``: the test (or validation) bits/dim of a checkpoint; ends with ``test/bpd=<value>``.

The model is rebuilt from the checkpoint alone (loaded with ``torch.load(weights_only=True)``).
The data comes from the config (``data=``/``experiment=``) and must match the model's channels,
size and ``n_bits``. Dequantisation noise is keyed by (eval seed, image index, draw), so with the
checkpoint's eval seed and ``eval.draws=1`` the value equals what ``flowlab-train`` printed.

``eval.draws=N`` evaluates every image under N independent noise draws and reports the mean of
bits/dim over all draws, i.e. the average over draws of the per-draw dataset means. Each draw
gives an unbiased estimate of the same dequantised bound −E_u[log p(x + u)] / (D ln 2) + n_bits,
so more draws only reduce the noise of the estimate; per-draw values go to ``results.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flowlab.cli._hydra import run_hydra
from flowlab.errors import check_bool, check_choice, check_int

__all__ = ["main", "prepare", "evaluate", "EvalRun"]


@dataclass
class EvalRun:
    """Everything ``flowlab-eval`` runs with, built once by :func:`prepare`."""

    module: Any
    ckpt: dict
    path: Path
    datamodule: Any
    trainer: Any
    held: list
    draws: int
    split: str
    data_line: str


def prepare(cfg: DictConfig) -> EvalRun:
    """Check the settings, build the data, load the checkpoint and read the data, writing nothing (called by
    the Hydra callback before the output directory exists)."""
    import pytorch_lightning as pl

    from flowlab.cli import _build as build
    from flowlab.lit.checkpoint import module_from_checkpoint

    draws = check_int("eval.draws", cfg.eval.draws, 1)
    split = check_choice("eval.split", cfg.eval.get("split", "test"), ("test", "val"))
    pl.seed_everything(check_int("seed", cfg.seed, 0, 2**32 - 1), workers=True, verbose=False)
    eval_seed = check_int("eval.seed", cfg.eval.get("seed"), allow_none=True)
    use_ema = None if cfg.eval.get("use_ema") is None else check_bool("eval.use_ema", cfg.eval.use_ema)
    datamodule = build.instantiate_datamodule(cfg)  # every config value is named before the checkpoint is read
    with build.held_back() as held:  # Lightning's messages wait until the command is accepted
        trainer = build.instantiate_trainer(cfg, [], [], enable_checkpointing=False, enable_progress_bar=False,
                                            enable_model_summary=False, max_steps=-1, fast_dev_run=False)
    module, ckpt, path = module_from_checkpoint(cfg.ckpt_path)
    if eval_seed is not None:
        module.hparams.eval_seed = eval_seed
    if use_ema is not None:
        module.use_ema = use_ema
    build.check_data_fits_model(datamodule, ckpt["hyper_parameters"]["model"], f"checkpoint {path}")
    data_line = build.prepare_data(datamodule, ("test",) if split == "test" else ("fit",))  # prints "data: ..."
    if split == "val":  # evaluate the validation set through the test loop
        datamodule.test_dataset = datamodule.val_dataset
    return EvalRun(module, ckpt, path, datamodule, trainer, held, draws, split, data_line)


def evaluate(cfg: DictConfig) -> float:
    from flowlab.cli import _build as build
    from flowlab.cli._hydra import prepared

    run = prepared(cfg, prepare)
    module, trainer = run.module, run.trainer
    build.show_held(run.held)
    per_draw = []
    for draw in range(run.draws):  # one pass per draw: per-draw means, combined into the mean over all draws
        module.eval_draws = 1
        module.eval_draw_offset = draw
        results = trainer.test(module, datamodule=run.datamodule, verbose=False)
        per_draw.append(float(results[0][f"test/{module.bpd_name}"]) if results else math.nan)
    bpd = sum(per_draw) / len(per_draw)

    if trainer.is_global_zero:
        out_dir = build.output_dir("results.json")
        key = f"{run.split}/{module.bpd_name}"  # */bpd_cond for a class-conditional model: -log2 p(x|y)/D
        record = {key: bpd, "draws": run.draws, "per_draw": per_draw, "checkpoint": str(run.path),
                  "eval_seed": int(module.hparams.eval_seed), "use_ema": module.use_ema and module.ema is not None,
                  "global_step": int(run.ckpt.get("global_step", -1)), "data": run.data_line}
        (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"checkpoint: {run.path} (step {record['global_step']}), {run.split} set, {run.draws} draw(s)",
              flush=True)
        print(f"run directory: {out_dir}", flush=True)
        print(f"{key}={bpd:.6f}", flush=True)
    return bpd


def main() -> None:
    run_hydra(evaluate, "eval")


if __name__ == "__main__":
    main()
