"""``flowlab-eval``: the test (or validation) bits/dim of a checkpoint; ends with ``test/bpd=<value>``.

The model comes from the checkpoint alone (weights only), the data from the config. Noise is keyed by (eval seed,
image index, draw): with the checkpoint's eval seed and ``eval.draws=1`` the value equals flowlab-train's;
``eval.draws=N`` reports the mean of the N per-draw means (each unbiased for the same bound; all in results.json).
"""

from __future__ import annotations

import json
import math
from collections import namedtuple

from omegaconf import DictConfig

from flowlab.cli._hydra import run_hydra
from flowlab.errors import check_choice, check_int

#: everything flowlab-eval runs with, built once by :func:`prepare`
EvalRun = namedtuple("EvalRun", "module ckpt path datamodule trainer held draws split data_line")


def prepare(cfg: DictConfig) -> EvalRun:
    """Check the settings, build the data, load the checkpoint and read the data, writing nothing (called by
    the Hydra callback before the output directory exists)."""
    import pytorch_lightning as pl

    from flowlab.cli import _build as build

    draws = check_int("eval.draws", cfg.eval.draws, 1)
    split = check_choice("eval.split", cfg.eval.split, ("test", "val"))
    pl.seed_everything(check_int("seed", cfg.seed, 0, 2**32 - 1), workers=True, verbose=False)
    datamodule = build.instantiate(cfg.data, "data")  # every config value is named before the checkpoint is read
    with build.held_back() as held:  # Lightning's messages wait until the command is accepted
        trainer = build.instantiate_trainer(cfg, [], [], enable_checkpointing=False, enable_progress_bar=False,
                                            enable_model_summary=False, max_steps=-1, fast_dev_run=False)
    module, ckpt, path = build.checkpoint_module(cfg, datamodule)
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
