"""Wall-clock timing with warm-up, repetitions, device synchronisation and robust statistics.

Every timed block is bracketed by a device synchronisation (``torch.cuda.synchronize`` on CUDA),
so asynchronous kernel launches are charged to the block that issued them. A block runs the
function ``inner`` times; the per-call time of each block is one sample. We report the median and
the spread (quartiles, min and max) over the samples, never the mean alone.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements of one quantity (seconds per call, or a rate)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        if not samples:
            raise ValueError("Stats.of needs at least one sample")
        xs = sorted(samples)
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))

    def to_dict(self) -> dict:
        return asdict(self)


def time_per_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
                  inner: int = 1) -> list[float]:
    """Seconds per call of ``fn``: one sample per block of ``inner`` calls, ``repeats`` blocks."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return samples


def alternate(fns: list[Callable[[], object]], device: torch.device, *, rounds: int, inner: int = 1
              ) -> list[list[float]]:
    """Seconds per call of each function, timed in alternation: round r runs them in order, then in
    reverse order in round r + 1, ``inner`` calls each, so that a drift in the machine's speed hits
    all alike. Returns one list of ``rounds`` samples per function."""
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fns[i]()
            synchronize(device)
            samples[i].append((time.perf_counter() - start) / inner)
    return samples


def rate_stats(seconds_per_call: list[float], items_per_call: int) -> Stats:
    """Items per second (e.g. images/s) for each sample, summarised."""
    return Stats.of([items_per_call / s for s in seconds_per_call])


def ms_stats(seconds_per_call: list[float]) -> Stats:
    return Stats.of([1e3 * s for s in seconds_per_call])
