"""Ctrl-C (SIGINT) and SIGHUP during training: save a checkpoint once, then exit with 128 + the signal.

The first signal is noted as a preemption (:func:`flowlab.lit.preemption.note_signal` with SIGTERM), so
:class:`flowlab.lit.preemption.Preemption` saves ``last.ckpt`` on every process at the next step boundary
and ``flowlab-train`` exits with 130 (SIGINT) or 129 (SIGHUP); the same command resumes there. A second
signal exits at once. Outside training, Lightning's own handling applies.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from pytorch_lightning.callbacks import Callback

from flowlab.lit.preemption import note_signal

__all__ = ["Interrupt"]


class Interrupt(Callback):
    """SIGINT/SIGHUP handlers for the length of training; ``signal_received`` is the first one."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.signal_received = None
        if os.name == "nt" or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGHUP):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_received is not None:
            print(f"received {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal_received = signum
        note_signal(signal.SIGTERM)  # Preemption saves and stops at the next step boundary
        print(f"received {name}: saving a checkpoint at the end of this step, then exiting ({name} again: exit now)",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
