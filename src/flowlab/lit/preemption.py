"""Stopping cleanly on a signal, requeueing under SLURM, and what a resumed run needs besides weights and optimiser.

:class:`Preemption` (always added by ``flowlab-train``):

- **SIGTERM** (a scheduler's preemption, ``scancel``, ``kill <pid>``) and **SIGUSR1** (SLURM's warning
  ``signal_delay_s`` before the time limit) only set a flag: a signal handler must not save or talk to the
  other processes (a save there is a collective that can meet another rank inside the gradient all-reduce
  and deadlock DDP, as Lightning's SLURM handler does). At the next training-step boundary every rank
  all-reduces the flags, so all agree on the same step; then they save ``checkpoints/last.ckpt`` together
  (atomically, through the trainer's ``save_checkpoint``), under SLURM rank 0 runs ``scontrol requeue
  <job>`` for a SIGUSR1 (while ``max_num_timeout`` requeues are left), and every process exits with
  128 + the signal number. Running the same command again (or the requeued job) resumes there.
- Under SLURM a SIGUSR1 outside training (before it starts, during test) is noted and otherwise ignored, so
  a time-limit warning during test never kills a finished run; one that came before training is acted on
  at its first step.
- **RNG state**: the Python, NumPy and torch (CPU and CUDA) generator states are saved in the checkpoint
  and restored on resume. The training dequantisation noise has its own generator, re-seeded from
  (seed, rank, step), so it is restored by the step count alone.

Only tensors and plain containers are stored, so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["Preemption", "last_checkpoint_path", "rng_state", "set_rng_state", "note_signal", "REQUEUE_ENV"]

#: "0" on a SLURM node once the launcher's max_num_timeout requeues are used up (set by flowlab.cluster)
REQUEUE_ENV = "FLOWLAB_SLURM_AUTO_REQUEUE"
_RECEIVED: set[int] = set()  # signals noted since the last step boundary that acted on them


def note_signal(signum: int, frame: Any = None) -> None:
    """The whole signal handler: remember the signal; :class:`Preemption` acts at the next step boundary."""
    _RECEIVED.add(int(signum))


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def _requeue(job_id: str) -> str:
    """``scontrol requeue <job>``; what happened, for the message."""
    import subprocess

    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job_id} ({e}); resubmit it to resume"
    if done.returncode != 0:
        return f"could not requeue SLURM job {job_id} ({(done.stderr or done.stdout).strip()}); resubmit it to resume"
    return f"requeued SLURM job {job_id}"


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``last.ckpt`` lives for this trainer: the directory of its ``save_last`` ModelCheckpoint,
    else ``<default_root_dir>/checkpoints``."""
    from flowlab.lit.checkpoint import CHECKPOINT_DIRNAME

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / CHECKPOINT_DIRNAME / "last.ckpt"


# ---- RNG state as tensors and plain containers ------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch generator states (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class Preemption(Callback):
    """Signal-safe stopping and requeue (a flag in the handler, a collective save at a step boundary) and RNG
    state in checkpoints; see the module docs."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._installed: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        return "Preemption"

    # ---- signals -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under SLURM, SIGUSR1 outside training is only noted (Lightning restores this handler after each stage)."""
        from lightning_fabric.plugins.environments import SLURMEnvironment

        if os.name != "nt" and SLURMEnvironment.detect() and signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL):
            self._install(signal.SIGUSR1, note_signal, keep=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Replace the handlers Lightning registered (its SIGTERM handler broadcasts inside the handler) by
        :func:`note_signal` for the length of training."""
        self.signal_received = None
        if os.name != "nt":
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                self._install(signum, note_signal)

    def _install(self, signum: int, handler, keep: bool = False) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals only work there
            if not keep:
                self._installed.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, handler)

    def _restore(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._installed.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._installed = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        """The step boundary: all ranks agree whether any got a signal; if so save, requeue, exit together."""
        flags = torch.tensor([float(signal.SIGUSR1 in _RECEIVED), float(signal.SIGTERM in _RECEIVED)],
                             device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")  # a collective on every rank at every step
        if not bool(flags.any()):
            return
        _RECEIVED.clear()
        self.signal_received = signum = signal.SIGUSR1 if flags[0] > 0 else signal.SIGTERM
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # collective; AtomicCheckpointIO writes it atomically
        what = f"saved {path}; run the same command again to resume from it"
        job = _slurm_job_id()
        if signum == signal.SIGUSR1 and job and "SLURM_NTASKS" in os.environ and os.environ.get(REQUEUE_ENV, "1") != "0":
            if trainer.is_global_zero:
                what = f"saved {path}; {_requeue(job)}"
            trainer.strategy.barrier("flowlab-requeue")  # no rank leaves (and ends the job) before the requeue
        if trainer.is_global_zero:
            print(f"received {signal.Signals(signum).name} at step {trainer.global_step}: {what}", file=sys.stderr, flush=True)
        raise SIGTERMException  # every rank, at the same step: flowlab-train exits with 128 + signal

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        _RECEIVED.clear()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    # ---- RNG state in the checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Global zero writes the checkpoint, so its state is the one kept. Every process starts from the same
        # seed_everything(seed), and under DDP the samplers are seeded by (seed, epoch), not by these
        # generators, so restoring rank 0's state on every process reproduces a fresh start's layout.
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("rng")
        if isinstance(state, dict) and {"python", "numpy", "torch"} <= set(state):
            set_rng_state(state)
