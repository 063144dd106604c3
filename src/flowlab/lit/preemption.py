"""Stopping cleanly on a signal, and what a resumed run needs besides weights and optimiser.

:class:`Preemption` (always added by ``flowlab-train``):

- **SIGTERM** (a scheduler's preemption or time limit, ``kill <pid>``) and **SIGUSR1** (outside SLURM) end
  training at the next step boundary on every process: Lightning sets its ``received_sigterm`` flag
  (SIGUSR1 sets the same flag here), broadcasts it from rank 0 every step, and raises
  ``SIGTERMException`` on all ranks at the same step. :meth:`Preemption.on_exception` then saves
  ``checkpoints/last.ckpt`` (collectively, atomically) and prints where it went, so running the same
  command again resumes there. The process exits with 128 + the signal number.
- Under **SLURM** Lightning's ``SLURMEnvironment`` owns SIGUSR1 (auto-requeue): it writes
  ``hpc_ckpt_<n>.ckpt`` into the run directory and runs ``scontrol requeue``; the SIGTERM that follows
  the requeue is handled as above. ``flowlab-train`` resumes from the newest of ``last.ckpt`` and the
  ``hpc_ckpt`` files.
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

__all__ = ["Preemption", "last_checkpoint_path", "rng_state", "set_rng_state"]


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
    """Signal-safe stopping (checkpoint before exit) and RNG state in checkpoints; see the module docs."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._saved_to: Path | None = None
        self._installed: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        return "Preemption"

    # ---- signals -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning has registered its handlers by now (SIGTERM always; SIGUSR1 under SLURM auto-requeue)."""
        self.signal_received = None
        self._saved_to = None
        self._installed = {}
        if os.name == "nt":  # pragma: no cover
            return
        previous_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # Lightning's handler (chained) sets received_sigterm
            self.signal_received = self.signal_received or signum
            if callable(previous_term):
                previous_term(signum, frame)

        self._install(signal.SIGTERM, on_term)
        if signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL, signal.SIG_IGN):
            def on_usr1(signum, frame):
                self.signal_received = self.signal_received or signum
                connector = getattr(trainer, "_signal_connector", None)
                if connector is not None:
                    connector.received_sigterm = True  # stops all ranks at the next step boundary
                else:  # pragma: no cover - other Lightning versions
                    trainer.should_stop = True

            self._install(signal.SIGUSR1, on_usr1)

    def _install(self, signum: int, handler) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals only work there
            return
        self._installed[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def _restore(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._installed.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._installed = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM/SIGUSR1 (raised by Lightning at a step boundary on every rank): save last.ckpt."""
        try:
            if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
                return
            if trainer.global_step == 0 or getattr(trainer, "fast_dev_run", False):
                return
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)  # collective: every rank raised at the same step
            self._saved_to = path
            if trainer.is_global_zero:
                name = signal.Signals(self.signal_received).name if self.signal_received else "SIGTERM"
                print(f"received {name} at step {trainer.global_step}: saved {path}; "
                      "run the same command again to resume from it", file=sys.stderr, flush=True)
        finally:
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
