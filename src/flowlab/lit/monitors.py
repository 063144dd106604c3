"""Numerical health of a training run: what happens to non-finite steps, and the invertibility monitor.

Non-finite steps (the mechanism lives in :class:`flowlab.lit.module.FlowModule`): a step whose loss
or global gradient norm is not finite is skipped — its gradients are dropped, so the optimiser
leaves the weights *and* its own state (Adam's moments, step count) untouched — and counted as
``train/skipped_steps``. After ``optim.max_consecutive_skips`` skipped steps in a row the run
stops: :func:`stop_diverged` writes the weights as they were after the last applied step (skipped
steps do not change them) and raises :class:`TrainingDiverged`, which the command line prints as one
``error: ...`` line (exit 2). The weights are checked on fixed validation images first: when they give
a finite loss the file is ``<checkpoints>/last_good_step_<step>.ckpt``; when they already give a
non-finite one it is ``diverged_step_<step>.ckpt`` and the message names the newest ``step_*.ckpt``
whose weights give a finite loss, to continue from.

:class:`InvertibilityMonitor`, a callback: every N optimiser steps, the largest reconstruction
error ``max|decode(encode(x)) − x|`` of the trained weights on a fixed batch (logged as
``train/recon_error``), and the health of every learned mixing matrix (the 1×1 weight of
Glow's convolution, the folded weight of the paper's n×n convolution, the 1×1 part of Emerging
convolutions): the largest ``|log|det W||`` and condition number are logged, and a layer beyond
the bounds is named in a warning, as is a reconstruction error above the threshold.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from flowlab.errors import UserError, check_int, check_number
from flowlab.lit.images import eval_mode, fixed_images, reconstruct

__all__ = ["TrainingDiverged", "InvertibilityWarning", "InvertibilityMonitor", "stop_diverged", "checkpoint_dir",
           "mixing_weights"]


class TrainingDiverged(UserError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class InvertibilityWarning(UserWarning):
    """The flow is losing numerical invertibility (reconstruction error or a near-singular weight)."""


# ---- non-finite steps ------------------------------------------------------------------------------------------
def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where the run's checkpoints go: the first ModelCheckpoint's folder, else ``<default_root_dir>/checkpoints``."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def _finite_loss(module, batch) -> bool:
    """Whether ``module``'s trained weights give a finite loss on ``batch`` (fixed images, evaluation noise)."""
    x, index = batch
    with eval_mode(module.flow):
        x = module.dequantize_eval(x.to(module.device), index.to(module.device))
        return bool(torch.isfinite(module.flow.bits_per_dim(x)).all())


def _newest_finite(folder: Path, before: int, batch) -> Path | None:
    """The newest ``step_*.ckpt`` in ``folder`` from before step ``before`` whose weights give a finite loss."""
    from flowlab.errors import CheckpointError
    from flowlab.lit.checkpoint import module_from_checkpoint

    for path in sorted(folder.glob("step_*.ckpt"), reverse=True):
        try:
            module, ckpt, _ = module_from_checkpoint(path)
        except CheckpointError:
            continue
        if int(ckpt.get("global_step", before)) < before and _finite_loss(module, batch):
            return path
    return None


def stop_diverged(trainer: pl.Trainer, streak: int, total: int) -> None:
    """Save the state training stopped in, named by whether its weights give a finite loss, and raise
    :class:`TrainingDiverged` (on every process, at the same step)."""
    step = int(trainer.global_step)
    good = step - streak
    batch = fixed_images(trainer.datamodule, 8) if trainer.datamodule is not None else None
    finite = batch is None or _finite_loss(trainer.lightning_module, batch)
    path = checkpoint_dir(trainer) / f"{'last_good' if finite else 'diverged'}_step_{step:07d}.ckpt"
    tmp = path.with_name(f".{path.name}.tmp")
    saved = True
    try:
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # collective: every process calls it
        if trainer.is_global_zero:
            os.replace(tmp, path)  # never a half-written file under the final name
    except Exception as e:  # noqa: BLE001 - the message below must still reach the user
        saved = False
        error = f"{type(e).__name__}: {e}"
    where = (f"The weights of the last good step (step {good}; skipped steps leave weights and optimiser state "
             f"unchanged) are in {path}" if saved else f"Saving the last good state to {path} failed ({error})")
    if not finite:
        older = _newest_finite(path.parent, good, batch)
        where = (f"The weights of step {good} already give a non-finite loss on validation images ("
                 + (f"kept in {path} for inspection" if saved else f"saving them to {path} failed: {error}") + "); "
                 + (f"the newest saved weights that give a finite loss are in {older}" if older else
                    "no saved checkpoint of this run gives a finite loss"))
    go_on = f"Continue from that state with ckpt_path={path} and" if finite else (
        f"Continue from them with ckpt_path={older} and" if older else "Start a new run with")
    raise TrainingDiverged(
        f"training stopped at step {step}: the last {streak} optimiser steps all had a non-finite loss or "
        f"gradient and were skipped (optim.max_consecutive_skips={streak}; {total} skipped in all). {where}. "
        f"{go_on} a lower optim.optimizer.lr, a longer optim.scheduler.warmup_steps or a tighter optim.grad_clip, "
        "or start a new run with model.coupling=additive")


# ---- invertibility monitor ---------------------------------------------------------------------------------------
def mixing_weights(root: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, W)`` for every learned channel-mixing matrix: the 1×1 weight of InvertibleConv1x1
    (plain or LU) and the folded weight ``W·diag(α)`` of the n×n convolution (its inner 1×1 conv is not
    listed again). ``W`` is detached; per-pixel log|det W| and cond(W) say how close it is to singular."""
    from flowlab.flows import InvertibleConv1x1, InvertibleNxNConv

    out, inside_nxn = [], set()
    with torch.no_grad():
        for name, m in root.named_modules():
            if isinstance(m, InvertibleNxNConv):
                out.append((name, m.folded()[0].detach()))
                inside_nxn.add(id(m.conv))
            elif isinstance(m, InvertibleConv1x1) and id(m) not in inside_nxn:
                out.append((name, m.weight_matrix().detach()))
    return out


class InvertibilityMonitor(Callback):
    """Every ``every_n_steps`` optimiser steps (and at the end of training), on the global-zero process:

    - ``train/recon_error``: ``max|decode(encode(x)) − x|`` of the trained weights (not the EMA) on the
      first ``n_images`` validation images (training images when there is no validation set),
      dequantised with the fixed evaluation noise; a warning when it exceeds ``recon_threshold``
      (default: half a quantisation bin, ``1/2^(n_bits+1)`` — above it a round trip changes pixel values);
    - ``train/mixing_max_abs_logdet`` and ``train/mixing_max_cond``: the largest per-pixel ``|log|det W||``
      and condition number over the learned mixing matrices (see :func:`mixing_weights`), in float64;
      a warning names every layer beyond ``logdet_bound`` or ``cond_bound``.

    The values go straight to the loggers at the step they were measured; ``history`` keeps them.
    """

    def __init__(self, every_n_steps: int = 500, n_images: int = 16, recon_threshold: float | None = None,
                 logdet_bound: float = 20.0, cond_bound: float = 1.0e4):
        key = "callbacks.invertibility"
        self.every_n_steps = check_int(f"{key}.every_n_steps", every_n_steps, 1)
        self.n_images = check_int(f"{key}.n_images", n_images, 1)
        self.recon_threshold = check_number(f"{key}.recon_threshold", recon_threshold, 0, low_open=True,
                                            allow_none=True)
        self.logdet_bound = check_number(f"{key}.logdet_bound", logdet_bound, 0, low_open=True)
        self.cond_bound = check_number(f"{key}.cond_bound", cond_bound, 0, low_open=True)
        self.history: list[dict[str, Any]] = []
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step = -1

    # -- when ---------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._check(trainer, pl_module)

    # -- what ---------------------------------------------------------------------------------------------
    def threshold(self, n_bits: int) -> float:
        return self.recon_threshold if self.recon_threshold is not None else 1.0 / 2 ** (n_bits + 1)

    def _check(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step == self._last_step or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._last_step = step
        record: dict[str, Any] = {"step": step}
        metrics: dict[str, float] = {}
        if self._batch is None:
            self._batch = fixed_images(trainer.datamodule, self.n_images)
        batch = self._batch
        if batch is not None:
            x, index = batch
            x = pl_module.dequantize_eval(x.to(pl_module.device), index.to(pl_module.device))
            _, err = reconstruct(pl_module.flow, x)
            record["recon_error"] = metrics["train/recon_error"] = err
            limit = self.threshold(pl_module.n_bits)
            if not err <= limit:  # also NaN
                warnings.warn(
                    f"invertibility monitor, step {step}: max|decode(encode(x)) - x| = {err:.3g} on {x.shape[0]} fixed "
                    f"images exceeds {limit:.3g} (callbacks.invertibility.recon_threshold): the flow no longer "
                    "inverts to the same pixels. Look for a near-singular mixing weight (warned separately) or "
                    "exploding coupling scales; lower optim.optimizer.lr or resume from an earlier checkpoint",
                    InvertibilityWarning, stacklevel=2)
        layers = []
        for name, w in mixing_weights(pl_module):
            wd = w.double().cpu()
            logdet = float(torch.linalg.slogdet(wd)[1])
            cond = float(torch.linalg.cond(wd)) if torch.isfinite(wd).all() else math.inf
            layers.append((name, logdet, cond))
        if layers:
            record["max_abs_logdet"] = metrics["train/mixing_max_abs_logdet"] = max(abs(ld) for _, ld, _ in layers)
            record["max_cond"] = metrics["train/mixing_max_cond"] = max(c for _, _, c in layers)
            bad = [(n, ld, c) for n, ld, c in layers
                   if not (abs(ld) <= self.logdet_bound) or not (c <= self.cond_bound)]
            record["near_singular"] = [n for n, _, _ in bad]
            if bad:
                listed = "; ".join(f"{n}: log|det W| = {ld:.3g}, condition number {c:.3g}" for n, ld, c in bad[:8])
                more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
                warnings.warn(
                    f"invertibility monitor, step {step}: {len(bad)} mixing weight(s) approach singularity "
                    f"(bounds: |log|det W|| ≤ {self.logdet_bound:g} = callbacks.invertibility.logdet_bound, "
                    f"condition number ≤ {self.cond_bound:g} = callbacks.invertibility.cond_bound): {listed}{more}. "
                    "Their inverses lose precision, so sampling and reconstructions degrade; lower optim.optimizer.lr, "
                    "or use model/permutation=conv1x1_lu (its log-det cannot pass through 0)",
                    InvertibilityWarning, stacklevel=2)
        self.history.append(record)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
