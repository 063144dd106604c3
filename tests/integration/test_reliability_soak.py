"""Soak test: 2,000 quick-start steps through ``flowlab-train`` (in-process, a tiny model so
it fits in CI time) with non-finite values injected into a few batches and gradients; the run
finishes, its final parameters are finite, each injected step was skipped and counted, and every
checkpoint it wrote loads safely and rebuilds a finite model.

Marked slow (about a minute on two CPU cores), so ``make test-all`` runs it. ``FLOWLAB_SOAK_STEPS`` changes the
number of steps; tests/slow/test_soak.py runs 20,000.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from flowlab.cli._hydra import run_hydra
from flowlab.cli.train import train
from flowlab.lit import FlowModule, load_checkpoint, module_from_checkpoint
from tests.fakedata import write_idx

STEPS = int(os.environ.get("FLOWLAB_SOAK_STEPS", "2000"))


def _faults(steps: int) -> dict[int, str]:
    """Step -> fault, spread over the run: NaN and inf inputs, NaN gradients, and a burst of 6 in a row."""
    at = lambda frac: max(2, int(steps * frac))  # noqa: E731 - step 0 initialises ActNorm and stays clean
    faults = {at(0.05): "nan_input", at(0.21): "inf_input", at(0.33): "nan_grad", at(0.5) + 1: "nan_input",
              at(0.9): "nan_grad"}
    for i in range(6):
        faults[at(0.7) + i] = "nan_input" if i % 2 else "nan_grad"
    return faults


@pytest.mark.slow  # a long run with injected faults
def test_soak_with_injected_faults(tmp_path, monkeypatch):
    soak(tmp_path, monkeypatch, STEPS)


def soak(tmp_path, monkeypatch, STEPS: int) -> None:
    """Train ``STEPS`` quick-start steps of a tiny model with injected faults and check what it leaves."""
    faults = _faults(STEPS)
    seen: dict[int, str] = {}
    original = FlowModule.dequantize_train

    def dequantize_train(self, x):
        y = original(self, x)
        fault = faults.get(int(self.global_step))
        if fault in ("nan_input", "inf_input"):
            seen[int(self.global_step)] = fault
            y = y.clone()
            y[:, :, :3, :3] = math.nan if fault == "nan_input" else math.inf
        return y

    def on_after_backward(self):
        if faults.get(int(self.global_step)) == "nan_grad":
            seen[int(self.global_step)] = "nan_grad"
            p = next(p for p in self.flow.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = math.nan

    monkeypatch.setattr(FlowModule, "dequantize_train", dequantize_train)
    monkeypatch.setattr(FlowModule, "on_after_backward", on_after_backward, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_idx(tmp_path / "data" / "fashion-mnist", n_train=1200, n_test=64)

    every = max(1, STEPS // 8)
    args = ["experiment=quickstart", "run_name=soak", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}", "logger=csv", "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "model.K=1", "model.L=2", "model.hidden_channels=8", "data.batch_size=16", "data.val_size=64",
            f"trainer.max_steps={STEPS}", "trainer.max_time=null", f"trainer.val_check_interval={STEPS // 4}",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=10",
            f"callbacks.checkpoint.every_n_train_steps={every}", "callbacks.checkpoint.save_top_k=-1",
            f"callbacks.samples.every_n_steps={STEPS // 2}", "callbacks.samples.n_samples=4",
            f"callbacks.reconstructions.every_n_steps={STEPS // 2}", "callbacks.reconstructions.n_images=4",
            f"callbacks.invertibility.every_n_steps={every}", "callbacks.invertibility.n_images=4",
            "optim.scheduler.warmup_steps=50"]
    GlobalHydra.instance().clear()
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, threads = sys.argv[:], torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to a busy machine's oversubscription
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_hydra(train, "train", argv=args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
    assert code == 0, err.getvalue()[-3000:]

    run = tmp_path / "out" / "runs" / "soak"
    last_line = out.getvalue().strip().splitlines()[-1]
    assert last_line.startswith("test/bpd=") and math.isfinite(float(last_line.split("=")[1])), last_line
    assert seen == faults, "every fault was injected"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == STEPS

    # each injected step was skipped and counted, and nothing else was
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    counts = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert counts and max(counts) == len(faults)
    recon = [float(r["train/recon_error"]) for r in rows if r.get("train/recon_error")]
    assert len(recon) >= 8 and all(e < 1e-3 for e in recon), recon

    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    names = {p.name for p in ckpts}
    assert {"last.ckpt", "best.ckpt", f"step_{STEPS:07d}.ckpt"} <= names and len(ckpts) >= 10, names
    assert not list((run / "checkpoints").glob(".*tmp*")), "a temporary checkpoint file was left behind"
    for path in ckpts:
        raw = load_checkpoint(path)  # weights_only=True
        module, _, _ = module_from_checkpoint(path)
        assert all(torch.isfinite(p).all() for p in module.parameters()), path.name
        assert 0 <= raw["skipped_steps"] <= len(faults)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == STEPS and final["skipped_steps"] == len(faults)
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())
