"""The pieces of a measurement: presets, models from conf/, the real training step, timing, memory.

flowlab's models are FlowModules built from conf/model and conf/train.yaml's ``optim:`` block, stepped as
Lightning's automatic optimisation steps them but without a Trainer, so only the step is timed. The
yardstick (experiments/bench/reference_glow.py) trains as the public implementations do: float32 Adam.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import warnings
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.benchmark import Timer

from flowlab.cli._config import config_dir
from flowlab.data.transforms import dequantize, preprocess, reduce_bits
from flowlab.errors import UserError
from flowlab.lit.module import FlowModule

REFERENCE, RATIO_MODEL, SAMPLING_PAIR = "reference", "conv1x1_lu", ("nxn_lu", "conv1x1_lu")
REFERENCE_FILE = Path(__file__).resolve().parents[3] / "experiments" / "bench" / "reference_glow.py"
#: training without the fast path, through the same optim config (``--plain``, and the check's float32 run)
PLAIN = ("optim.optimizer.fused=false", "optim.coupling_dtype=float32", "optim.coupling_channels_last=false")
WARMUP = 2  # untimed steps before timing (the first initialises ActNorm); the Timer adds its own


#: sizes; timing: ``repeats`` blocks (``rounds`` in ratios) of ``calls`` calls (``layer_calls`` for layers); the check's length
Preset = namedtuple("Preset", "name image_size K L hidden_channels batch repeats rounds calls layer_calls layer_shapes "
                              "check_steps check_batch")
_SHAPES = ((12, 16, 16), (48, 16, 16), (48, 4, 4))  # level 1 of a 32x32x3 Glow; 4x its channels; level 3
PRESETS = {p.name: p for p in (
    Preset("cpu", 32, 8, 3, 128, 32, 5, 10, 2, 10, tuple((32, *s) for s in _SHAPES), 500, 32),
    Preset("gpu", 32, 32, 3, 512, 256, 5, 10, 10, 20, tuple((256, *s) for s in _SHAPES), 2000, 64),  # CIFAR-10's
    Preset("quick", 8, 2, 2, 16, 4, 2, 4, 1, 1, ((4, 12, 4, 4),), 4, 4),  # tests; not a performance number
)}


def model_names() -> list[str]:
    """Every conf/model/permutation choice of Glow, then RealNVP and the reference."""
    return sorted(f.stem for f in (config_dir() / "model" / "permutation").glob("*.yaml")) + ["realnvp", REFERENCE]


@functools.cache
def configs(name: str, p: Preset, plain: bool = False) -> tuple[dict, dict]:
    """``(model, optim)`` as flowlab-train composes them from conf/train.yaml: the training defaults (with
    ``plain``: :data:`PLAIN`), model ``name`` (a Glow permutation or realnvp) at the preset's sizes."""
    sizes = ["model=realnvp"] if name == "realnvp" else [f"model/permutation={name}", f"model.K={p.K}",
                                                          f"model.hidden_channels={p.hidden_channels}"]
    overrides = ["data=cifar10", f"data.image_size={p.image_size}", f"model.L={p.L}", *sizes, *(PLAIN if plain else ())]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="flowlab-bench"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.optim, resolve=True)


@functools.cache
def reference_glow() -> type:
    if not REFERENCE_FILE.is_file():
        raise UserError(f"{REFERENCE_FILE} is missing: run flowlab-bench from flowlab's source checkout "
                        f"(pip install -e .), or leave 'reference' out of --models")
    spec = importlib.util.spec_from_file_location("reference_glow", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceGlow


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 ``[n, 3, size, size]`` with image-like statistics (smooth colour fields at four scales, grain)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(n, 3, size, size, generator=g)
    for res, amp in ((2, 1.0), (4, 0.7), (8, 0.35), (16, 0.15)):
        r = min(res, size)
        field = 0.5 * torch.randn(n, 3, r, r, generator=g) + torch.randn(n, 1, r, r, generator=g)
        x += amp * F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    return (torch.sigmoid(x) * 255).round().to(torch.uint8)


def as_batch(x: torch.Tensor, index: torch.Tensor) -> tuple:
    """``(x, y, index)``, a batch as flowlab.data yields it."""
    return x, torch.zeros_like(index), index


def batches(count: int, p: Preset, device: torch.device, x: torch.Tensor | None = None) -> list[tuple]:
    """``count`` batches of ``x`` (default: synthetic images at conf/data/cifar10's 8 bits), indexed 0, 1, ..."""
    x = (reduce_bits(images(count * p.batch, p.image_size, seed=0), 8) if x is None else x).to(device)
    b = len(x) // count
    return [as_batch(x[i:i + b], torch.arange(i, i + b, device=device)) for i in range(0, count * b, b)]


class FlowRun:
    """A FlowModule on ``device``, stepped as Lightning's automatic optimisation steps it: ``optimizer_step``
    runs a closure of ``training_step``, ``optimizer_zero_grad``, ``backward``, ``on_before_optimizer_step``;
    then the learning-rate schedule steps."""

    def __init__(self, model: dict, optim: dict, device: torch.device):
        # without a Trainer, FlowModule's self.log returns at once (after a warning)
        warnings.filterwarnings("ignore", message=r".*reference is not registered on the model")
        torch.manual_seed(0)
        self.module = FlowModule(model, optim).to(device)
        opt = self.module.configure_optimizers()
        self.opt, self.sched = (opt["optimizer"], opt["lr_scheduler"]["scheduler"]) if isinstance(opt, dict) else (opt, None)
        self.module.on_fit_start()  # resolves optim.coupling_dtype on the device
        self.flow, self.n_bits, self.i = self.module.flow, self.module.n_bits, 0
        self.dtype = getattr(self.module, "_train_coupling_dtype", None) or torch.float32

    def step(self, batch) -> None:
        m, opt = self.module, self.opt

        def closure():
            loss = m.training_step(batch, self.i)
            m.optimizer_zero_grad(0, self.i, opt)
            m.backward(loss)
            m.on_before_optimizer_step(opt)
            return loss

        m.optimizer_step(0, self.i, opt, closure)
        if self.sched is not None:
            self.sched.step()
        self.i += 1

    def evaluate(self, batch) -> None:
        self.module.validation_step(batch, 0)


class ReferenceRun:
    """The public-style Glow at the same sizes, trained as those implementations train: float32 Adam."""

    def __init__(self, model: dict, optim: dict, device: torch.device):
        torch.manual_seed(0)
        keys = ("in_channels", "image_size", "K", "L", "hidden_channels", "n_bits")
        self.flow = reference_glow()(**{k: model[k] for k in keys}).to(device).train()
        self.opt = torch.optim.Adam(self.flow.parameters(), lr=optim["optimizer"]["lr"], betas=optim["optimizer"]["betas"])
        self.n_bits, self.dtype = model["n_bits"], torch.float32

    def step(self, batch) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.evaluate(batch).mean().backward()
        self.opt.step()

    def evaluate(self, batch) -> torch.Tensor:
        return self.flow.bits_per_dim(dequantize(preprocess(batch[0], self.n_bits), self.n_bits))


def build(name: str, p: Preset, device: torch.device, plain: bool = False) -> FlowRun | ReferenceRun:
    """Model ``name`` (flowlab's, or the reference at RATIO_MODEL's sizes), seeded alike, ready to step."""
    if name == REFERENCE:
        return ReferenceRun(*configs(RATIO_MODEL, p), device)
    return FlowRun(*configs(name, p, plain), device)


def stepper(run: FlowRun | ReferenceRun, data: list[tuple]):
    """A no-argument training step cycling through ``data``."""
    return functools.partial(lambda it: run.step(next(it)), itertools.cycle(data))


def alternate(fns: list, rounds: int, calls: int) -> list[list[float]]:
    """Seconds per call of each function in ``rounds`` rounds, in order A B, then B A, ... (a drift in the
    machine's speed hits all alike): ``torch.utils.benchmark.Timer.timeit(calls)``, which synchronises CUDA
    around each timed block and first makes two untimed calls; torch's thread count is kept."""
    out: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            out[i].append(Timer("fn()", globals={"fn": fns[i]}, num_threads=torch.get_num_threads()).timeit(calls).mean)
    return out


def per_call(fn, repeats: int, calls: int) -> list[float]:
    """Seconds per call of ``fn``, one sample per block of ``calls`` calls."""
    return alternate([fn], repeats, calls)[0]


def quartiles(xs: list[float]) -> dict:
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return dict(zip(("q1", "median", "q3"), q.tolist()), n=len(xs))


def rates(seconds: list[float], batch: int) -> dict:  # images/s from seconds per batch
    return quartiles([batch / s for s in seconds])


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """Peak memory of the block into ``out``: CUDA ``max_memory_allocated``; on the CPU (Linux) the process's
    RSS high-water mark (VmHWM, reset through /proc/self/clear_refs), which includes the interpreter and torch."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):  # where it cannot be reset, VmHWM is the process's lifetime peak
        Path("/proc/self/clear_refs").write_text("5")
    yield
    status = [] if cuda else Path("/proc/self/status").read_text().splitlines()
    out["peak_mib"] = (torch.cuda.max_memory_allocated(device) if cuda else
                       1024 * next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM"))) / 2**20
    out["memory_kind"] = "CUDA max_memory_allocated" if cuda else "process RSS high-water mark"


@contextlib.contextmanager
def strict_float32():
    """IEEE float32 matrix products and convolutions (TF32 off) inside the block."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved)
