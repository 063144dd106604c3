"""Peak memory of a benchmark phase.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory the
caching allocator handed out; the kind reported in the performance table of the design notes).

CPU: the process's resident-set high-water mark ``VmHWM``. On Linux it is reset before each phase
by writing ``5`` to ``/proc/self/clear_refs``, so each model gets its own peak; where that is not
possible we fall back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which is a process-lifetime maximum
(monotone across models), and say so in ``kind``. RSS includes the Python interpreter and the
torch libraries (a few hundred MiB), so ``baseline_mib`` (RSS before the phase) is reported too.
"""

from __future__ import annotations

import resource
import sys

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_mib``, ``pm.baseline_mib``, ``pm.kind``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ""
        self.peak_mib = float("nan")
        self.baseline_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        else:
            rss = _status_kib("VmRSS")
            self._resettable = rss is not None and _reset_hwm()
            self.baseline_mib = (rss if rss is not None else self._maxrss_kib()) / 1024
            self.kind = "rss_hwm" if self._resettable else "ru_maxrss_process_lifetime"
        return self

    @staticmethod
    def _maxrss_kib() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._resettable:
            self.peak_mib = (_status_kib("VmHWM") or self._maxrss_kib()) / 1024
        else:
            self.peak_mib = self._maxrss_kib() / 1024

    def to_dict(self) -> dict:
        return {"peak_mib": self.peak_mib, "baseline_mib": self.baseline_mib, "kind": self.kind}
