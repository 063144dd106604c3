"""Building a command's pieces from its composed config, each once by its own constructor, which checks its
arguments and neither reads data nor creates a folder; a refusal becomes a ConfigError naming the config key."""

from __future__ import annotations

import contextlib
import logging.handlers
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, Timer
from pytorch_lightning.utilities import rank_zero_only

from flowlab.errors import ConfigError, UserError, check_bool, check_int

WANDB_ID_FILE = "wandb_id"  # <run dir>/wandb_id: the run's W&B id, so that a resumed run continues its W&B run


def container(node: Any) -> Any:
    """A resolved plain-container copy of a config node."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def is_main_process() -> bool:
    """True in the process that should write shared files (global rank 0; children of DDP are not)."""
    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("LOCAL_RANK", "0") == "0" \
        and os.environ.get("NODE_RANK", "0") == "0"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def numbered(folder: Path):
    """``folder``, ``<folder>-1``, ``<folder>-2``, ...: the names a run's directory may take."""
    yield folder
    for n in range(1, 10_000):
        yield folder.with_name(f"{folder.name}-{n}")
    raise UserError(f"{folder}: 10,000 earlier outputs of the same run_name; choose another run_name")


def new_dir(folder: Path) -> Path:
    """The first of :func:`numbered` that does not exist, created exclusively: two commands never get the same."""
    for candidate in numbered(folder):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(parents=True)
            return candidate


def output_dir(result: str) -> Path:
    """Where eval/sample/ood write ``result``: the run directory, or a new sibling if an earlier command wrote it."""
    out = run_dir()
    return new_dir(out) if (out / result).exists() else out


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with plain containers. A UserError from the constructor is passed on; a refused
    argument, a missing package or an unknown class becomes a ConfigError naming ``key``."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is a bug and keeps its traceback
        cause: BaseException = e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError)):
            raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from e  # e.g. logger.wandb: pip install wandb
        if isinstance(e, InstantiationException) and isinstance(cause, ImportError):
            raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
        raise


def prepare_data(datamodule: pl.LightningDataModule, stages: tuple[str, ...] = ("fit", "test")) -> str:
    """Read the data now (missing or corrupt files fail here); print and return the line that says which data."""
    datamodule.prepare_data()
    for stage in stages:
        datamodule.setup(stage)
    line = datamodule.describe() if hasattr(datamodule, "describe") else type(datamodule).__name__
    if is_main_process():
        print(f"data: {line}", flush=True)
    return line


def check_data_fits_model(datamodule, model_hp: Mapping, where: str) -> None:
    """ConfigError unless the data's channels, size, n_bits and classes are those the model was built for."""
    bad = []
    for key, hp in (("channels", "in_channels"), ("image_size", "image_size"), ("n_bits", "n_bits")):
        want, have = model_hp.get(hp), getattr(datamodule, key, None)
        if want is not None and have is not None and _as_pair(want) != _as_pair(have):
            bad.append(f"data.{key}={have} but the model expects {want}")
    n_classes = model_hp.get("n_classes") if model_hp.get("y_condition") else None
    if n_classes is not None and getattr(datamodule, "num_classes", n_classes) != n_classes:  # 1: no labels
        bad.append(f"the model is class-conditional over {n_classes} classes but data={datamodule.name} has "
                   + (f"{datamodule.num_classes}" if datamodule.num_classes > 1 else "no labels"))
    if bad:
        raise ConfigError(f"the data does not fit the model of {where}: " + "; ".join(bad)
                          + ". Choose the dataset the model was trained on (data=<name>, data.n_bits=...)")


def checkpoint_module(cfg: DictConfig, datamodule=None, ema_key: str = "eval.use_ema"):
    """``(module, checkpoint, path)`` of ``ckpt_path`` (weights only) with ``eval.seed`` and ``ema_key`` applied where
    set, checked to fit ``datamodule`` (if any)."""
    from flowlab.lit.checkpoint import module_from_checkpoint

    seed = check_int("eval.seed", OmegaConf.select(cfg, "eval.seed"), allow_none=True)
    use_ema = None if OmegaConf.select(cfg, ema_key) is None else check_bool(ema_key, OmegaConf.select(cfg, ema_key))
    module, ckpt, path = module_from_checkpoint(cfg.ckpt_path)
    module.hparams.eval_seed = module.hparams.eval_seed if seed is None else seed
    module.use_ema = module.use_ema if use_ema is None else use_ema
    if datamodule is not None:
        check_data_fits_model(datamodule, ckpt["hyper_parameters"]["model"], f"checkpoint {path}")
    return module, ckpt, path


def _as_pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def instantiate_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger`` (named logger configs), which create their files only when they first write."""
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is not None:
            lcfg = container(lcfg)
            if "WandbLogger" in str(lcfg.get("_target_", "")):
                _wandb_defaults(lcfg, cfg)
            loggers.append(instantiate(lcfg, f"logger.{name}"))
    return loggers


def _wandb_defaults(lcfg: dict, cfg: DictConfig) -> None:
    """One W&B run per run directory (its id kept in ``wandb_id``), tagged with the data, model and seed; in a
    multirun named <run_name>/<sweep point> and grouped by run_name."""
    known = Path(str(lcfg.get("save_dir") or ".")) / WANDB_ID_FILE
    if not lcfg.get("id"):
        lcfg["id"] = known.read_text().strip() if known.is_file() else secrets.token_hex(4)
    lcfg.setdefault("resume", "allow")
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    tags = [f"{label}={choices[key]}" for key, label in (("data", "data"), ("model", "model"),
                                                         ("model/permutation", "permutation")) if choices.get(key)]
    lcfg["tags"] = sorted({*(lcfg.get("tags") or []), *tags, f"seed={cfg.seed}"})
    if is_multirun():
        lcfg["name"] = f"{cfg.run_name}/{hydra_cfg.job.override_dirname or f'job{hydra_cfg.job.num}'}"
        lcfg["group"] = lcfg.get("group") or str(cfg.run_name)


def instantiate_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    out = []
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None:
            continue
        if not isinstance(ccfg, (DictConfig, Mapping)) or "_target_" not in ccfg:
            raise ConfigError(f"callbacks.{name} is not a callback config (it needs a _target_); "
                              f"use callbacks.{name}=null to switch it off")
        out.append(instantiate(ccfg, f"callbacks.{name}"))
    return out


def instantiate_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` (with ``overrides``); make it inside :func:`held_back`. Lightning accepts
    ``max_steps=0`` and ``val_check_interval=0`` but cannot run with them, and names a bad ``max_time`` without its key."""
    kwargs = {**container(cfg.trainer), **overrides}
    if kwargs.get("max_steps", -1) != -1:
        check_int("trainer.max_steps", kwargs["max_steps"], 1)
    if isinstance(kwargs.get("val_check_interval"), int):
        check_int("trainer.val_check_interval", kwargs["val_check_interval"], 1)
    if kwargs.get("max_time") is not None:
        try:
            Timer(duration=kwargs["max_time"])
        except (MisconfigurationException, TypeError, ValueError) as e:
            raise ConfigError(f"trainer.max_time={kwargs['max_time']!r} is not allowed: {e}") from None
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kwargs.setdefault("enable_checkpointing", False)
    if not kwargs.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(kwargs, "trainer", callbacks=callbacks, logger=loggers or False)


@contextlib.contextmanager
def held_back():
    """``with held_back() as held:`` keeps Lightning's log records and warnings for :func:`show_held` (once accepted)."""
    keep = logging.handlers.BufferingHandler(capacity=1_000_000)
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric")]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [keep], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield keep.buffer
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        keep.buffer.extend(caught)


def show_held(held: list) -> None:
    for item in held:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
