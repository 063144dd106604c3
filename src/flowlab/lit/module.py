"""The LightningModule: trains any flow with flowlab's contract by maximum likelihood.

The flow (``flowlab.flows.Glow`` or any class with the same contract: ``bits_per_dim``, ``encode``,
``decode``, ``sample``, an ``n_bits`` attribute and optionally ``initialize``) is built from a
plain-dict config holding its ``_target_``. Every constructor argument of this module is a plain
container, saved in the checkpoint, so ``FlowModule.from_checkpoint`` rebuilds the model from the
checkpoint alone and the checkpoint loads with ``torch.load(weights_only=True)``.

Batches are ``(x, y, index)`` (see :mod:`flowlab.data`): ``x`` integer images already reduced to
``n_bits``, ``index`` each image's position in its split. Training uses ``x`` only and adds fresh
uniform noise every step from a generator seeded by (seed, process rank, starting step), so DDP
processes use different noise. Validation and test noise is a fixed function of (eval seed, image
index, draw) — see :mod:`flowlab.lit.noise` — and each (index, draw) counts once, so their bits/dim
depends neither on batching nor on DDP's padded repeats; a batch without ``index`` is a ValueError.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from flowlab.data.transforms import preprocess
from flowlab.errors import ConfigError
from flowlab.flows.precision import fast_coupling_dtype
from flowlab.lit.ema import EMA
from flowlab.lit.metrics import BitsPerDim, KeyedBitsPerDim
from flowlab.lit.noise import eval_uniform

__all__ = ["FlowModule", "build_flow", "OPTIMIZERS", "ALLOWED_MODEL_PACKAGES"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}
COUPLING_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
#: ``_target_`` of a model config must name a class in one of these packages (checkpoints are data, not code)
ALLOWED_MODEL_PACKAGES = ("flowlab.flows",)
_MAX_DRAWS = 2**20  # evaluation metric key = image index * _MAX_DRAWS + draw
_OPTIM_DEFAULTS_KEYS = ("optimizer", "lr", "betas", "weight_decay", "warmup_steps", "grad_clip", "ema_decay")


def _plain(obj: Any) -> Any:
    """A deep copy made of dict/list/str/int/float/bool/None only (what weights_only checkpoints accept)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    try:  # OmegaConf containers
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return _plain(OmegaConf.to_container(obj, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not a plain config value: {obj!r} ({type(obj).__name__})")


def build_flow(model_cfg: Mapping) -> nn.Module:
    """Instantiate a flow from ``{"_target_": "flowlab.flows.Glow", **kwargs}``.

    Only classes of :data:`ALLOWED_MODEL_PACKAGES` may be named and no argument may itself be a
    ``_target_``: a config (or a checkpoint's hyper-parameters) can choose a model, never run code.
    """
    cfg = _plain(model_cfg)
    target = cfg.pop("_target_", None)
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"model._target_={target!r} is not allowed: name a flow class, e.g. flowlab.flows.Glow")
    module_name, _, cls_name = target.rpartition(".")
    if module_name not in ALLOWED_MODEL_PACKAGES:
        raise ConfigError(f"model._target_={target!r} is not allowed: the model must be a class of "
                          f"{' or '.join(ALLOWED_MODEL_PACKAGES)}")

    def _reject_nested(value, key):
        if isinstance(value, dict):
            if any(k.startswith("_") and k.endswith("_") for k in value):
                raise ConfigError(f"model.{key} is not allowed to hold a Hydra directive ({sorted(value)})")
            for k, v in value.items():
                _reject_nested(v, f"{key}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                _reject_nested(v, f"{key}[{i}]")

    for k, v in cfg.items():
        if k.startswith("_") and k.endswith("_"):
            raise ConfigError(f"model.{k} is not allowed: a model config holds _target_ and the class's arguments")
        _reject_nested(v, k)
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model._target_={target!r} is not a flow class in {module_name}")
    try:
        return cls(**cfg)
    except TypeError as e:  # an unknown or missing argument name
        raise ConfigError(f"model: {target} does not accept these arguments ({e}); "
                          f"check the keys under model: {sorted(cfg)}") from e


class FlowModule(pl.LightningModule):
    """Maximum-likelihood training of a flow; loss = mean bits/dim of the dequantised batch.

    Args:
        model: the flow's config (``_target_`` + constructor arguments), a plain dict.
        optim: ``optimizer`` (adam | adamax), ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``
            (linear warm-up), ``grad_clip`` (max global gradient norm or None), ``ema_decay`` (None: off),
            ``max_consecutive_skips`` (stop after this many non-finite steps in a row; None/absent: never),
            ``fused`` (fused Adam kernels), ``coupling_dtype`` (auto | bfloat16 | float32: the coupling
            networks' dtype in training steps, auto = bfloat16 where the device multiplies it natively;
            evaluation always runs in float32), ``coupling_channels_last`` (the coupling networks'
            hidden activations channels-last, in training and evaluation: a layout, not a precision).
        eval_seed: seed of the validation/test dequantisation noise.
        seed: seed of the training noise (combined with the process rank).
        use_ema: evaluate (validation, test, images) with the EMA weights when they exist.
        data: a description of the data the model is trained on (kept for messages and tools).

    A step whose loss or gradient norm is not finite is skipped (gradients dropped, so weights and
    optimiser state stay as they were), counted in ``skipped_steps`` and logged as
    ``train/skipped_steps``; see :mod:`flowlab.lit.monitors`. The decision costs one host sync per
    step (the finiteness of the gradient norm, which clipping computes anyway).
    """

    def __init__(self, model: Mapping, optim: Mapping, eval_seed: int = 1234, seed: int = 0,
                 use_ema: bool = True, data: Mapping | None = None):
        super().__init__()
        model, optim = _plain(model), _plain(optim)
        data = None if data is None else _plain(data)
        self.save_hyperparameters({"model": model, "optim": optim, "eval_seed": int(eval_seed), "seed": int(seed),
                                   "use_ema": bool(use_ema), "data": data})
        self.flow = build_flow(model)
        set_compute = getattr(self.flow, "set_coupling_dtype", None)
        if set_compute is not None:  # before the EMA copy, which inherits the layout
            set_compute(None, channels_last=bool(optim.get("coupling_channels_last", False)))
        self.n_bits = int(self.flow.n_bits)
        ema_decay = optim.get("ema_decay")
        self.ema = EMA(self.flow, ema_decay) if ema_decay else None
        self.use_ema = bool(use_ema)
        self.eval_draws = 1  # dequantisation draws per test image in one test pass
        self.eval_draw_offset = 0  # number of the first draw (flowlab-eval runs one pass per draw)
        self.train_bpd = BitsPerDim()
        self.val_bpd = KeyedBitsPerDim()  # keyed by (image index, draw): DistributedSampler's repeats count once
        self.test_bpd = KeyedBitsPerDim()
        self._noise_gen: torch.Generator | None = None
        self._needs_init: bool | None = None
        self.skipped_steps = 0  # non-finite steps skipped in this run (saved in checkpoints)
        self._train_coupling_dtype: torch.dtype | None = None  # resolved on the device in on_fit_start
        self._skip_streak = 0
        self._step_loss: torch.Tensor | None = None
        self._step_skipped = False

    # ---- the model used for evaluation and pictures -----------------------------------------------
    @property
    def eval_flow(self) -> nn.Module:
        """The EMA weights when kept (and ``use_ema``), else the trained weights."""
        return self.ema.module if (self.ema is not None and self.use_ema) else self.flow

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.flow.parameters())

    # ---- dequantisation -------------------------------------------------------------------------
    def _train_noise_generator(self) -> torch.Generator:
        if self._noise_gen is None or self._noise_gen.device != self.device:
            seed = (int(self.hparams.seed) * 1_000_003 + 7919 * int(self.global_rank)
                    + int(self.global_step)) % (2**63 - 1)
            self._noise_gen = torch.Generator(device=self.device).manual_seed(seed)
        return self._noise_gen

    def dequantize_train(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh U[0, 1/2^n_bits) noise on the preprocessed batch (different on every process)."""
        xf = preprocess(x, self.n_bits)
        noise = torch.rand(xf.shape, generator=self._train_noise_generator(), dtype=xf.dtype, device=xf.device)
        return xf + noise / float(2**self.n_bits)

    def dequantize_eval(self, x: torch.Tensor, index: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """Noise determined by (eval seed, dataset index, draw): the same for any batch or process layout."""
        xf = preprocess(x, self.n_bits)
        u = eval_uniform(index.to(xf.device), xf.shape, seed=int(self.hparams.eval_seed), draw=draw, dtype=xf.dtype)
        return xf + u / float(2**self.n_bits)

    # ---- ActNorm's data-dependent initialisation --------------------------------------------------
    def _flow_needs_init(self) -> bool:
        if self._needs_init is None:
            self._needs_init = any(name.rsplit(".", 1)[-1] == "initialized" and not bool(buf.all())
                                   for name, buf in self.flow.named_buffers())
        return self._needs_init

    def _initialize_flow(self, x: torch.Tensor) -> None:
        """Explicit init pass on the first training batch, before the first optimiser step.

        Under DDP every process calls this at the same step; ActNorm reduces its statistics over
        all processes, so all replicas start identical.
        """
        init = getattr(self.flow, "initialize", None)
        if callable(init):
            init(x)
        else:  # a flow without initialize(): a no-grad forward in training mode does the same
            with torch.no_grad():
                self.flow.log_prob(x)
        self._needs_init = False
        if self.ema is not None:
            self.ema.reset(self.flow)

    # ---- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Under DDP Lightning warns that DistributedSampler repeats val/test images; KeyedBitsPerDim drops the
        # repeats by image index. Set here because this runs in every process (ddp_spawn's too).
        import warnings

        warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")

    def _resolve_coupling_dtype(self) -> torch.dtype | None:
        value = self.hparams.optim.get("coupling_dtype")
        if value in (None, "float32"):
            return None
        if value == "auto":
            return fast_coupling_dtype(self.device)
        if value not in COUPLING_DTYPES:
            raise ConfigError(f"optim.coupling_dtype={value!r} is unknown; allowed: auto, {', '.join(COUPLING_DTYPES)}")
        return COUPLING_DTYPES[value]

    def on_fit_start(self) -> None:
        self._train_coupling_dtype = self._resolve_coupling_dtype()
        self._noise_gen = None  # re-seed from (seed, rank, step): a resumed run continues with new noise
        self._needs_init = None
        self._skip_streak = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self.dequantize_train(batch[0])
        if self._flow_needs_init():
            self._initialize_flow(x)
        set_dtype = getattr(self.flow, "set_coupling_dtype", None)
        fast = self._train_coupling_dtype is not None and set_dtype is not None
        if fast:  # only inside the training forward: backward follows the dtypes autocast recorded
            set_dtype(self._train_coupling_dtype)
        try:
            bpd = self.flow.bits_per_dim(x)
        finally:
            if fast:
                set_dtype(None)
        loss = bpd.mean()
        self._step_loss = loss.detach()
        self.train_bpd(bpd.detach())
        self.log("train/bpd", self.train_bpd, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch, batch_idx: int, metric: KeyedBitsPerDim, draws: range) -> None:
        """Per-image bits/dim of a ``(x, y, index)`` batch into ``metric``, keyed by (index, draw)."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            got = f"has {len(batch)} item(s)" if isinstance(batch, (tuple, list)) else f"is a {type(batch).__name__}"
            raise ValueError(f"a validation/test batch must be (x, y, index), with index each image's position in its "
                             f"split (it keys the evaluation noise and counts every image once, also under DDP), but "
                             f"this one {got}: the dataset must yield (x, y, index), as flowlab.data's datasets do")
        x, index = batch[0], torch.as_tensor(batch[2], device=batch[0].device)
        flow = self.eval_flow
        for draw in draws:
            key = index.to(torch.int64) * _MAX_DRAWS + int(draw)
            metric.update(flow.bits_per_dim(self.dequantize_eval(x, index, draw)), key)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_bpd, range(1))
        self.log("val/bpd", self.val_bpd, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_bpd,
                        range(self.eval_draw_offset, self.eval_draw_offset + self.eval_draws))
        self.log("test/bpd", self.test_bpd, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        o = self.hparams.optim
        name = str(o.get("optimizer", "adam")).lower()
        if name not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        kwargs = {"lr": float(o["lr"]), "weight_decay": float(o.get("weight_decay") or 0.0)}
        if o.get("betas") is not None:
            kwargs["betas"] = tuple(float(b) for b in o["betas"])
        if o.get("fused"):  # one kernel per step; Adamax has no fused form, its multi-tensor one is next best
            kwargs["fused" if name == "adam" else "foreach"] = True
        optimizer = OPTIMIZERS[name](self.flow.parameters(), **kwargs)
        warmup = int(o.get("warmup_steps") or 0)
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the global gradient norm to ``optim.grad_clip`` and log the norm before clipping."""
        clip = self.hparams.optim.get("grad_clip")
        params = [p for p in self.flow.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, float(clip) if clip else math.inf)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self._skip_if_nonfinite(norm, params)

    def _skip_if_nonfinite(self, norm: torch.Tensor, params: list) -> None:
        """Drop this step's gradients when the loss or the gradient norm is not finite on any process.

        Adam/Adamax leave a parameter without a gradient untouched (weights, moments, step count), so
        the step is a no-op; every process takes the same decision (reduced), keeping replicas equal.
        """
        finite = torch.isfinite(norm)
        if self._step_loss is not None:
            finite = finite & torch.isfinite(self._step_loss)
        ok = bool(finite)  # the one host sync per step
        if self._trainer is not None:
            ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        self._step_skipped = not ok
        if ok:
            self._skip_streak = 0
        else:
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self._skip_streak += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        self._step_skipped = False
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._step_skipped:
            self.ema.update(self.flow)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        limit = self.hparams.optim.get("max_consecutive_skips")
        if limit and self._skip_streak >= int(limit):
            from flowlab.lit.monitors import stop_diverged

            stop_diverged(self.trainer, self._skip_streak, self.skipped_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = int(self.skipped_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    # ---- rebuilding from a checkpoint -----------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping, strict: bool = True) -> "FlowModule":
        """A module rebuilt from a loaded checkpoint dict (see :func:`flowlab.lit.checkpoint.load_checkpoint`)."""
        hp = dict(checkpoint["hyper_parameters"])
        model = hp.get("model")
        if (isinstance(model, Mapping) and str(model.get("_target_", "")).endswith(".Glow")
                and model.get("permutation") == "nxn" and "nxn_conv1x1" not in model):
            # written before the n×n conv's inner 1×1 became a switch: it was always the LU form
            hp["model"] = {**model, "nxn_conv1x1": "lu"}
        module = cls(**{k: hp[k] for k in ("model", "optim", "eval_seed", "seed", "use_ema", "data") if k in hp})
        try:
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
        except RuntimeError as e:  # one line that names the keys (PyTorch's message can run to pages)
            raise RuntimeError(_mismatched_keys(module.state_dict(), checkpoint["state_dict"]) or str(e)) from e
        return module


def _mismatched_keys(expected: Mapping, found: Mapping, show: int = 8) -> str:
    """``missing keys: a, b; unexpected keys: c; shape mismatches: d (2, 3) in the file, (4, 3) in the model``."""
    def listed(title: str, items: list[str]) -> str:
        more = f" (and {len(items) - show} more)" if len(items) > show else ""
        return f"{title} ({len(items)}): {', '.join(items[:show])}{more}"

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    parts = [listed(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatches", shapes)) if i]
    return "; ".join(parts)
