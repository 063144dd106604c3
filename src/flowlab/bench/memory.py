"""The memory table: activation memory, peak memory and time of the real training step (FlowModule, conf/'s
model and optim) with ``model.memory_saving`` none / checkpoint / invertible, at K = 8, 16, 32.

Memory is counted exactly, from the allocator's own records (torch.profiler with ``profile_memory``): the
activation memory is what the forward leaves allocated for backward (every saved tensor, checkpoint's kept
inputs too), the peak adds backward's transients and the parameters' gradients. On CUDA the table also
gives ``torch.cuda.max_memory_allocated`` over the whole step (weights and optimiser state included).
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from flowlab.flows.memory import MODES

from .core import PRESETS, FlowRun, alternate, batches, configs, quartiles, stepper

KS = (8, 16, 32)


def _allocated(prof, device: torch.device) -> list[tuple[int, int]]:
    """(time ns, bytes allocated on ``device`` since the profiled block began) after each allocation or free."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == device.type.upper())
    totals, total = [(0, 0)], 0
    for t, n in events:
        total += n
        totals.append((t, total))
    return totals


def measure_memory(run: FlowRun, batch, device: torch.device) -> dict:
    """MiB the training step's forward keeps for backward (``activation_mib``) and its peak above the step's start."""
    module = run.module
    module.optimizer_zero_grad(0, 0, run.opt)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = module.training_step(batch, 0)
        with record_function("flowlab.backward"):
            loss.backward()
    start = next(e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == "flowlab.backward")
    totals = _allocated(prof, device)
    kept = [n for t, n in totals if t < start][-1]
    row = {"activation_mib": kept / 2**20, "peak_mib": max(n for _, n in totals) / 2**20}
    if cuda:
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def memory_table(device: str = "cpu", preset: str = "cpu", model: str = "nxn", ks=KS, rounds: int | None = None,
                 calls: int | None = None) -> list[dict]:
    """One row per (K, memory_saving): memory (:func:`measure_memory`), seconds per training step (median of
    ``rounds`` alternating rounds), and both relative to ``none`` at the same K."""
    device, p = torch.device(device), PRESETS[preset]
    rows = []
    for k in ks:
        model_cfg, optim = configs(model, p._replace(K=k))
        data = batches(2, p, device)
        runs = [FlowRun({**model_cfg, "memory_saving": mode}, optim, device) for mode in MODES]
        for run in runs:  # initialises ActNorm, creates the optimiser's state
            run.step(data[0])
        mem = [measure_memory(run, data[1], device) for run in runs]
        times = alternate([stepper(run, data) for run in runs], rounds or p.rounds, calls or p.calls)
        medians = [quartiles(t)["median"] for t in times]
        for mode, m, t in zip(MODES, mem, medians):
            rows.append({"K": k, "memory_saving": mode, **m, "step_s": t,
                         "activation_vs_none": m["activation_mib"] / mem[0]["activation_mib"], "time_vs_none": t / medians[0]})
        del runs
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    cuda = "cuda_peak_mib" in rows[0]
    head = "| K | memory_saving | activation MiB | × none | peak MiB | step s | × none |" + (" CUDA peak MiB |" if cuda else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['K']} | {r['memory_saving']} | {r['activation_mib']:.1f} | {r['activation_vs_none']:.3f} | "
                     f"{r['peak_mib']:.1f} | {r['step_s']:.3f} | {r['time_vs_none']:.2f} |"
                     + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""))
    return "\n".join(lines)
