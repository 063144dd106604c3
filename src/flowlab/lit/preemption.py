"""Stopping cleanly on a signal, requeueing under SLURM, and the RNG state a resumed run needs.

SIGTERM, SIGUSR1 (SLURM's time-limit warning), SIGINT and SIGHUP are only noted by the handler: a save there
is a collective that can meet another rank inside the gradient all-reduce and deadlock DDP. At the next step
boundary all ranks agree on the signal, save ``last.ckpt`` together, requeue a SLURM job on SIGUSR1, and exit
with 128 + the signal; a second SIGINT/SIGHUP exits at once. Generator states are stored as tensors and plain
containers, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from flowlab.lit.checkpoint import CHECKPOINT_DIRNAME

#: "0" on a SLURM node once the launcher's max_num_timeout requeues are used up (set by flowlab.cluster)
REQUEUE_ENV = "FLOWLAB_SLURM_AUTO_REQUEUE"
# acted on in this order when ranks got different ones; those present on this platform
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
_INTERACTIVE = {signal.SIGINT, getattr(signal, "SIGHUP", signal.SIGINT)}  # a person waits: say so; twice exits
_RECEIVED: set[int] = set()  # noted since training started (or before it, under SLURM)


def note_signal(signum: int, frame: Any = None) -> None:
    """The whole signal handler: note the signal for :class:`Preemption`; a second SIGINT/SIGHUP exits at once."""
    name = signal.Signals(signum).name
    if signum in _INTERACTIVE:
        if _RECEIVED & _INTERACTIVE:
            print(f"received {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"received {name}: saving a checkpoint at the end of this step, then exiting ({name} again: exit now)",
              file=sys.stderr, flush=True)
    _RECEIVED.add(int(signum))


def _install(signum: int, handler: Any) -> None:
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def _requeue(job: str) -> str:
    """``scontrol requeue <job>``; what happened, for the message."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        why = (done.stderr or done.stdout).strip() if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    return f"requeued SLURM job {job}" if why is None else f"could not requeue SLURM job {job} ({why}); resubmit it to resume"


def _last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """The ``last.ckpt`` of the ``save_last`` ModelCheckpoint, else ``<default_root_dir>/checkpoints/last.ckpt``."""
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / CHECKPOINT_DIRNAME / "last.ckpt"


class Preemption(Callback):
    """One signal path for training, and RNG state in checkpoints (see the module docs). ``signal_received`` is
    the signal every rank stopped on (``flowlab-train`` exits with 128 + it)."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under SLURM a SIGUSR1 outside training is only noted (Lightning puts this handler back after each stage)."""
        if SLURMEnvironment.detect() and signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL):
            _install(signal.SIGUSR1, note_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """:func:`note_signal` for every signal while training (Lightning's SIGTERM handler broadcasts inside it)."""
        self.signal_received = None
        for signum in _SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            _install(signum, note_signal)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        """The step boundary: all ranks agree whether any got a signal; if so save, requeue, exit together."""
        flags = torch.tensor([float(s in _RECEIVED) for s in _SIGNALS], device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")  # a collective on every rank at every step
        if not bool(flags.any()):
            return
        self.signal_received = signum = _SIGNALS[int(flags.nonzero()[0, 0])]
        name, job = signal.Signals(signum).name, _slurm_job_id()
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # collective; AtomicCheckpointIO writes it atomically
        what = f"saved {path}; run the same command again to resume from it"
        if name == "SIGUSR1" and job and "SLURM_NTASKS" in os.environ and os.environ.get(REQUEUE_ENV) != "0":
            if trainer.is_global_zero:
                what = f"saved {path}; {_requeue(job)}"
            trainer.strategy.barrier("flowlab-requeue")  # no rank leaves (and ends the job) before the requeue
        if trainer.is_global_zero:
            print(f"received {name} at step {trainer.global_step}: {what}", file=sys.stderr, flush=True)
        raise SIGTERMException  # every rank, at the same step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum, handler in self._previous.items():
            _install(signum, handler)
        self._previous = {}
        _RECEIVED.clear()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.signal_received is None:  # stopping on a signal: go on only noting signals until the process exits, as
            self.on_train_end(trainer, pl_module)  # Lightning's SIGTERM handler would talk to ranks that have gone
        _RECEIVED.clear()

    def state_dict(self) -> dict[str, Any]:
        """This process's generator states. Rank 0 writes the checkpoint, so its state is kept: every process starts
        from the same seed and the DDP samplers are seeded by (seed, epoch), so that reproduces a fresh start."""
        py_version, py_state, py_gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        rng = {"python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
               "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                         "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
               "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng)):
            return
        py, n = rng["python"], rng["numpy"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(rng["torch"].to(torch.uint8))
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
