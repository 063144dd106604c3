"""Constant-memory training: a level's flow steps under ``memory_saving`` ``"none"``, ``"checkpoint"`` or
``"invertible"``: the same map and the same gradients, different activation memory.

* ``none``: autograd keeps every step's activations; memory grows with K.
* ``checkpoint``: each flow step runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): only its
  input is kept, its activations are recomputed in backward.
* ``invertible`` (RevNet, Gomez et al. 2017; i-RevNet; memcnn): flow steps are invertible, so a level keeps only
  its output ``y_K`` (and its input ``x_0``, for the drift check). :class:`_InvertibleSteps` walks back,
  k = K … 1, from ``y_k`` and ``g = ∂ℓ/∂y_k``::

      x_k = f_k⁻¹(y_k)                            exact inverse, no graph
      y_k, ld_k = f_k(x_k)                         the step re-run, its graph local to the step
      ∂ℓ/∂x_k, ∂ℓ/∂θ_k = vjp of (y_k, ld_k) at (g, ∂ℓ/∂logdet)

  A coupling passes its conditioning half through (``x_a = y_a``), so its network is evaluated once per step in
  backward, on ``y_a``, for the inverse and the re-run alike. Activation memory no longer depends on K. In
  floating point the reconstruction drifts: backward compares ``x̂_0`` with ``x_0``, and where
  ``‖x̂_0 − x_0‖ / ‖x_0‖`` exceeds :data:`DRIFT_LIMIT` it recomputes the level's gradients from ``x_0`` with
  stored activations, and the level keeps its activations from then on (logged once).

Recomputations run the coupling networks in the forward's compute dtype (the training step resets it after
the forward, see :meth:`flowlab.flows.MultiScaleFlow.set_coupling_dtype`) and leave batch norms' running
averages as the forward left them. Steps with an ActNorm still to initialise run plainly (``none``).
"""

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, check_choice
from . import fused
from .actnorm import ActNorm
from .coupling import CouplingNet
from .utils import per_sample, pointwise_conv

MODES = ("none", "checkpoint", "invertible")
#: Relative drift ‖x̂_0 − x_0‖/‖x_0‖ of a level's reconstructed input beyond which it keeps its activations.
#: Measured: healthy levels of 32 steps drift ~1e-6 (float32) and ≤ 2e-3 (bf16 coupling networks); gradients
#: then err less than the drift (0.2–0.5× where errors grow through clamped coupling scales, far less where
#: they lie along directions a 1×1 conv contracts), so at 1e-2 they stay within ~1%, below the bf16 path's own
#: error against float64 (3e-2). A failing reconstruction grows geometrically (1e-4 to 1e11 between nearby
#: weight scales): the limit sits in that gap.
DRIFT_LIMIT = 1e-2
#: the last relative drift of each level, keyed by the level's first flow step
last_drift: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()
_stored: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # levels (first steps) that fell back
_log = logging.getLogger(__name__)


def check_mode(value, allowed: Sequence[str] = MODES, why: str = "") -> str:
    """``value`` if it is one of ``allowed``, else ConfigError (``why`` says why a known mode is not allowed)."""
    if value in MODES and value not in allowed:
        raise ConfigError(f"model.memory_saving={value!r} is not available{why}; allowed: {', '.join(allowed)}")
    return check_choice("model.memory_saving", value, allowed)


class _Step(NamedTuple):
    """A flow step as ``mix`` (ActNorm, mixing layer: ``(x, *tensors) -> (h, log-det or None)``, inverse ``unmix``)
    then ``coupling``; ``tensors``: what mix reads besides module parameters (the fused path's composed 1×1
    convolution); ``params``, ``coupling_params``: the trainable parameters of mix's modules and of the coupling."""

    mix: Callable
    unmix: Callable
    tensors: tuple
    params: tuple
    coupling: nn.Module
    coupling_params: tuple


def _trainable(*modules: nn.Module) -> tuple:
    return tuple(p for m in modules for p in m.parameters() if p.requires_grad)


def _mix(step: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, ld1 = step.actnorm(x)
    x, ld2 = step.permutation(x)
    return x, ld1 + ld2


def _unmix(step: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return step.actnorm.inverse(step.permutation.inverse(h))


def _affine(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, None]:
    return pointwise_conv(x, a, c), None  # the composed log-det is data-independent, added once per level


def _affine_inverse(h: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    inv = torch.linalg.inv(a.double())
    return pointwise_conv(h, inv.to(a.dtype), (-(inv @ c.double())).to(c.dtype))


def _steps(steps: Sequence[nn.Module], h: torch.Tensor, fused_path: bool, params: bool
           ) -> tuple[list[_Step], torch.Tensor | None]:
    """The steps as :class:`_Step` (their parameters listed only with ``params``); with ``fused_path``
    (:func:`.fused.compose`), also their composed log-det [B]."""
    trainable = _trainable if params else lambda *modules: ()
    if fused_path:
        weight, bias, logdet = fused.compose(steps, h.shape[2], h.shape[3])
        return [_Step(_affine, _affine_inverse, (a, c), (), s.coupling, trainable(s.coupling))
                for s, a, c in zip(steps, weight.unbind(0), bias.unbind(0))], per_sample(logdet, h)
    return [_Step(functools.partial(_mix, s), functools.partial(_unmix, s), (), trainable(s.actnorm, s.permutation),
                  s.coupling, trainable(s.coupling)) for s in steps], None


def _run(step: _Step, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, ld = step.mix(x, *step.tensors)
    y, ld_coupling = step.coupling(h)
    return y, ld_coupling if ld is None else ld + ld_coupling


def _run_all(parts: Sequence[_Step], h: torch.Tensor, run: Callable = _run) -> tuple[torch.Tensor, torch.Tensor]:
    logdet = None
    for p in parts:
        h, ld = run(p, h)
        logdet = ld if logdet is None else logdet + ld
    return h, logdet


def _inputs(parts: Sequence[_Step]) -> list[torch.Tensor]:
    """The tensors the steps read besides their input, in the order backward returns their gradients."""
    return [t for p in parts for t in (*p.tensors, *p.params, *p.coupling_params)]


def _ready(modules: Sequence[nn.Module]) -> bool:
    """No ActNorm left to initialise: the data-dependent initialisation happens outside any recomputation."""
    return all(m._initialized or not m.training for s in modules for m in s.modules() if isinstance(m, ActNorm))


def _replay(modules: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
    """A context for recomputing ``modules`` later: coupling networks in the compute dtype they have now (the
    forward's), batch norms' running averages restored afterwards (updated once, by the forward)."""
    nets = [m for s in modules for m in s.modules() if isinstance(m, CouplingNet)]
    stats = [b for s in modules for m in s.modules() if hasattr(m, "running_mean") for b in m.buffers(recurse=False)]
    return _replaying(nets, [n.compute_dtype for n in nets], stats)


@contextlib.contextmanager
def _replaying(nets: list, dtypes: list, stats: list):
    outer, saved = [n.compute_dtype for n in nets], [b.clone() for b in stats]
    for net, dtype in zip(nets, dtypes):
        net.compute_dtype = dtype
    try:
        yield
    finally:
        for net, dtype in zip(nets, outer):
            net.compute_dtype = dtype
        with torch.no_grad():
            for b, s in zip(stats, saved):
                b.copy_(s)


def checkpointed(layer: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(h)`` under non-reentrant :func:`torch.utils.checkpoint.checkpoint` (plainly where it cannot
    help: without gradients, or with an ActNorm still to initialise). Flow layers draw no random numbers."""
    if not (torch.is_grad_enabled() and _ready([layer])):
        return layer(h)
    return checkpoint(layer, h, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (contextlib.nullcontext(), _replay([layer])))


def encode_steps(steps: Sequence[nn.Module], h: torch.Tensor, mode: str, fused_path: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's flow steps (:class:`flowlab.flows.FlowStep`) on ``h``: (output, log-det [B]), keeping
    activations as ``mode`` says. ``fused_path``: ActNorm + 1×1 / n×n conv composed (:mod:`.fused`)."""
    saving = mode != "none" and torch.is_grad_enabled() and _ready(steps)
    invertible = saving and mode == "invertible" and steps[0] not in _stored
    parts, logdet = _steps(steps, h, fused_path, params=invertible)
    if invertible:
        h, ld = _InvertibleSteps.apply(_Level(parts, steps), h, *_inputs(parts))
    elif saving:  # checkpoint
        h, ld = _run_all(parts, h, lambda p, x: checkpoint(
            _run, p, x, use_reentrant=False, preserve_rng_state=False,
            context_fn=lambda: (contextlib.nullcontext(), _replay([p.coupling]))))
    else:
        h, ld = _run_all(parts, h)
    return h, ld if logdet is None else logdet + ld


class _Level:
    """What backward needs besides tensors: the steps as :class:`_Step` and as modules."""

    def __init__(self, parts: list[_Step], steps: Sequence[nn.Module]):
        self.parts, self.steps = parts, steps


def _grad(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], inputs: Sequence[torch.Tensor]) -> tuple:
    """vjp of the (output, grad) pairs whose output needs one (a volume-preserving step's zero log-det does not)."""
    pairs = [(out, g) for out, g in pairs if out is not None and out.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


@contextlib.contextmanager
def _evaluated(net: nn.Module, out: torch.Tensor):
    """``net`` returns ``out``: the coupling network, evaluated once on ``y_a = x_a``, serves inverse and re-run."""
    net.forward = lambda *args, **kwargs: out
    try:
        yield
    finally:
        del net.forward


def _step_backward(p: _Step, y: torch.Tensor, g: torch.Tensor, g_logdet: torch.Tensor) -> tuple:
    """(x, ∂ℓ/∂x, gradients of p's inputs) of one step, from its output ``y`` and ``g = ∂ℓ/∂y``."""
    coupling, split = p.coupling, p.coupling.split
    a = y[:, :split].detach().requires_grad_()
    with _evaluated(coupling.net, coupling.net(a)):
        with torch.no_grad():
            h = coupling.inverse(y)
        b = h[:, split:].detach().requires_grad_()
        y_again, ld = coupling(torch.cat([a, b], dim=1))
    g_a, g_b, *g_coupling = _grad([(y_again, g), (ld, g_logdet)], [a, b, *p.coupling_params])
    with torch.no_grad():
        x = p.unmix(h, *p.tensors)
    x, tensors = x.detach().requires_grad_(), [t.detach().requires_grad_() for t in p.tensors]
    h_again, ld = p.mix(x, *tensors)
    g_x, *g_mix = _grad([(h_again, torch.cat([g_a, g_b], dim=1)), (ld, g_logdet)], [x, *tensors, *p.params])
    return x.detach(), g_x, [*g_mix, *g_coupling]


class _InvertibleSteps(torch.autograd.Function):
    """A level's flow steps keeping only their output and input: backward inverts them (module docstring)."""

    @staticmethod
    def forward(ctx, level: _Level, x: torch.Tensor, *inputs: torch.Tensor):
        ctx.level, ctx.replay = level, _replay([p.coupling for p in level.parts])
        y, logdet = _run_all(level.parts, x)
        ctx.save_for_backward(x, y)
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: torch.Tensor, g_logdet: torch.Tensor):
        x0, y = ctx.saved_tensors
        level, g, grads = ctx.level, g_y, []
        with torch.enable_grad(), ctx.replay:
            for p in reversed(level.parts):
                y, g, step_grads = _step_backward(p, y, g, g_logdet)
                grads = step_grads + grads
            drift = (torch.linalg.vector_norm((y - x0).double()) / torch.linalg.vector_norm(x0.double())).item()
            last_drift[level.steps[0]] = drift
            if not drift <= DRIFT_LIMIT:
                g, grads = _stored_backward(level.parts, x0, g_y, g_logdet)
                _stored.add(level.steps[0])
                _log.warning("memory_saving='invertible': a level of %d flow steps on %s reconstructed its input with "
                             "relative drift %.1e > %.0e; it keeps its activations from now on (memory as 'none')",
                             len(level.parts), list(x0.shape), drift, DRIFT_LIMIT)
        return (None, g, *grads)


def _stored_backward(parts: list[_Step], x0: torch.Tensor, g_y: torch.Tensor, g_logdet: torch.Tensor) -> tuple:
    """(∂ℓ/∂x_0, gradients of the inputs) by plain backprop through the level re-run from its kept input."""
    x = x0.detach().requires_grad_()
    parts = [p._replace(tensors=tuple(t.detach().requires_grad_() for t in p.tensors)) for p in parts]
    y, logdet = _run_all(parts, x)
    g_x, *grads = _grad([(y, g_y), (logdet, g_logdet)], [x, *_inputs(parts)])
    return g_x, grads
