"""Numerical health of a training run: stopping a run whose steps keep failing (:func:`stop_diverged`), and
the invertibility monitor (reconstructions and the learned mixing matrices)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from flowlab.errors import CheckpointError, UserError, check_int, check_number
from flowlab.lit.callbacks import EveryNSteps, fixed_inputs
from flowlab.lit.checkpoint import CHECKPOINT_DIRNAME, module_from_checkpoint
from flowlab.lit.images import eval_mode, reconstruct


class TrainingDiverged(UserError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class InvertibilityWarning(UserWarning):
    """The flow is losing numerical invertibility (reconstruction error or a near-singular weight)."""


def _finite_loss(module, x: torch.Tensor) -> bool:
    """Whether ``module``'s trained weights give a finite loss on the dequantised images ``x``."""
    with eval_mode(module.flow):
        return bool(torch.isfinite(module.flow.bits_per_dim(x.to(module.device))).all())


def _newest_finite(folder: Path, before: int, x: torch.Tensor) -> Path | None:
    """The newest ``step_*.ckpt`` in ``folder`` from before step ``before`` whose weights give a finite loss."""
    for path in sorted(folder.glob("step_*.ckpt"), reverse=True):
        try:
            module, ckpt, _ = module_from_checkpoint(path)
        except CheckpointError:
            continue
        if int(ckpt.get("global_step", before)) < before and _finite_loss(module, x):
            return path
    return None


def stop_diverged(trainer, streak: int, total: int) -> None:
    """Save the state training stopped in (the last applied step's weights: skipped steps leave them unchanged),
    named by whether they give a finite loss on fixed images, and raise :class:`TrainingDiverged` on every process."""
    step, cb = int(trainer.global_step), trainer.checkpoint_callback
    good = step - streak
    x = fixed_inputs(trainer.lightning_module, trainer.datamodule, 8)
    finite = x is None or _finite_loss(trainer.lightning_module, x)
    folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / CHECKPOINT_DIRNAME
    path = folder / f"{'last_good' if finite else 'diverged'}_step_{step:07d}.ckpt"
    error = None
    try:
        trainer.save_checkpoint(path, weights_only=False)  # collective: every process calls it; atomic in flowlab-train
    except Exception as e:  # noqa: BLE001 - the message below must still reach the user
        error = f"{type(e).__name__}: {e}"
    where = (f"The weights of the last good step (step {good}; skipped steps leave weights and optimiser state "
             f"unchanged) are in {path}" if error is None else f"Saving the last good state to {path} failed ({error})")
    if not finite:
        older = _newest_finite(folder, good, x)
        where = (f"The weights of step {good} already give a non-finite loss on validation images ("
                 + (f"kept in {path} for inspection" if error is None else f"saving them to {path} failed: {error}") + "); "
                 + (f"the newest saved weights that give a finite loss are in {older}" if older else
                    "no saved checkpoint of this run gives a finite loss"))
    go_on = f"Continue from that state with ckpt_path={path} and" if finite else (
        f"Continue from them with ckpt_path={older} and" if older else "Start a new run with")
    raise TrainingDiverged(
        f"training stopped at step {step}: the last {streak} optimiser steps all had a non-finite loss or "
        f"gradient and were skipped (optim.max_consecutive_skips={streak}; {total} skipped in all). {where}. "
        f"{go_on} a lower optim.optimizer.lr, a longer optim.scheduler.warmup_steps or a tighter optim.grad_clip, "
        "or start a new run with model.coupling=additive")


def mixing_weights(root: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, W)`` of every learned channel-mixing matrix: InvertibleConv1x1's weight (plain or LU) and the
    n×n convolution's folded ``W·diag(α)`` (its inner 1×1 conv is not listed again)."""
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


class InvertibilityMonitor(EveryNSteps):
    """Logs ``train/recon_error`` = max|decode(encode(x)) − x| of the trained weights on fixed images (a warning above
    ``recon_threshold``; None: half a quantisation bin, where a round trip starts changing pixels), and the largest
    per-pixel |log|det W|| and condition number of the mixing matrices in float64 (``train/mixing_max_abs_logdet``,
    ``train/mixing_max_cond``; a warning names each layer beyond ``logdet_bound`` or ``cond_bound``); ``history``
    keeps them."""

    key = "invertibility"

    def __init__(self, every_n_steps: int, n_images: int, recon_threshold: float | None, logdet_bound: float,
                 cond_bound: float):
        super().__init__(every_n_steps)
        where = "callbacks.invertibility"
        self.n_images = check_int(f"{where}.n_images", n_images, 1)
        self.recon_threshold = check_number(f"{where}.recon_threshold", recon_threshold, 0, low_open=True, allow_none=True)
        self.logdet_bound = check_number(f"{where}.logdet_bound", logdet_bound, 0, low_open=True)
        self.cond_bound = check_number(f"{where}.cond_bound", cond_bound, 0, low_open=True)
        self.history: list[dict[str, Any]] = []

    def threshold(self, n_bits: int) -> float:
        return self.recon_threshold if self.recon_threshold is not None else 1.0 / 2 ** (n_bits + 1)

    def _run(self, trainer, pl_module, step: int) -> None:
        record, metrics = {"step": step}, {}
        x = fixed_inputs(pl_module, trainer.datamodule, self.n_images)
        if x is not None:
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
            cond = float(torch.linalg.cond(wd)) if torch.isfinite(wd).all() else math.inf
            layers.append((name, float(torch.linalg.slogdet(wd)[1]), cond))
        if layers:
            record["max_abs_logdet"] = metrics["train/mixing_max_abs_logdet"] = max(abs(ld) for _, ld, _ in layers)
            record["max_cond"] = metrics["train/mixing_max_cond"] = max(c for _, _, c in layers)
            bad = [(n, ld, c) for n, ld, c in layers if not (abs(ld) <= self.logdet_bound) or not (c <= self.cond_bound)]
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
