"""``flowlab-train``: fit a flow, test the best checkpoint, print the run directory and ``test/bpd=<value>``.

    flowlab-train -m experiment=quickstart 'model/permutation=nxn,conv1x1' seed=0,1,2

The run directory receives checkpoints, images, ``metrics.csv``, the W&B run and ``results.json``; the same
``run_name`` again resumes the run and its W&B run exactly, from its newest valid checkpoint.
Checkpoints are written atomically; SIGTERM, SIGUSR1, Ctrl-C and SIGHUP save ``last.ckpt`` before the process
exits (status 128 + signal; :mod:`flowlab.lit.preemption`, and for DDP and SLURM :mod:`flowlab.cluster`). A
test bits/dim that is not finite ends the command with status 2.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from flowlab.cli import _build as build
from flowlab.cli._hydra import LOCK, prepared, run_hydra
from flowlab.cluster import check_strategy_for_multirun, cluster_plugins
from flowlab.errors import CheckpointError, UserError, check_int
from flowlab.lit.checkpoint import CHECKPOINT_DIRNAME, AtomicCheckpointIO, load_checkpoint, resume_candidates
from flowlab.lit.module import FlowModule


def _resume_checkpoint(cfg: DictConfig, out_dir: Path, model_hp: dict) -> tuple[Path | None, list[str]]:
    """``ckpt_path``, else this run's newest readable checkpoint (warnings for those passed over), refused unless it
    holds the same model; a directory that holds a run but no valid checkpoint is refused (nothing is overwritten)."""
    requested, notes, ckpt = cfg.get("ckpt_path"), [], None
    if requested is not None and str(requested) != "last":
        path = Path(str(requested)).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT_DIRNAME / "last.ckpt" if (path / CHECKPOINT_DIRNAME).is_dir() else path / "last.ckpt"
        ckpt = load_checkpoint(path, key="ckpt_path")
    else:
        for path in resume_candidates(out_dir):
            try:
                ckpt = load_checkpoint(path, key="checkpoint")
                break
            except CheckpointError as e:
                notes.append(f"warning: {e}; resuming from an older checkpoint instead")
    if ckpt is None:  # Hydra's record, a lock and logs are not yet a run
        if build.is_main_process() and any(p.name not in (LOCK, ".hydra") and p.suffix != ".log" for p in out_dir.glob("*")):
            raise UserError(f"run_name={cfg.run_name}: {out_dir} holds a run but no valid checkpoint to resume "
                            f"from{' (' + '; '.join(notes) + ')' if notes else ''}. Choose another run_name, or "
                            "give resume=false to start a new run beside it (nothing there is overwritten)")
        return None, []
    saved = ckpt["hyper_parameters"]["model"]
    free = {"memory_saving"}  # changes no weight; nor do two unconditional models' y_* settings (older runs lack them)
    free |= set() if saved.get("y_condition") or model_hp.get("y_condition") else {"y_condition", "n_classes", "y_weight"}
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {model_hp.get(k)!r} in the config"
            for k in sorted(set(saved) | set(model_hp)) if k not in free and saved.get(k) != model_hp.get(k)]
    if diff:
        raise CheckpointError(f"ckpt_path={path} belongs to another model configuration: " + "; ".join(diff)
                              + ". Use the same model settings, or a new run_name to start a new run")
    return path, notes


#: everything flowlab-train runs with, built once by :func:`prepare` (``held``: Lightning's messages meanwhile)
TrainRun = namedtuple("TrainRun", "datamodule module trainer held resume resume_notes data_line preemption")


def prepare(cfg: DictConfig) -> TrainRun:
    """Build the run, then read the checkpoint to resume from and the data, writing nothing (no run directory yet)."""
    from flowlab.lit.preemption import Preemption

    pl.seed_everything(check_int("seed", cfg.seed, 0, 2**32 - 1), workers=True, verbose=False)
    datamodule = build.instantiate(cfg.data, "data")
    model_hp = build.container(cfg.model)
    module = FlowModule(model=model_hp, optim=build.container(cfg.optim), eval_seed=cfg.eval.seed, seed=cfg.seed,
                        use_ema=cfg.eval.use_ema, data=build.container(cfg.data))
    build.check_data_fits_model(datamodule, model_hp, "this config")
    preemption = Preemption()  # a signal: save last.ckpt, then exit 128 + signal; RNG state in checkpoints
    callbacks = [*build.instantiate_callbacks(cfg), preemption]
    for cb in callbacks:  # a class-conditional model logs val/bpd_cond, never val/bpd
        if getattr(cb, "monitor", None) == "val/bpd":
            cb.monitor = f"val/{module.bpd_name}"
    loggers = build.instantiate_loggers(cfg)
    with build.held_back() as held:  # Lightning's messages (SLURM detection, devices) wait until the end
        check_strategy_for_multirun(build.container(cfg.trainer), build.is_multirun())
        plugins = [AtomicCheckpointIO(), *cluster_plugins(), *(build.container(cfg.trainer.get("plugins")) or [])]
        trainer = build.instantiate_trainer(cfg, callbacks, loggers, plugins=plugins)
    resume, notes = _resume_checkpoint(cfg, build.run_dir(), model_hp)
    data_line = build.prepare_data(datamodule, ("fit", "test"))  # prints "data: <which data>" once
    datamodule.train_dataloader()  # checks data.batch_size against the training images
    return TrainRun(datamodule, module, trainer, held, resume, notes, data_line, preemption)


def train(cfg: DictConfig) -> float:
    """Fit and test; returns the test bits/dim. The task function of the Hydra app."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    run = prepared(cfg, prepare)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    out_dir = build.run_dir()
    build.show_held(run.held)
    if trainer.is_global_zero:
        for note in run.resume_notes:
            print(note, file=sys.stderr, flush=True)
        if run.resume is not None:
            print(f"Resuming from {run.resume}", flush=True)
    params, id_file = module.num_params, out_dir / build.WANDB_ID_FILE
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero and not id_file.is_file():
            id_file.write_text(f"{logger.version}\n")  # the same command resumes this W&B run
        logger.log_hyperparams({"config": build.container(cfg), "params": params})

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the EMA copy is eval-only
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.resume) if run.resume else None,
                    weights_only=True)
        test_ckpt = _checkpoint_to_test(trainer)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True, verbose=False)
        key = f"test/{module.bpd_name}"  # test/bpd_cond for a class-conditional model: -log2 p(x|y)/D
        bpd = float(results[0][key]) if results else math.nan
        _finish_wandb(trainer, {key: bpd, "params": params})
    except BaseException as e:
        _finish_wandb(trainer, {}, exit_code=1)
        if isinstance(e, SIGTERMException):  # last.ckpt was saved (Preemption); a scheduler may requeue us
            raise SystemExit(128 + int(run.preemption.signal_received or signal.SIGTERM)) from None
        raise

    if trainer.is_global_zero:
        record = {key: bpd, "checkpoint": test_ckpt, "global_step": int(trainer.global_step),
                  "params": params, "run_dir": str(out_dir), "data": run.data_line}
        (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"run directory: {out_dir}", flush=True)
        print(f"{key}={bpd:.6f}", flush=True)
    if not math.isfinite(bpd):
        raise UserError(f"{key}={bpd} is not finite: the tested weights ({test_ckpt or 'those in memory'}) give a "
                        "non-finite loss on the test set. Resume from an earlier checkpoint with a lower "
                        "optim.optimizer.lr or a tighter optim.grad_clip")
    return bpd


def _checkpoint_to_test(trainer) -> str | None:
    """best.ckpt when validation ran, else the last checkpoint, else None (the weights in memory)."""
    cbs = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    saved = [cb.best_model_path for cb in cbs if cb.monitor not in (None, "step")] + [cb.last_model_path for cb in cbs]
    return next((p for p in saved if p and Path(p).is_file()), None)


def _finish_wandb(trainer, summary: dict, exit_code: int = 0) -> None:
    """Close this job's W&B run (one per job in a multirun) with ``summary``; say how to upload a finished offline run."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            run = logger.experiment
            run.summary.update(summary)  # a failure here ends in train's except, which finishes the run
            if run.settings.mode in ("offline", "dryrun") and run.dir and not exit_code:
                print(f"W&B offline run: upload it with `wandb sync {Path(run.dir).parent}`", flush=True)
            run.finish(exit_code=exit_code)


def main() -> None:
    run_hydra(train, "train")


if __name__ == "__main__":
    main()
