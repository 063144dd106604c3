"""Building the pieces of a run from a composed config (shared by train, eval and sample)."""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from flowlab.errors import ConfigError, UserError

__all__ = ["container", "instantiate_datamodule", "prepare_data", "instantiate_loggers", "instantiate_callbacks",
           "instantiate_trainer", "save_run_config", "is_main_process", "check_data_fits_model",
           "run_dir", "claim_output_dir"]


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


def claim_output_dir(folder: Path, earlier_outputs: tuple[str, ...] = ()) -> Path:
    """A directory no other command has written its outputs into: ``folder`` itself the first time, else
    the first free ``<folder>-1``, ``<folder>-2``, ... (``flowlab-eval``/``flowlab-sample`` run twice with the
    same ``run_name``, or started in the same second, never overwrite each other's files).

    A directory is claimed by creating ``.claimed`` in it exclusively (safe between concurrent commands);
    one holding any of ``earlier_outputs`` (written before claims existed) counts as taken. Only the main
    process claims; the others (DDP) write nothing and get ``folder``.
    """
    if not is_main_process():
        return folder
    for n in range(10_000):
        candidate = folder if n == 0 else folder.with_name(f"{folder.name}-{n}")
        candidate.mkdir(parents=True, exist_ok=True)
        if any((candidate / name).exists() for name in earlier_outputs):
            continue
        try:
            os.close(os.open(candidate / ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return candidate
    raise UserError(f"{folder}: 10,000 earlier outputs of the same run_name; choose another run_name")


# ---- data -------------------------------------------------------------------------------------------
def instantiate_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    try:
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    except Exception as e:  # the constructor's ConfigError arrives wrapped in InstantiationException
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


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
    if bad:
        raise ConfigError(f"the data does not fit the model of {where}: " + "; ".join(bad)
                          + ". Choose the dataset the model was trained on (data=<name>, data.n_bits=...)")


def _as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---- loggers and callbacks ---------------------------------------------------------------------------------
def instantiate_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger`` (a dict of named logger configs; ``logger=none`` gives none)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    node = cfg.get("logger")
    if not node:
        return []
    loggers = []
    for name, lcfg in node.items():
        if lcfg is None:
            continue
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        if "WandbLogger" in str(lcfg.get("_target_", "")):
            _wandb_defaults(lcfg, cfg, HydraConfig.get() if HydraConfig.initialized() else None, RunMode)
        try:
            loggers.append(hydra.utils.instantiate(lcfg))
        except Exception as e:
            if _missing_module(e, ("tensorboard", "tensorboardX")):
                raise ConfigError(f"logger={name}: the `tensorboard` package is not installed; "
                                  "`pip install tensorboard` or choose logger=csv / logger=wandb") from None
            if _missing_module(e, ("wandb",)):
                raise ConfigError(f"logger={name}: the `wandb` package is not installed; `pip install wandb` "
                                  "or choose logger=csv") from None
            raise
    return loggers


def _missing_module(e: BaseException, names) -> bool:
    text = ""
    cur = e
    while cur is not None:
        text += " " + str(cur)
        cur = cur.__cause__ or cur.__context__
    return any(n in text for n in names) and ("No module" in text or "not available" in text or "install" in text)


def _wandb_defaults(lcfg: dict, cfg: DictConfig, hydra_cfg, RunMode) -> None:
    """One W&B run per job: in a multirun, named <run_name>/<sweep point>, grouped by run_name, tagged."""
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
    node = cfg.get("callbacks")
    if not node:
        return []
    out = []
    for name, ccfg in node.items():
        if ccfg is None:
            continue
        if not isinstance(ccfg, (DictConfig, Mapping)) or "_target_" not in ccfg:
            raise ConfigError(f"callbacks.{name} is not a callback config (it needs a _target_); "
                              f"use callbacks.{name}=null to switch it off")
        try:
            out.append(hydra.utils.instantiate(ccfg, _convert_="all"))
        except Exception as e:
            cause = e
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise
    return out


def instantiate_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

    kwargs = container(cfg.trainer)
    kwargs.update(overrides)
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kwargs.setdefault("enable_checkpointing", False)
    if not kwargs.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return hydra.utils.instantiate(kwargs, callbacks=callbacks, logger=loggers if loggers else False, _convert_="all")


# ---- the run's record of its config -----------------------------------------------------------------------
def save_run_config(cfg: DictConfig, out_dir: Path) -> None:
    """Write ``<run>/.hydra/{config,overrides,hydra}.yaml``, as Hydra would, but only once the command is known
    to be valid. A run resumed with a different config keeps the earlier files in ``.hydra/previous/<time>/``."""
    from hydra.core.hydra_config import HydraConfig

    if not is_main_process():
        return
    folder = Path(out_dir) / ".hydra"
    files = {"config.yaml": OmegaConf.to_yaml(cfg)}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        files["overrides.yaml"] = OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task)))
        files["hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}))
    folder.mkdir(parents=True, exist_ok=True)
    changed = [n for n, text in files.items()
               if (folder / n).is_file() and (folder / n).read_text() != text and n != "hydra.yaml"]
    if changed:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        keep = folder / "previous" / stamp
        keep.mkdir(parents=True, exist_ok=True)
        for n in files:
            if (folder / n).is_file():
                shutil.copy2(folder / n, keep / n)
    for n, text in files.items():
        tmp = folder / f".{n}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / n)

