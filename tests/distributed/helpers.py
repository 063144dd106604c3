"""Shared pieces of the distributed, resume and cluster tests.

Runs go through the real entry points: in-process ``run_hydra`` (fast) or a true subprocess
(``python -m flowlab.cli.train``, what a shell or SLURM starts). The callbacks below are added to a run
with ``+callbacks.<name>._target_=tests.distributed.helpers.<Class>``; subprocesses are started from
the repository root so ``tests`` is importable there (and in the processes DDP starts).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from tests.fakedata import write_idx

REPO = Path(__file__).resolve().parents[2]
BPD_LINE = re.compile(r"^test/bpd=(\d+\.\d+)$", re.M)
# Fashion-MNIST files with a test set of 11 images: with 2 processes and batches of 4, DistributedSampler
# pads the test set to 12 (image 0 twice), which an inexact metric would count twice.
N_TRAIN, N_TEST = 48, 11


def write_data(root: Path) -> Path:
    write_idx(Path(root) / "fashion-mnist", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    return Path(root)


def base_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """A tiny quick-start run on the generated files: no images, CSV logging, no progress bar."""
    return ["experiment=quickstart", "debug=fast", "logger=csv", f"paths.data_dir={data_dir}",
            f"paths.output_dir={out_dir}", "data.batch_size=4", "data.val_size=8", "data.num_workers=0",
            "callbacks.samples=null", "callbacks.reconstructions=null", "callbacks.progress_bar=null",
            "callbacks.invertibility=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", *extra]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flowlab.cli.train", *args]


def run_train(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(args), cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def start_train(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A training subprocess writing stdout+stderr to ``log`` (read it with ``log.read_text()``)."""
    f = open(log, "w")
    return subprocess.Popen(train_cmd(args), cwd=REPO, env=child_env(**env), stdout=f, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(condition, proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}"
                                 + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def stop(proc: subprocess.Popen) -> None:
    """Kill a test's subprocess (and only it) if it is still running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def signal_when(condition, proc: subprocess.Popen, what: str, log: Path, signum: int, wait_s: float = 60) -> None:
    """Send ``signum`` to ``proc`` once ``condition()`` holds, wait up to ``wait_s`` for it to end (killing
    it if it is still running either way); ``proc.returncode`` then says how it ended."""
    try:
        wait_for(condition, proc, 300, what, log)
        proc.send_signal(signum)
        proc.wait(timeout=wait_s)
    finally:
        stop(proc)


def run_inprocess(task: str, args: list[str]) -> tuple[int, str, str]:
    """``flowlab-<task>`` in this process: (exit status, stdout, stderr)."""
    from tests.cli_runner import run_cli

    return run_cli(task, args)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- callbacks the tests add to runs ----------------------------------------------------------------------
class SlowSteps(pl.Callback):
    """Sleep after every training step, so a test can signal or kill a run before it ends."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class Probe(pl.Callback):
    """Records, per process, what the DDP tests compare with a single-process computation:
    ``rank<r>_fit.pt`` holding the initial weights, the first training batch and the state of the
    training-noise generator before it is used, the weights after ActNorm's initialisation (before the
    first optimiser step) and after the first step; ``rank<r>_test.pt``, the indices of every test image
    this process evaluated."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record = {"rank": trainer.global_rank, "world": trainer.world_size,
                       "initial": {k: v.detach().clone() for k, v in pl_module.flow.state_dict().items()}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and "batch" not in self.record:
            self.record["batch"] = batch[0].detach().clone()
            gen = pl_module._train_noise_generator()  # created here exactly as training_step would
            self.record["noise_state"] = gen.get_state().clone()
            self.record["noise_seed"] = gen.initial_seed()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0 and "after_init" not in self.record:
            self.record["after_init"] = {k: v.detach().clone() for k, v in pl_module.flow.state_dict().items()}
            # callbacks run before the module's own hook (which clips): the gradients DDP averaged
            self.record["grads"] = {k: p.grad.detach().clone() for k, p in pl_module.flow.named_parameters()
                                    if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and "after_step" not in self.record:
            self.record["after_step"] = {k: v.detach().clone() for k, v in pl_module.flow.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}_fit.pt")

    def on_test_start(self, trainer, pl_module) -> None:  # ddp_spawn: a new process, a fresh copy of this object
        self.test_indices = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.test_indices += [int(i) for i in batch[2]]

    def on_test_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.test_indices, self.out_dir / f"rank{trainer.global_rank}_test.pt")
