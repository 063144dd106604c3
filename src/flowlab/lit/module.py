"""The LightningModule: trains a flow by maximum likelihood (with an optional weight average) and evaluates it exactly.

Model, optimizer and schedule are ``_target_`` configs of allowed packages, kept as plain data in the checkpoint:
``FlowModule.from_checkpoint`` rebuilds the module from a file that loads with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from flowlab.data.transforms import dequantize, eval_uniform, preprocess
from flowlab.errors import ConfigError, check_bool, check_choice, check_int, check_number
from flowlab.flows import MultiScaleFlow, fast_coupling_dtype
from flowlab.lit.checkpoint import continue_epoch
from flowlab.lit.metrics import KeyedBitsPerDim
from flowlab.lit.monitors import stop_diverged

OPTIM_KEYS = ("optimizer", "scheduler", "grad_clip", "ema_decay", "max_consecutive_skips", "coupling_dtype",
              "coupling_channels_last")
_MAX_DRAWS = 2**20  # evaluation metric key = image index * _MAX_DRAWS + draw
COUPLING_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # optim.coupling_dtype; "auto": fast_coupling_dtype


def _plain(obj: Any) -> Any:
    """A deep copy made of dict/list/str/int/float/bool/None only (what weights_only checkpoints accept)."""
    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"not a plain config value: {obj!r} ({type(obj).__name__})")


def _refuse_directives(value: Any, where: str) -> None:
    """ConfigError for a Hydra directive (``_target_``, ``_partial_``, ...) anywhere among a class's arguments."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        at = f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]"
        if isinstance(k, str) and k.startswith("_") and k.endswith("_"):
            raise ConfigError(f"{at} is not allowed: a config here holds _target_ and the class's arguments")
        _refuse_directives(v, at)


def _call(key: str, cls: type, kwargs: dict, *args):
    """``cls(*args, **kwargs)``; the class's refusal of an argument (TypeError, ValueError) as a ConfigError."""
    try:
        return cls(*args, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{key}: {cls.__name__}({shown}) is not allowed: {e}") from e


def _factory(cfg: Any, key: str, packages: tuple[str, ...], base: type, example: str, partial: bool = False):
    """A partial making the class a ``{"_target_": ..., **arguments}`` config names, which must be a ``base`` of one
    of ``packages`` (``_partial_`` is allowed, and implied, when ``partial``); ConfigError otherwise."""
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
    _refuse_directives(cfg, key)
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_={target!r} is not a {base.__name__} class of {module_name}")
    return functools.partial(_call, key, cls, cfg)


def build_flow(model_cfg: Mapping) -> MultiScaleFlow:
    """The flow of ``{"_target_": "flowlab.flows.Glow", **kwargs}``: a config chooses a flow class, never code to run."""
    return _factory(model_cfg, "model", ("flowlab.flows",), MultiScaleFlow, "flowlab.flows.Glow")()


def bpd_name_of(model_cfg: Mapping) -> str:
    """The name of a model's bits/dim metrics (``*/bpd``): ``bpd_cond`` (−log₂ p(x|y)/D) when class-conditional."""
    return "bpd_cond" if model_cfg.get("y_condition") else "bpd"


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """Linear learning-rate warm-up, stepped every optimiser step: ``lr · min(1, (step + 1) / warmup_steps)`` (openai/glow's)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int):
        check_int("optim.scheduler.warmup_steps", warmup_steps, 1)
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def _optim_of_old_checkpoints(optim: dict) -> dict:
    """``optim`` as saved before the optimizer and schedule were ``_target_`` configs, in today's form."""
    o = dict(optim)
    name = str(o.pop("optimizer")).lower()
    new = {"_target_": {"adam": "torch.optim.Adam", "adamax": "torch.optim.Adamax"}.get(name, name), "_partial_": True,
           "lr": o.pop("lr", 1e-3)}
    new.update({k: v for k in ("betas", "weight_decay") if (v := o.pop(k, None)) is not None})
    if o.pop("fused", False):
        new["fused" if name == "adam" else "foreach"] = True
    warmup = int(o.pop("warmup_steps", 0) or 0)
    scheduler = {"_target_": "flowlab.lit.module.LinearWarmup", "_partial_": True, "warmup_steps": warmup}
    return {**o, "optimizer": new, "scheduler": scheduler if warmup > 0 else None}


class EMA(nn.Module):
    """A frozen copy of a model whose floating-point weights follow ``shadow ← d · shadow + (1 − d) · weights`` after
    every optimiser step, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (so the initial weights do
    not dominate early on); buffers (ActNorm's ``initialized``, fixed permutations) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float, key: str = "decay"):
        super().__init__()
        self.decay = check_number(key, decay, 0.0, 1.0, low_open=True, high_open=True)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self._n = 0  # host-side mirror of num_updates: no device sync per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n = int(self.num_updates)

    def train(self, mode: bool = True) -> EMA:  # the copy always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self

    def reset(self, model: nn.Module) -> None:
        """Make the average an exact copy of ``model`` (after ActNorm's data-dependent initialisation)."""
        self.module.load_state_dict(model.state_dict())
        self.num_updates.zero_()
        self._n = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1.0 + self._n) / (10.0 + self._n))
        shadow = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        current = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        if shadow:
            torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for b_shadow, b in zip(self.module.buffers(), model.buffers()):
            b_shadow.copy_(b)
        self.num_updates += 1
        self._n += 1


class FlowModule(pl.LightningModule):
    """Maximum-likelihood training of a flow (loss: mean bits/dim of the dequantised batch) on ``(x, y, index)``
    batches; ``model`` and ``optim`` are conf/train.yaml's configs. Training noise is fresh per step and process;
    evaluation noise is a fixed function of (``eval_seed``, image index, draw) and every image counts once."""

    def __init__(self, model: Mapping, optim: Mapping, *, eval_seed: int, seed: int, use_ema: bool,
                 data: Mapping | None = None):
        super().__init__()
        model, optim, data = _plain(model), _plain(optim), _plain(data)
        if not isinstance(optim, dict):
            raise ConfigError(f"optim={optim!r} is not allowed: give the optimiser settings ({', '.join(OPTIM_KEYS)})")
        unknown = sorted(set(optim) - set(OPTIM_KEYS))
        if unknown:
            raise ConfigError(f"optim.{unknown[0]}={optim[unknown[0]]!r} is not a setting; optim takes "
                              f"{', '.join(OPTIM_KEYS)} (the optimiser's own arguments go under optim.optimizer)")
        self.save_hyperparameters({"model": model, "optim": optim, "eval_seed": check_int("eval.seed", eval_seed),
                                   "seed": check_int("seed", seed, 0), "use_ema": check_bool("eval.use_ema", use_ema),
                                   "data": data})
        self._make_optimizer = _factory(optim.get("optimizer"), "optim.optimizer", ("torch.optim",), torch.optim.Optimizer,
                                        "torch.optim.Adam (optim/optimizer=adam)", partial=True)
        self._make_scheduler = None if optim.get("scheduler") is None else _factory(
            optim["scheduler"], "optim.scheduler", ("torch.optim.lr_scheduler", "flowlab.lit.module"),
            torch.optim.lr_scheduler.LRScheduler, "flowlab.lit.module.LinearWarmup", partial=True)
        probe = self._make_optimizer([torch.zeros(1, requires_grad=True)])  # the classes check their arguments
        if self._make_scheduler is not None:
            self._make_scheduler(probe)
        check_number("optim.grad_clip", optim.get("grad_clip"), 0, low_open=True, allow_none=True)
        check_int("optim.max_consecutive_skips", optim.get("max_consecutive_skips"), 1, allow_none=True)
        if optim.get("coupling_dtype") is not None:  # None: float32
            check_choice("optim.coupling_dtype", optim["coupling_dtype"], ("auto", *COUPLING_DTYPES))
        channels_last = check_bool("optim.coupling_channels_last", optim.get("coupling_channels_last", False))
        self.flow = build_flow(model)
        self.flow.set_coupling_dtype(None, channels_last=channels_last)  # before the EMA copy, which inherits the layout
        self.n_bits = int(self.flow.n_bits)
        self.ema = None if optim.get("ema_decay") is None else EMA(self.flow, optim["ema_decay"], key="optim.ema_decay")
        self.use_ema = use_ema
        self.eval_draws, self.eval_draw_offset = 1, 0  # the test pass's dequantisation draws (flowlab-eval sets them)
        self.train_bpd = MeanMetric(nan_strategy="disable").set_dtype(torch.float64)  # float64 sums; NaN stays NaN
        self.val_bpd, self.test_bpd = KeyedBitsPerDim(), KeyedBitsPerDim()  # keyed by (image index, draw)
        self.conditional = bool(self.flow.y_condition)
        self.bpd_name = bpd_name_of(model)
        self.classifies = self.conditional and self.flow.y_weight > 0  # a classifier on the top latent: */y_acc
        self.train_acc, self.val_acc, self.test_acc = MeanMetric(), KeyedBitsPerDim(), KeyedBitsPerDim()
        self._noise_gen: torch.Generator | None = None
        self._needs_init: bool | None = None
        self.skipped_steps = 0  # non-finite steps skipped in this run (saved in checkpoints)
        self._skip_streak = 0
        self._train_coupling_dtype: torch.dtype | None = None  # resolved on the device in on_fit_start
        self._step_loss: torch.Tensor | None = None

    #: read by Lightning's ThroughputMonitor (which warns when it is missing); None: FLOPs are not counted
    flops_per_batch = None

    @property
    def eval_flow(self) -> nn.Module:
        """The EMA weights when kept (and ``use_ema``), else the trained weights."""
        return self.ema.module if (self.ema is not None and self.use_ema) else self.flow

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.flow.parameters())

    def _train_noise_generator(self) -> torch.Generator:
        """Seeded from (seed, rank, step) at every step: a resumed run draws the noise an uninterrupted one would."""
        if self._noise_gen is None or self._noise_gen.device != self.device:
            self._noise_gen = torch.Generator(device=self.device)
        seed = ((int(self.hparams.seed) * 65_537 + int(self.global_rank)) << 32) + int(self.global_step)
        return self._noise_gen.manual_seed(seed % (2**63 - 1))

    def dequantize_train(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh U[0, 1/2^n_bits) noise on the preprocessed batch (different on every process)."""
        return dequantize(preprocess(x, self.n_bits), self.n_bits, self._train_noise_generator())

    def dequantize_eval(self, x: torch.Tensor, index: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """Noise determined by (eval seed, dataset index, draw): the same for any batch or process layout."""
        xf = preprocess(x, self.n_bits)
        u = eval_uniform(index.to(xf.device), xf.shape, seed=int(self.hparams.eval_seed), draw=draw, dtype=xf.dtype)
        return dequantize(xf, self.n_bits, u=u)

    def _initialize_flow(self, x: torch.Tensor) -> None:
        """ActNorm's data-dependent initialisation on the first training batch (reduced over DDP processes)."""
        self.flow.initialize(x)
        self._needs_init = False
        if self.ema is not None:
            self.ema.reset(self.flow)

    def setup(self, stage: str) -> None:
        # KeyedBitsPerDim drops DistributedSampler's val/test repeats; set in every process (ddp_spawn's too)
        warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")

    def on_fit_start(self) -> None:
        value = self.hparams.optim.get("coupling_dtype")
        self._train_coupling_dtype = fast_coupling_dtype(self.device) if value == "auto" else COUPLING_DTYPES[value or "float32"]
        self._needs_init = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self.dequantize_train(batch[0])
        if self._needs_init is None:
            self._needs_init = any(name.rsplit(".", 1)[-1] == "initialized" and not bool(buf.all())
                                   for name, buf in self.flow.named_buffers())
        if self._needs_init:
            self._initialize_flow(x)
        self.flow.set_coupling_dtype(self._train_coupling_dtype)  # the forward only: backward follows autocast's record
        try:
            bpd, logits = self._bits(self.flow, x, batch[1])
        finally:
            self.flow.set_coupling_dtype(None)
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
        x, y, index = batch[0], batch[1], torch.as_tensor(batch[2], device=batch[0].device)
        for draw in draws:
            key = index.to(torch.int64) * _MAX_DRAWS + int(draw)
            bpd, logits = self._bits(self.eval_flow, self.dequantize_eval(x, index, draw), y)
            metric.update(bpd, key)
            if logits is not None:
                accuracy.update((logits.argmax(1) == y).double(), key)

    def _evaluate(self, stage: str, batch, draws: range) -> None:
        bpd, accuracy = getattr(self, f"{stage}_bpd"), getattr(self, f"{stage}_acc")
        self._eval_step(batch, 0, bpd, draws, accuracy)
        self.log(f"{stage}/{self.bpd_name}", bpd, on_step=False, on_epoch=True, prog_bar=stage == "val")
        if self.classifies:
            self.log(f"{stage}/y_acc", accuracy, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate("val", batch, range(1))

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate("test", batch, range(self.eval_draw_offset, self.eval_draw_offset + self.eval_draws))

    def configure_optimizers(self):
        optimizer = self._make_optimizer(self.flow.parameters())
        if self._make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self._make_scheduler(optimizer), "interval": "step", "name": "lr"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the global gradient norm to ``optim.grad_clip`` (logged before clipping); drop the step's gradients when
        the loss or that norm is not finite on any process (Adam/Adamax then leave weights and moments untouched).
        One host sync per step; the decision is reduced over processes, keeping replicas equal."""
        params = [p for p in self.flow.parameters() if p.grad is not None]
        if not params:
            return
        clip = self.hparams.optim.get("grad_clip")
        norm = torch.nn.utils.clip_grad_norm_(params, float(clip) if clip else math.inf)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        finite = torch.isfinite(norm) if self._step_loss is None else torch.isfinite(norm) & torch.isfinite(self._step_loss)
        ok = bool(finite)
        if self._trainer is not None:
            ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        self._skip_streak = 0 if ok else self._skip_streak + 1
        if not ok:
            for p in params:
                p.grad = None
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self._skip_streak == 0:  # the step was applied
            self.ema.update(self.flow)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        limit = self.hparams.optim.get("max_consecutive_skips")
        if limit and self._skip_streak >= int(limit):
            stop_diverged(self.trainer, self._skip_streak, self.skipped_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(skipped_steps=int(self.skipped_steps), skip_streak=int(self._skip_streak))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self._skip_streak = int(checkpoint.get("skip_streak", 0))
        continue_epoch(checkpoint)  # a run stopped by max_steps goes on where an uninterrupted one would

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> FlowModule:
        """A module rebuilt from a loaded checkpoint dict (see :func:`flowlab.lit.checkpoint.load_checkpoint`)."""
        hp = dict(checkpoint["hyper_parameters"])
        model = hp.get("model")
        if (isinstance(model, Mapping) and str(model.get("_target_", "")).endswith(".Glow")
                and model.get("permutation") == "nxn" and "nxn_conv1x1" not in model):
            hp["model"] = {**model, "nxn_conv1x1": "lu"}  # written when the n×n conv's inner 1×1 was always LU
        if isinstance(hp.get("optim"), Mapping) and isinstance(hp["optim"].get("optimizer"), str):
            hp["optim"] = _optim_of_old_checkpoints(hp["optim"])
        module = cls(**{k: hp[k] for k in ("model", "optim", "eval_seed", "seed", "use_ema", "data") if k in hp})
        try:
            module.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as e:  # one line that names the keys (PyTorch's message can run to pages)
            raise RuntimeError(_mismatched_keys(module.state_dict(), checkpoint["state_dict"]) or str(e)) from e
        return module


def _mismatched_keys(expected: Mapping, found: Mapping) -> str:
    """``missing keys (n): a, b; unexpected keys (n): c; shape mismatches (n): d (2, 3) in the file, (4, 3) in the model``."""
    shapes = [f"{k} {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    parts = []
    for title, items in (("missing keys", [k for k in expected if k not in found]),
                         ("unexpected keys", [k for k in found if k not in expected]), ("shape mismatches", shapes)):
        if items:
            more = f" (and {len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{title} ({len(items)}): {', '.join(items[:8])}{more}")
    return "; ".join(parts)
