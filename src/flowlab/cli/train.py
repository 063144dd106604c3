"""``flowlab-train``: fit a flow, test the best checkpoint, print the run directory and ``test/bpd=<value>``.

    flowlab-train experiment=quickstart
    flowlab-train data=cifar10 model/permutation=conv1x1 model.K=16 trainer=gpu run_name=cifar_1x1
    flowlab-train -m experiment=quickstart 'model/permutation=nxn,conv1x1' seed=0,1,2

The run directory is ``${paths.output_dir}/runs/${run_name}`` (multirun:
``${paths.output_dir}/multirun/${run_name}/<sweep point>``). It receives the checkpoints, sample
and reconstruction PNGs, ``metrics.csv``, the W&B offline run (its id in ``wandb_id``) and
``results.json``. Starting a command again with the ``run_name`` of a run resumes that run exactly, and
its W&B run, from its newest valid checkpoint (:func:`flowlab.lit.checkpoint.resume_candidates`) and
prints ``Resuming from <path>``; a run directory without one is refused (see :mod:`flowlab.cli._hydra`).

Checkpoints are written atomically; SIGTERM or SIGUSR1 saves ``last.ckpt`` before the process exits
(status 128 + signal), as do Ctrl-C and SIGHUP (:mod:`flowlab.lit.interrupt`); see
:mod:`flowlab.lit.preemption` and, for DDP and SLURM, :mod:`flowlab.cluster`. A test bits/dim that is
not finite ends the command with status 2.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flowlab.cli._hydra import run_hydra
from flowlab.errors import check_int

__all__ = ["main", "prepare", "train", "TrainRun"]


def _resume_checkpoint(cfg: DictConfig, out_dir: Path, model_hp: dict) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and what to say about it: ``ckpt_path``, else the newest valid one of this
    run (:func:`flowlab.lit.checkpoint.resume_candidates`; an unreadable one is passed over, saying so), checked
    to be a safe flowlab checkpoint of the same model (``memory_saving`` may change: it changes no weight). A run
    directory that holds a run but no valid checkpoint is refused: nothing there is overwritten."""
    from flowlab.cli._build import is_main_process
    from flowlab.cli._hydra import LOCK
    from flowlab.errors import CheckpointError, UserError
    from flowlab.lit.checkpoint import CHECKPOINT_DIRNAME, load_checkpoint, resume_candidates

    requested, notes = cfg.get("ckpt_path"), []
    if requested is None or str(requested) == "last":
        path = ckpt = None
        for candidate in resume_candidates(out_dir):
            try:
                ckpt = load_checkpoint(candidate, key="checkpoint")
            except CheckpointError as e:
                notes.append(f"warning: {e}; resuming from an older checkpoint instead")
                continue
            path = candidate
            break
        if path is None:
            started = out_dir.is_dir() and any(p.name not in (LOCK, ".hydra") and p.suffix != ".log"
                                               for p in out_dir.iterdir())  # Hydra's own record: not yet a run
            if started and is_main_process():
                raise UserError(f"run_name={cfg.run_name}: {out_dir} holds a run but no valid checkpoint to resume "
                                f"from{' (' + '; '.join(notes) + ')' if notes else ''}. Choose another run_name, or "
                                "give resume=false to start a new run beside it (nothing there is overwritten)")
            return None, []
    else:
        path = Path(str(requested)).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT_DIRNAME / "last.ckpt" if (path / CHECKPOINT_DIRNAME).is_dir() else path / "last.ckpt"
        ckpt = load_checkpoint(path, key="ckpt_path")
    saved = ckpt["hyper_parameters"].get("model", {})
    free = {"memory_saving"}  # also the class-conditional settings of two unconditional models (older runs lack them)
    free |= {"y_condition", "n_classes", "y_weight"} if not (saved.get("y_condition") or model_hp.get("y_condition")) else set()
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {model_hp.get(k)!r} in the config"
            for k in sorted(set(saved) | set(model_hp)) if k not in free and saved.get(k) != model_hp.get(k)]
    if diff:
        raise CheckpointError(f"ckpt_path={path} belongs to another model configuration: " + "; ".join(diff)
                              + ". Use the same model settings, or a new run_name to start a new run")
    return path, notes


@dataclass
class TrainRun:
    """Everything ``flowlab-train`` runs with, built once by :func:`prepare`."""

    datamodule: Any
    module: Any
    trainer: Any
    held: list  # Lightning's messages while making the trainer, shown once the command is accepted
    resume: Path | None
    resume_notes: list
    data_line: str
    preemption: Any
    interrupt: Any


def prepare(cfg: DictConfig) -> TrainRun:
    """Build the run and read what it reads, writing nothing: every mistake fails here, before the run directory
    exists (the Hydra callback :class:`flowlab.cli._hydra.CheckConfigBeforeRun` calls this). Config values first
    (data, model, callbacks, loggers, trainer: their constructors check them), then the checkpoint to resume
    from, then the data."""
    import pytorch_lightning as pl

    from flowlab.cli import _build as build
    from flowlab.cluster import check_strategy_for_multirun, cluster_plugins
    from flowlab.lit.checkpoint import AtomicCheckpointIO
    from flowlab.lit.interrupt import Interrupt
    from flowlab.lit.module import FlowModule
    from flowlab.lit.preemption import Preemption

    pl.seed_everything(check_int("seed", cfg.seed, 0, 2**32 - 1), workers=True, verbose=False)
    datamodule = build.instantiate_datamodule(cfg)
    model_hp = build.container(cfg.model)
    module = FlowModule(model=model_hp, optim=build.container(cfg.optim), eval_seed=cfg.eval.seed, seed=cfg.seed,
                        use_ema=cfg.eval.get("use_ema", True), data=build.container(cfg.data))
    build.check_data_fits_model(datamodule, model_hp, "this config")
    preemption = Preemption()  # SIGTERM/SIGUSR1: save last.ckpt, then exit; RNG state in checkpoints
    interrupt = Interrupt()  # Ctrl-C, SIGHUP: the same, then exit 128 + signal
    callbacks = [*build.instantiate_callbacks(cfg), preemption, interrupt]
    for cb in callbacks:  # a class-conditional model logs val/bpd_cond, never val/bpd
        if getattr(cb, "monitor", None) == "val/bpd":
            cb.monitor = f"val/{module.bpd_name}"
    loggers = build.instantiate_loggers(cfg)
    with build.held_back() as held:  # Lightning's messages (SLURM detection, devices) wait until the end
        check_strategy_for_multirun(build.container(cfg.trainer), _is_multirun())
        plugins = [AtomicCheckpointIO(), *cluster_plugins(), *(build.container(cfg.trainer.get("plugins")) or [])]
        trainer = build.instantiate_trainer(cfg, callbacks, loggers, plugins=plugins)
    resume, notes = _resume_checkpoint(cfg, build.run_dir(), model_hp)
    data_line = build.prepare_data(datamodule, ("fit", "test"))  # prints "data: <which data>" once
    datamodule.train_dataloader()  # checks data.batch_size against the training images
    return TrainRun(datamodule, module, trainer, held, resume, notes, data_line, preemption, interrupt)


def train(cfg: DictConfig) -> float:
    """Fit and test; returns the test bits/dim. The task function of the Hydra app."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from flowlab.cli import _build as build
    from flowlab.cli._hydra import prepared

    run = prepared(cfg, prepare)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    out_dir = build.run_dir()
    build.show_held(run.held)
    if trainer.is_global_zero:
        for note in run.resume_notes:
            print(note, file=sys.stderr, flush=True)
        if run.resume is not None:
            print(f"Resuming from {run.resume}", flush=True)
        _keep_wandb_id(trainer, out_dir)
    params = module.num_params
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": build.container(cfg), "params": params})

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the EMA copy is eval-only
    # val/test repeats that DistributedSampler pads in are dropped by image index (KeyedBitsPerDim)
    warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.resume) if run.resume else None,
                    weights_only=True)
        test_ckpt = _checkpoint_to_test(trainer)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True, verbose=False)
        key = f"test/{module.bpd_name}"  # test/bpd_cond for a class-conditional model: -log2 p(x|y)/D
        bpd = float(results[0][key]) if results else math.nan
        sync_hint = _finish_wandb(trainer, bpd, params, key=key)
    except BaseException as e:
        _finish_wandb(trainer, None, None, exit_code=1)
        if isinstance(e, SIGTERMException):  # last.ckpt was saved (Preemption); a scheduler may requeue us
            signum = run.interrupt.signal_received or run.preemption.signal_received or signal.SIGTERM
            raise SystemExit(128 + int(signum)) from None
        raise

    if trainer.is_global_zero:
        record = {key: bpd, "checkpoint": test_ckpt, "global_step": int(trainer.global_step),
                  "params": params, "run_dir": str(out_dir), "data": run.data_line}
        (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        if sync_hint:
            print(sync_hint, flush=True)
        print(f"run directory: {out_dir}", flush=True)
        print(f"{key}={bpd:.6f}", flush=True)
    if not math.isfinite(bpd):
        from flowlab.errors import UserError

        raise UserError(f"{key}={bpd} is not finite: the tested weights ({test_ckpt or 'those in memory'}) give a "
                        "non-finite loss on the test set. Resume from an earlier checkpoint with a lower "
                        "optim.optimizer.lr or a tighter optim.grad_clip")
    return bpd


def _keep_wandb_id(trainer, out_dir: Path) -> None:
    """Write the W&B run id into the run directory: the same command resumes that W&B run."""
    from flowlab.cli._build import WANDB_ID_FILE

    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and not (out_dir / WANDB_ID_FILE).is_file():
            (out_dir / WANDB_ID_FILE).write_text(f"{logger.version}\n")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _checkpoint_to_test(trainer) -> str | None:
    """best.ckpt when validation ran, else the last checkpoint, else None (the weights in memory)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    best = last = None
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.monitor not in (None, "step") and cb.best_model_path and Path(cb.best_model_path).is_file():
                best = best or cb.best_model_path
            if cb.last_model_path and Path(cb.last_model_path).is_file():
                last = last or cb.last_model_path
    return best or last


def _finish_wandb(trainer, bpd, params, exit_code: int = 0, key: str = "test/bpd") -> str | None:
    """Close this job's W&B run (a multirun makes one run per job) and say how to upload an offline run."""
    hint = None
    for logger in getattr(trainer, "loggers", []):
        if type(logger).__name__ != "WandbLogger" or getattr(logger, "_experiment", None) is None:
            continue
        run = logger.experiment
        try:
            if bpd is not None:
                run.summary[key] = bpd
                run.summary["params"] = params
            offline = getattr(getattr(run, "settings", None), "mode", "") in ("offline", "dryrun") or \
                getattr(run, "offline", False)
            if offline and getattr(run, "dir", None):
                hint = f"W&B offline run: upload it with `wandb sync {Path(run.dir).parent}`"
        finally:
            run.finish(exit_code=exit_code)
    return hint


def main() -> None:
    run_hydra(train, "train")


if __name__ == "__main__":
    main()
