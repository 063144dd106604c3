"""Building the pieces of a command from its composed config (shared by flowlab-train, -eval and -sample).

Each piece is made once, by its own constructor, which checks its arguments; none of them reads data
or creates a folder. A constructor's refusal becomes a ConfigError naming the config key, so the
command line prints it as one ``error: ...`` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from flowlab.errors import ConfigError, UserError, check_int

__all__ = ["container", "is_main_process", "run_dir", "new_dir", "output_dir", "instantiate", "instantiate_datamodule",
           "prepare_data", "check_data_fits_model", "instantiate_loggers", "instantiate_callbacks",
           "instantiate_trainer", "held_back", "show_held"]


def container(node: Any) -> Any:
    """A resolved plain-container copy of a config node."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def is_main_process() -> bool:
    """True in the process that should write shared files (global rank 0; children of DDP are not)."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("LOCAL_RANK", "0") == "0" \
        and os.environ.get("NODE_RANK", "0") == "0"


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def new_dir(folder: Path) -> Path:
    """``folder``, or if it exists the first of ``<folder>-1``, ``<folder>-2``, ... that does not, created
    exclusively: two commands never get the same directory."""
    for n in range(10_000):
        candidate = folder if n == 0 else folder.with_name(f"{folder.name}-{n}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise UserError(f"{folder}: 10,000 earlier outputs of the same run_name; choose another run_name")


def output_dir(result: str) -> Path:
    """Where ``flowlab-eval``/``-sample`` write ``result``: the run directory (a new one, claimed by the Hydra
    callback), or a new sibling when a multirun job run again finds an earlier command's ``result`` there."""
    out = run_dir()
    return new_dir(out) if (out / result).exists() else out


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with plain containers. A UserError raised by the constructor is passed on; a
    refused argument (Lightning's MisconfigurationException, a ValueError or TypeError) or an unknown class
    becomes a ConfigError naming ``key``."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is a bug and keeps its traceback
        cause: BaseException = e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (MisconfigurationException, ValueError, TypeError)):
            raise ConfigError(f"{key}: {cause}") from e
        if isinstance(e, InstantiationException) and isinstance(cause, ImportError):
            raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
        raise


# ---- data -------------------------------------------------------------------------------------------
def instantiate_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data, "data")


def prepare_data(datamodule: pl.LightningDataModule, stages: tuple[str, ...] = ("fit", "test")) -> str:
    """Find and read the data now (missing or corrupt files fail here, before training); print, in the main
    process, the one line that says which data this is (``data: <describe()>``) and return that line."""
    datamodule.prepare_data()
    for stage in stages:
        datamodule.setup(stage)
    describe = getattr(datamodule, "describe", None)
    line = describe() if callable(describe) else type(datamodule).__name__
    if is_main_process():
        print(f"data: {line}", flush=True)
    return line


def check_data_fits_model(datamodule, model_hp: Mapping, where: str) -> None:
    """ConfigError unless the data's channels, size and n_bits are those the model was built for."""
    want = {"channels": model_hp.get("in_channels"), "image_size": model_hp.get("image_size"),
            "n_bits": model_hp.get("n_bits")}
    have = {"channels": getattr(datamodule, "channels", None), "image_size": getattr(datamodule, "image_size", None),
            "n_bits": getattr(datamodule, "n_bits", None)}
    bad = [f"data.{k}={have[k]} but the model expects {want[k]}" for k in want
           if want[k] is not None and have[k] is not None and list(_as_pair(want[k])) != list(_as_pair(have[k]))]
    n_classes = model_hp.get("n_classes") if model_hp.get("y_condition") else None
    if n_classes is not None and getattr(datamodule, "num_classes", n_classes) != n_classes:  # 1: no labels
        bad.append(f"the model is class-conditional over {n_classes} classes but data={datamodule.name} has "
                   + (f"{datamodule.num_classes}" if datamodule.num_classes > 1 else "no labels"))
    if bad:
        raise ConfigError(f"the data does not fit the model of {where}: " + "; ".join(bad)
                          + ". Choose the dataset the model was trained on (data=<name>, data.n_bits=...)")


def _as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---- loggers and callbacks ---------------------------------------------------------------------------------
def instantiate_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger`` (a dict of named logger configs; ``logger=none`` gives none). Loggers
    create their files only when they first write."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        if "WandbLogger" in str(lcfg.get("_target_", "")):
            _wandb_defaults(lcfg, cfg, HydraConfig.get() if HydraConfig.initialized() else None, RunMode)
        try:
            loggers.append(instantiate(lcfg, f"logger.{name}"))
        except Exception as e:
            for module, package in (("tensorboard", "tensorboard"), ("tensorboardX", "tensorboard"), ("wandb", "wandb")):
                if _missing_module(e, module):
                    raise ConfigError(f"logger={name}: the `{package}` package is not installed; `pip install "
                                      f"{package}` or choose logger=csv") from None
            raise
    return loggers


def _missing_module(e: BaseException, name: str) -> bool:
    text, cur = "", e
    while cur is not None:
        text += " " + str(cur)
        cur = cur.__cause__ or cur.__context__
    return name in text and ("No module" in text or "not available" in text or "install" in text)


#: ``<run dir>/wandb_id``: the W&B run id of a run directory, kept so that a resumed run continues its W&B run
WANDB_ID_FILE = "wandb_id"


def _wandb_defaults(lcfg: dict, cfg: DictConfig, hydra_cfg, RunMode) -> None:
    """One W&B run per job: in a multirun, named <run_name>/<sweep point>, grouped by run_name, tagged; and one per
    run directory: the id kept in ``<run dir>/wandb_id`` (written by flowlab-train), resumed with resume="allow"."""
    import secrets

    known = Path(str(lcfg.get("save_dir") or ".")) / WANDB_ID_FILE
    if not lcfg.get("id"):
        lcfg["id"] = known.read_text().strip() if known.is_file() else secrets.token_hex(4)
    lcfg.setdefault("resume", "allow")
    choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    tags = list(lcfg.get("tags") or [])
    for key, label in (("data", "data"), ("model", "model"), ("model/permutation", "permutation")):
        if choices.get(key):
            tags.append(f"{label}={choices[key]}")
    tags.append(f"seed={cfg.seed}")
    lcfg["tags"] = sorted(set(tags))
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        point = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
        lcfg["name"] = f"{cfg.run_name}/{point}"
        if not lcfg.get("group"):
            lcfg["group"] = str(cfg.run_name)


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


# ---- the trainer -------------------------------------------------------------------------------------------
def instantiate_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` (with ``overrides``). Make it inside :func:`held_back`: Lightning logs and
    warns while making it, which a command rejected afterwards must not print.

    Lightning accepts ``val_check_interval=0`` and ``max_steps=0`` but cannot run with them, and names the
    value of ``max_time`` without its key; these are checked here first.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, Timer

    kwargs = container(cfg.trainer)
    kwargs.update(overrides)
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
    return instantiate(kwargs, "trainer", callbacks=callbacks, logger=loggers if loggers else False)


class _Keep(logging.Handler):
    def __init__(self, held: list):
        super().__init__()
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)


@contextlib.contextmanager
def held_back():
    """``with held_back() as held:`` keeps Lightning's log records and the warnings raised inside the block in
    ``held``, for :func:`show_held` once the command is accepted (a rejected command prints one line)."""
    held: list = []
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric")]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [_Keep(held)], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield held
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        held.extend(caught)


def show_held(held: list) -> None:
    """Show what :func:`held_back` kept, now that the command is accepted."""
    for item in held:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
