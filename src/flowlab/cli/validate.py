"""Checks of a composed config that run before any data is read or any directory is written.

One place for every rule a person can break by typing an override: each failure is a
ConfigError whose message names the key, the value and what is allowed. The model and data
constructors check their own arguments again; these checks make the common mistakes fail fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowlab.data.transforms import check_n_bits
from flowlab.errors import ConfigError

__all__ = ["validate_train_config", "validate_eval_config", "validate_sample_config", "MISSING"]

MISSING = object()


def _get(cfg: DictConfig, key: str, default: Any = MISSING) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _present(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is set to something other than null (without resolving what is below it)."""
    try:
        return OmegaConf.select(cfg, key, default=None) is not None
    except OmegaConfBaseException:
        return True


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be an integer ≥ {minimum}")
    return value


def _number(value, key: str, low: float, high: float | None = None, low_open: bool = False,
            high_open: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)
        ok = v == v and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        lo = f"{'>' if low_open else '≥'} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '≤'} {high:g}"
        none = " (or null)" if allow_none else ""
        raise ConfigError(f"{key}={value!r} is not allowed: it must be a number {lo}{hi}{none}")
    return float(value)


def _check_data(cfg: DictConfig) -> None:
    if not _present(cfg, "data"):
        raise ConfigError("data is not set: choose a dataset with data=<name> (cifar10, imagenet32, imagenet64, "
                          "imagenet32_chrabaszcz, imagenet64_chrabaszcz, celebahq256, mnist, fashion_mnist)")
    check_n_bits(_get(cfg, "data.n_bits", 8), key="data.n_bits")
    for key in ("data.image_size", "data.channels"):
        v = _get(cfg, key, None)
        if v is not None:
            _int(v, key, 1)
    _int(_get(cfg, "data.batch_size", 1), "data.batch_size", 1)


def _check_model(cfg: DictConfig) -> None:
    from flowlab.flows import COUPLINGS, PERMUTATIONS
    from flowlab.lit.module import ALLOWED_MODEL_PACKAGES

    model = _get(cfg, "model", None)
    if not isinstance(model, Mapping):
        raise ConfigError("model is not set: choose a model with model=<name> (glow)")
    target = model.get("_target_")
    if not isinstance(target, str) or target.rpartition(".")[0] not in ALLOWED_MODEL_PACKAGES:
        raise ConfigError(f"model._target_={target!r} is not allowed: the model must be a class of "
                          f"{' or '.join(ALLOWED_MODEL_PACKAGES)}, e.g. flowlab.flows.Glow")
    for key in ("K", "L"):
        if key in model:
            _int(model[key], f"model.{key}", 1)
    if "hidden_channels" in model:
        v = model["hidden_channels"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"model.hidden_channels={v!r} is not allowed: it must be an integer > 0")
    if "kernel_size" in model:
        _int(model["kernel_size"], "model.kernel_size", 1)
    if "permutation" in model and model["permutation"] not in PERMUTATIONS:
        raise ConfigError(f"model.permutation={model['permutation']!r} is unknown; allowed: {', '.join(PERMUTATIONS)} "
                          f"(choose one with model/permutation=<name>)")
    if "coupling" in model and model["coupling"] not in COUPLINGS:
        raise ConfigError(f"model.coupling={model['coupling']!r} is unknown; allowed: {', '.join(COUPLINGS)}")
    if "n_bits" in model:
        check_n_bits(model["n_bits"], key="model.n_bits")
    _dry_build(model)


def _dry_build(model: dict) -> None:
    """Build the model on the meta device (no memory, no arithmetic): the flow class checks its own arguments
    (e.g. an image size not divisible by 2^L) with its own message, for any flow class."""
    import torch

    from flowlab.errors import UserError
    from flowlab.lit.module import build_flow

    try:
        with torch.device("meta"):
            build_flow(model)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a layer that cannot be built on meta: the real build checks it later
        pass


def _check_optim(cfg: DictConfig) -> None:
    from flowlab.lit.module import OPTIMIZERS

    name = _get(cfg, "optim.optimizer", "adam")
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    _number(_get(cfg, "optim.lr", 1e-3), "optim.lr", 0.0, low_open=True)
    _int(_get(cfg, "optim.warmup_steps", 0) or 0, "optim.warmup_steps", 0)
    _number(_get(cfg, "optim.weight_decay", 0.0) or 0.0, "optim.weight_decay", 0.0)
    _number(_get(cfg, "optim.grad_clip", None), "optim.grad_clip", 0.0, low_open=True, allow_none=True)
    _number(_get(cfg, "optim.ema_decay", None), "optim.ema_decay", 0.0, 1.0, low_open=True, high_open=True,
            allow_none=True)
    from flowlab.lit.monitors import check_max_consecutive_skips

    check_max_consecutive_skips(_get(cfg, "optim.max_consecutive_skips", None))
    coupling_dtype = _get(cfg, "optim.coupling_dtype", None)
    if coupling_dtype not in (None, "auto", "bfloat16", "float32"):
        raise ConfigError(f"optim.coupling_dtype={coupling_dtype!r} is unknown; allowed: auto, bfloat16, float32")
    for key in ("optim.fused", "optim.coupling_channels_last"):
        flag = _get(cfg, key, False)
        if not isinstance(flag, bool):
            raise ConfigError(f"{key}={flag!r} is not allowed: give true or false")
    betas = _get(cfg, "optim.betas", None)
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != 2:
            raise ConfigError(f"optim.betas={betas!r} is not allowed: give two numbers in [0, 1), e.g. [0.9, 0.999]")
        for b in betas:
            _number(b, "optim.betas", 0.0, 1.0, high_open=True)


def _check_trainer(cfg: DictConfig) -> None:
    max_steps = _get(cfg, "trainer.max_steps", -1)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        raise ConfigError(f"trainer.max_steps={max_steps!r} is not allowed: give a number of optimiser steps ≥ 1")


def _check_callbacks(cfg: DictConfig) -> None:
    from flowlab.lit.callbacks import check_temperatures

    temps = _get(cfg, "callbacks.samples.temperatures", None) if _present(cfg, "callbacks.samples") else None
    if _present(cfg, "callbacks.samples") and temps is not None:
        check_temperatures(temps, "callbacks.samples.temperatures")
    every = _get(cfg, "callbacks.checkpoint.every_n_train_steps", None) if _present(cfg, "callbacks.checkpoint") \
        else None
    if every is not None:
        _int(every, "callbacks.checkpoint.every_n_train_steps", 1)
    if _present(cfg, "callbacks.invertibility"):
        from flowlab.lit.monitors import check_monitor_config

        check_monitor_config(_get(cfg, "callbacks.invertibility"), "callbacks.invertibility")


def _check_seed(cfg: DictConfig) -> None:
    seed = _get(cfg, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed: it must be an integer ≥ 0")


def _check_run_name(cfg: DictConfig) -> None:
    name = _get(cfg, "run_name", None)
    if not isinstance(name, (str, int)) or str(name).strip() == "" or str(name) in (".", "..") or "\\" in str(name):
        raise ConfigError(f"run_name={name!r} is not allowed: give a non-empty name for the run directory")


def validate_train_config(cfg: DictConfig) -> None:
    """Every check that applies to ``flowlab-train``."""
    _check_run_name(cfg)
    _check_seed(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_optim(cfg)
    _check_trainer(cfg)
    _check_callbacks(cfg)


def _check_ckpt_given(cfg: DictConfig, command: str) -> None:
    ckpt = _get(cfg, "ckpt_path", None)
    if ckpt is None or str(ckpt).strip() == "":
        raise ConfigError(f"ckpt_path is not set: {command} needs a checkpoint, e.g. "
                          f"{command} ckpt_path=outputs/runs/<run_name>/checkpoints/best.ckpt (or the run directory)")
    from flowlab.lit.checkpoint import resolve_checkpoint

    resolve_checkpoint(ckpt)  # the file (or a run directory's best/last.ckpt) exists; read later, safely


def validate_eval_config(cfg: DictConfig) -> None:
    """Checks for ``flowlab-eval`` (the model comes from the checkpoint, the data from the config)."""
    _check_run_name(cfg)
    _check_data(cfg)
    _int(_get(cfg, "eval.draws", 1), "eval.draws", 1)
    split = _get(cfg, "eval.split", "test")
    if split not in ("test", "val"):
        raise ConfigError(f"eval.split={split!r} is not allowed: test or val")
    _check_ckpt_given(cfg, "flowlab-eval")  # last: every value above is named even without a checkpoint


def validate_sample_config(cfg: DictConfig) -> None:
    """Checks for ``flowlab-sample``."""
    from flowlab.lit.callbacks import check_temperatures

    _check_run_name(cfg)
    check_temperatures(_get(cfg, "sample.temperatures", [1.0]), "sample.temperatures")
    _int(_get(cfg, "sample.n_samples", 1), "sample.n_samples", 1)
    nrow = _get(cfg, "sample.nrow", None)
    if nrow is not None:
        _int(nrow, "sample.nrow", 1)
    _int(_get(cfg, "sample.reconstructions", 0), "sample.reconstructions", 0)
    if _get(cfg, "sample.reconstructions", 0):
        _check_data(cfg)
    _check_ckpt_given(cfg, "flowlab-sample")  # last: every value above is named even without a checkpoint
