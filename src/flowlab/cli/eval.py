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

from omegaconf import DictConfig

from flowlab.cli._hydra import run_hydra

__all__ = ["main", "evaluate"]


def evaluate(cfg: DictConfig) -> float:
    import pytorch_lightning as pl

    from flowlab.cli import _build as build
    from flowlab.cli.validate import validate_eval_config
    from flowlab.lit.checkpoint import module_from_checkpoint

    validate_eval_config(cfg)
    out_dir = build.run_dir()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module, ckpt, path = module_from_checkpoint(cfg.ckpt_path)
    if cfg.eval.get("seed") is not None:
        module.hparams.eval_seed = int(cfg.eval.seed)
    if cfg.eval.get("use_ema") is not None:
        module.use_ema = bool(cfg.eval.use_ema)
    draws = int(cfg.eval.draws)
    split = str(cfg.eval.get("split", "test"))

    datamodule = build.instantiate_datamodule(cfg)
    build.check_data_fits_model(datamodule, ckpt["hyper_parameters"]["model"], f"checkpoint {path}")
    data_line = build.prepare_data(datamodule, ("test",) if split == "test" else ("fit",))  # prints "data: ..."
    if split == "val":  # evaluate the validation set through the test loop
        datamodule.test_dataset = datamodule.val_dataset

    trainer = build.instantiate_trainer(cfg, [], [], enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, max_steps=-1, fast_dev_run=False)
    per_draw = []
    for draw in range(draws):  # one pass per draw: per-draw means, combined into the mean over all draws
        module.eval_draws = 1
        module.eval_draw_offset = draw
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        per_draw.append(float(results[0]["test/bpd"]) if results else math.nan)
    bpd = sum(per_draw) / len(per_draw)

    if trainer.is_global_zero:
        out_dir = build.claim_output_dir(out_dir, ("results.json",))  # never overwrite an earlier evaluation
        record = {f"{split}/bpd": bpd, "draws": draws, "per_draw": per_draw, "checkpoint": str(path),
                  "eval_seed": int(module.hparams.eval_seed), "use_ema": module.use_ema and module.ema is not None,
                  "global_step": int(ckpt.get("global_step", -1)), "data": data_line}
        (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"checkpoint: {path} (step {record['global_step']}), {split} set, {draws} draw(s)", flush=True)
        print(f"run directory: {out_dir}", flush=True)
        print(f"{split}/bpd={bpd:.6f}", flush=True)
    return bpd


def main() -> None:
    run_hydra(evaluate, "eval")


if __name__ == "__main__":
    main()
