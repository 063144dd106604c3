"""The LightningModule: trains any flow with flowlab's contract by maximum likelihood.

The flow, the optimizer and the learning-rate schedule come from plain-dict ``_target_`` configs,
saved in the checkpoint: ``FlowModule.from_checkpoint`` rebuilds it from the file alone, which loads
with ``torch.load(weights_only=True)``, and each ``_target_`` must name a class of an allowed package
(checkpoints are data, not code). The constructor checks every argument. Batches are
``(x, y, index)``: training adds fresh noise per step and process; validation/test noise is a fixed
function of (eval seed, image index, draw) and every image counts once, whatever the batching or DDP.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from flowlab.data.transforms import preprocess
from flowlab.errors import ConfigError, check_bool, check_choice, check_int, check_number
from flowlab.flows.precision import fast_coupling_dtype
from flowlab.lit.ema import EMA
from flowlab.lit.metrics import KeyedBitsPerDim
from flowlab.lit.noise import eval_uniform

__all__ = ["FlowModule", "LinearWarmup", "build_flow", "ALLOWED_MODEL_PACKAGES"]

#: the packages whose classes a ``_target_`` may name, per config (checkpoints are data, not code)
ALLOWED_MODEL_PACKAGES = ("flowlab.flows",)
ALLOWED_OPTIMIZER_PACKAGES = ("torch.optim",)
ALLOWED_SCHEDULER_PACKAGES = ("torch.optim.lr_scheduler", "flowlab.lit.module")
OPTIM_KEYS = ("optimizer", "scheduler", "grad_clip", "ema_decay", "max_consecutive_skips", "coupling_dtype",
              "coupling_channels_last")
_MAX_DRAWS = 2**20  # evaluation metric key = image index * _MAX_DRAWS + draw
#: optim.coupling_dtype: a dtype by name ("auto" resolves on the device: flowlab.flows.precision)
COUPLING_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


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


def _config_class(cfg: Any, key: str, packages: tuple[str, ...], base: type, example: str,
                  partial: bool = False) -> tuple[type, dict]:
    """``(class, arguments)`` of a ``{"_target_": ..., **arguments}`` config whose class is a ``base`` of one of
    ``packages`` (``_partial_`` allowed when ``partial``); ConfigError otherwise, and for any other Hydra
    directive among the arguments."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{key}={cfg!r} is not allowed: give a config with a _target_, e.g. {example}")
    cfg = _plain(cfg)
    target = cfg.pop("_target_", None)
    if partial:
        cfg.pop("_partial_", None)
    module_name, _, cls_name = target.rpartition(".") if isinstance(target, str) else ("", "", "")
    if module_name not in packages:
        raise ConfigError(f"{key}._target_={target!r} is not allowed: name a class of {' or '.join(packages)}, "
                          f"e.g. {example}")

    def reject_directives(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                if k.startswith("_") and k.endswith("_"):
                    raise ConfigError(f"{where}.{k} is not allowed: a config here holds _target_ and the class's "
                                      "arguments")
                reject_directives(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                reject_directives(v, f"{where}[{i}]")

    reject_directives(cfg, key)
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_={target!r} is not a {base.__name__} class of {module_name}")
    return cls, cfg


def _call(key: str, cls: type, kwargs: dict, *args):
    """``cls(*args, **kwargs)``; the class's refusal of an argument (TypeError, ValueError) as a ConfigError."""
    try:
        return cls(*args, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{key}: {cls.__name__}({shown}) is not allowed: {e}") from e


def build_flow(model_cfg: Mapping) -> nn.Module:
    """Instantiate a flow from ``{"_target_": "flowlab.flows.Glow", **kwargs}``.

    Only classes of :data:`ALLOWED_MODEL_PACKAGES` may be named and no argument may itself be a
    ``_target_``: a config (or a checkpoint's hyper-parameters) can choose a model, never run code.
    """
    cls, kwargs = _config_class(model_cfg, "model", ALLOWED_MODEL_PACKAGES, nn.Module, "flowlab.flows.Glow")
    return _call("model", cls, kwargs)


def _partial(cfg: Any, key: str, packages: tuple[str, ...], base: type, example: str):
    """The optimizer or scheduler class a config names, as a partial (``_partial_: true`` is implied): the
    parameters, or the optimizer, are given when it is made."""
    return functools.partial(_call, key, *_config_class(cfg, key, packages, base, example, partial=True))


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """Linear learning-rate warm-up, stepped every optimiser step: ``lr · min(1, (step + 1) / warmup_steps)``,
    from ``lr / warmup_steps`` at the first step to ``lr`` from step ``warmup_steps − 1`` on (openai/glow's)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int):
        check_int("optim.scheduler.warmup_steps", warmup_steps, 1)
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def _optim_of_old_checkpoints(optim: dict) -> dict:
    """``optim`` as saved before the optimizer and schedule were ``_target_`` configs (``optimizer: adam``,
    ``lr``, ``betas``, ``weight_decay``, ``fused``, ``warmup_steps``), in today's form."""
    o = dict(optim)
    name = str(o.pop("optimizer")).lower()
    new = {"_target_": {"adam": "torch.optim.Adam", "adamax": "torch.optim.Adamax"}.get(name, name), "_partial_": True,
           "lr": o.pop("lr", 1e-3)}
    for k in ("betas", "weight_decay"):
        if o.get(k) is not None:
            new[k] = o[k]
        o.pop(k, None)
    if o.pop("fused", False):
        new["fused" if name == "adam" else "foreach"] = True
    warmup = int(o.pop("warmup_steps", 0) or 0)
    return {**o, "optimizer": new, "scheduler": {"_target_": "flowlab.lit.module.LinearWarmup", "_partial_": True,
                                                 "warmup_steps": warmup} if warmup > 0 else None}


class FlowModule(pl.LightningModule):
    """Maximum-likelihood training of a flow; loss = mean bits/dim of the dequantised batch.

    Args:
        model: the flow's config (``_target_`` + constructor arguments), a plain dict.
        optim: ``optimizer`` (``{"_target_": "torch.optim.Adam", "lr": ..., ...}``, a class of torch.optim),
            ``scheduler`` (a class of torch.optim.lr_scheduler or :class:`LinearWarmup`, stepped every
            optimiser step; None/absent: constant lr), ``grad_clip`` (max global gradient norm or None),
            ``ema_decay`` (None: off), ``max_consecutive_skips`` (stop after this many non-finite steps in a
            row; None/absent: never), ``coupling_dtype`` (auto | bfloat16 | float32: the coupling
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
        if not isinstance(optim, dict):
            raise ConfigError(f"optim={optim!r} is not allowed: give the optimiser settings ({', '.join(OPTIM_KEYS)})")
        unknown = sorted(set(optim) - set(OPTIM_KEYS))
        if unknown:
            raise ConfigError(f"optim.{unknown[0]}={optim[unknown[0]]!r} is not a setting; optim takes "
                              f"{', '.join(OPTIM_KEYS)} (the optimiser's own arguments go under optim.optimizer)")
        self.save_hyperparameters({"model": model, "optim": optim, "eval_seed": check_int("eval.seed", eval_seed),
                                   "seed": check_int("seed", seed, 0), "use_ema": check_bool("eval.use_ema", use_ema),
                                   "data": data})
        self._make_optimizer = _partial(optim.get("optimizer"), "optim.optimizer", ALLOWED_OPTIMIZER_PACKAGES,
                                        torch.optim.Optimizer, "torch.optim.Adam (optim/optimizer=adam)")
        self._make_scheduler = None if optim.get("scheduler") is None else _partial(
            optim["scheduler"], "optim.scheduler", ALLOWED_SCHEDULER_PACKAGES, torch.optim.lr_scheduler.LRScheduler,
            "flowlab.lit.module.LinearWarmup")
        probe = self._make_optimizer([torch.zeros(1, requires_grad=True)])  # the classes check their arguments
        if self._make_scheduler is not None:
            self._make_scheduler(probe)
        check_number("optim.grad_clip", optim.get("grad_clip"), 0, low_open=True, allow_none=True)
        check_int("optim.max_consecutive_skips", optim.get("max_consecutive_skips"), 1, allow_none=True)
        if optim.get("coupling_dtype") is not None:  # None: float32
            check_choice("optim.coupling_dtype", optim["coupling_dtype"], ("auto", *COUPLING_DTYPES))
        channels_last = check_bool("optim.coupling_channels_last", optim.get("coupling_channels_last", False))
        self.flow = build_flow(model)
        set_compute = getattr(self.flow, "set_coupling_dtype", None)
        if set_compute is not None:  # before the EMA copy, which inherits the layout
            set_compute(None, channels_last=channels_last)
        self.n_bits = int(self.flow.n_bits)
        ema_decay = optim.get("ema_decay")
        self.ema = None if ema_decay is None else EMA(self.flow, ema_decay, key="optim.ema_decay")
        self.use_ema = use_ema
        self.eval_draws = 1  # dequantisation draws per test image in one test pass
        self.eval_draw_offset = 0  # number of the first draw (flowlab-eval runs one pass per draw)
        self.train_bpd = MeanMetric(nan_strategy="disable").set_dtype(torch.float64)  # float64 sums; NaN stays NaN
        self.val_bpd = KeyedBitsPerDim()  # keyed by (image index, draw): DistributedSampler's repeats count once
        self.test_bpd = KeyedBitsPerDim()
        # a class-conditional flow reports -log2 p(x|y)/D as */bpd_cond (never */bpd) and, with a classifier on its
        # top latent (model.y_weight > 0), the class accuracy */y_acc; the loss is Glow's bits_x + y_weight · bits_y
        self.conditional = bool(getattr(self.flow, "y_condition", False))
        self.bpd_name = "bpd_cond" if self.conditional else "bpd"
        self.classifies = self.conditional and getattr(self.flow.top_prior, "classifier", None) is not None
        self.train_acc, self.val_acc, self.test_acc = MeanMetric(), KeyedBitsPerDim(), KeyedBitsPerDim()
        self._noise_gen: torch.Generator | None = None
        self._needs_init: bool | None = None
        self.skipped_steps = 0  # non-finite steps skipped in this run (saved in checkpoints)
        self._train_coupling_dtype: torch.dtype | None = None  # resolved on the device in on_fit_start
        self._skip_streak = 0
        self._step_loss: torch.Tensor | None = None
        self._step_skipped = False

    #: read by Lightning's ThroughputMonitor; None: FLOPs are not counted
    flops_per_batch = None

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
        """Seeded from (seed, rank, step) at every step: a resumed run draws the noise an uninterrupted one would."""
        if self._noise_gen is None or self._noise_gen.device != self.device:
            self._noise_gen = torch.Generator(device=self.device)
        seed = ((int(self.hparams.seed) * 65_537 + int(self.global_rank)) << 32) + int(self.global_step)
        return self._noise_gen.manual_seed(seed % (2**63 - 1))

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
        if value == "auto":
            return fast_coupling_dtype(self.device)
        return COUPLING_DTYPES[value or "float32"]

    def on_fit_start(self) -> None:
        self._train_coupling_dtype = self._resolve_coupling_dtype()
        self._needs_init = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self.dequantize_train(batch[0])
        if self._flow_needs_init():
            self._initialize_flow(x)
        set_dtype = getattr(self.flow, "set_coupling_dtype", None)
        fast = self._train_coupling_dtype is not None and set_dtype is not None
        if fast:  # only inside the training forward: backward follows the dtypes autocast recorded
            set_dtype(self._train_coupling_dtype)
        try:
            bpd, logits = self._bits(self.flow, x, batch[1])
        finally:
            if fast:
                set_dtype(None)
        loss = bpd.mean()
        if logits is not None:  # openai/glow: bits_y = cross-entropy / ln 2 per image, weighted by y_weight
            loss = loss + self.flow.y_weight * nn.functional.cross_entropy(logits.float(), batch[1]) / math.log(2)
            self.train_acc((logits.argmax(1) == batch[1]).float())
            self.log("train/y_acc", self.train_acc, on_step=True, on_epoch=False)
        self._step_loss = loss.detach()
        self.train_bpd(bpd.detach())
        self.log(f"train/{self.bpd_name}", self.train_bpd, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _bits(self, flow: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bits/dim [B] (given the labels ``y`` for a class-conditional flow) and its class logits (or None)."""
        return flow.bits_and_logits(x, y) if self.conditional else (flow.bits_per_dim(x), None)

    def _eval_step(self, batch, batch_idx: int, metric: KeyedBitsPerDim, draws: range,
                   accuracy: KeyedBitsPerDim | None = None) -> None:
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
            bpd, logits = self._bits(flow, self.dequantize_eval(x, index, draw), batch[1])
            metric.update(bpd, key)
            if logits is not None:
                accuracy.update((logits.argmax(1) == batch[1]).double(), key)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_bpd, range(1), self.val_acc)
        self.log(f"val/{self.bpd_name}", self.val_bpd, on_step=False, on_epoch=True, prog_bar=True)
        if self.classifies:
            self.log("val/y_acc", self.val_acc, on_step=False, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_bpd,
                        range(self.eval_draw_offset, self.eval_draw_offset + self.eval_draws), self.test_acc)
        self.log(f"test/{self.bpd_name}", self.test_bpd, on_step=False, on_epoch=True)
        if self.classifies:
            self.log("test/y_acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = self._make_optimizer(self.flow.parameters())
        if self._make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._make_scheduler(optimizer),
                                                         "interval": "step", "frequency": 1, "name": "lr"}}

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
        checkpoint["skip_streak"] = int(self._skip_streak)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self._skip_streak = int(checkpoint.get("skip_streak", 0))
        from flowlab.lit.checkpoint import continue_epoch

        continue_epoch(checkpoint)  # a run stopped by max_steps goes on where an uninterrupted one would

    # ---- rebuilding from a checkpoint -----------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping, strict: bool = True) -> FlowModule:
        """A module rebuilt from a loaded checkpoint dict (see :func:`flowlab.lit.checkpoint.load_checkpoint`)."""
        hp = dict(checkpoint["hyper_parameters"])
        model = hp.get("model")
        if (isinstance(model, Mapping) and str(model.get("_target_", "")).endswith(".Glow")
                and model.get("permutation") == "nxn" and "nxn_conv1x1" not in model):
            # written before the n×n conv's inner 1×1 became a switch: it was always the LU form
            hp["model"] = {**model, "nxn_conv1x1": "lu"}
        if isinstance(hp.get("optim"), Mapping) and isinstance(hp["optim"].get("optimizer"), str):
            hp["optim"] = _optim_of_old_checkpoints(hp["optim"])
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
