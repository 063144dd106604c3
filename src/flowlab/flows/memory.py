"""Constant-memory training: a level's layers under ``memory_saving``, the same map and gradients, different memory.

* ``none``: autograd keeps every activation; memory grows with K.
* ``checkpoint``: each layer (flow step) runs under non-reentrant :func:`torch.utils.checkpoint.checkpoint`.
* ``invertible`` (RevNet, Gomez et al. 2017; i-RevNet; memcnn): a level of flow steps keeps only its output ``y_K``
  and input ``x_0``. :class:`_InvertibleSteps` walks back, k = K … 1, from ``y_k`` and ``g = ∂ℓ/∂y_k``::

      x_k = f_k⁻¹(y_k)                            exact inverse, no graph
      y_k, ld_k = f_k(x_k)                         the step re-run, its graph local to the step
      ∂ℓ/∂x_k, ∂ℓ/∂θ_k = vjp of (y_k, ld_k) at (g, ∂ℓ/∂logdet)

  The coupling network is evaluated once per step, on ``y_a = x_a``, for the inverse and the re-run alike. Where the
  reconstruction drifts, ``‖x̂_0 − x_0‖ / ‖x_0‖`` > :data:`DRIFT_LIMIT`, backward recomputes the level's gradients
  from ``x_0`` with stored activations, and the level keeps its activations from then on (logged once); that test
  reads one number per level and backward to the host, since the gradients must be right before they leave it.

Recomputations run the coupling networks in the forward's compute dtype and leave batch norms' running averages as
the forward left them. Levels with an ActNorm still to initialise run plainly.
"""

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .actnorm import ActNorm
from .coupling import CouplingNet
from .utils import per_sample, pointwise_conv

MODES = ("none", "checkpoint", "invertible")
#: Relative drift of a level's reconstructed input beyond which it keeps its activations. Measured: healthy levels
#: of 32 steps drift ~1e-6 (float32) and ≤ 2e-3 (bf16 coupling networks), their gradients err less than that; a
#: failing reconstruction grows geometrically (1e-4 to 1e11 between nearby weight scales): the limit sits in the gap.
DRIFT_LIMIT = 1e-2
#: the last relative drift of each level, keyed by the level's first flow step
last_drift: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()
_stored: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # levels (first steps) that fell back
_log = logging.getLogger(__name__)


class _Part(NamedTuple):
    """A layer; on the fused path a flow step with ``tensors`` (A_k, c_k) in place of its ActNorm + mixing layer."""

    layer: nn.Module
    tensors: tuple = ()


def _trainable(*modules: nn.Module) -> tuple:
    return tuple(p for m in modules for p in m.parameters() if p.requires_grad)


def _inputs(parts: Sequence[_Part]) -> list[torch.Tensor]:
    """The tensors the layers read besides their input, in the order backward returns their gradients."""
    return [t for p in parts for t in ((*p.tensors, *_trainable(p.layer.coupling)) if p.tensors else _trainable(p.layer))]


def _run(p: _Part, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return p.layer.coupling(pointwise_conv(x, *p.tensors)) if p.tensors else p.layer(x)


def _run_all(parts: Sequence[_Part], h: torch.Tensor, run: Callable = _run) -> tuple[torch.Tensor, torch.Tensor]:
    logdet = None
    for p in parts:
        h, ld = run(p, h)
        logdet = ld if logdet is None else logdet + ld
    return h, logdet


def _mix(p: _Part, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A flow step's ActNorm and mixing layer; on the fused path the log-det is data-independent, added per level."""
    return (pointwise_conv(x, *p.tensors), None) if p.tensors else p.layer.mix(x)


def _unmix(p: _Part, h: torch.Tensor) -> torch.Tensor:
    if not p.tensors:
        return p.layer.unmix(h)
    a, c = p.tensors
    inv = torch.linalg.inv(a.double())
    return pointwise_conv(h, inv.to(a.dtype), (-(inv @ c.double())).to(c.dtype))


def _leaves(p: _Part) -> _Part:
    return p._replace(tensors=tuple(t.detach().requires_grad_() for t in p.tensors))


def _ready(modules: Sequence[nn.Module]) -> bool:
    """No ActNorm left to initialise: the data-dependent initialisation happens outside any recomputation."""
    return all(m._initialized or not m.training for s in modules for m in s.modules() if isinstance(m, ActNorm))


@contextlib.contextmanager
def _replaying(dtypes: dict, stats: list):
    outer, saved = {net: net.compute_dtype for net in dtypes}, [b.clone() for b in stats]
    try:
        for net, dtype in dtypes.items():
            net.compute_dtype = dtype
        yield
    finally:
        for net, dtype in outer.items():
            net.compute_dtype = dtype
        with torch.no_grad():
            for b, s in zip(stats, saved):
                b.copy_(s)


def _replay(modules: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
    """A context for recomputing ``modules`` later: coupling networks in the compute dtype they have now (the
    forward's), batch norms' running averages restored afterwards (updated once, by the forward)."""
    dtypes = {m: m.compute_dtype for s in modules for m in s.modules() if isinstance(m, CouplingNet)}
    stats = [b for s in modules for m in s.modules() if hasattr(m, "running_mean") for b in m.buffers(recurse=False)]
    return _replaying(dtypes, stats)


def _checkpointed(p: _Part, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_run(p, x)`` under non-reentrant checkpointing (flow layers draw no random numbers)."""
    return checkpoint(_run, p, x, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (contextlib.nullcontext(), _replay([p.layer])))


def encode_layers(layers: Sequence[nn.Module], h: torch.Tensor, mode: str, fused_path: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's layers on ``h``: (output, log-det [B]), keeping activations as ``mode`` says (``invertible``: the
    layers are flow steps). ``fused_path``: the steps' ActNorm + 1×1 / n×n conv composed (:mod:`.fused`)."""
    parts, logdet = [_Part(layer) for layer in layers], None
    if fused_path:
        weight, bias, ld = fused.compose(layers, h.shape[2], h.shape[3])
        parts, logdet = [_Part(s, (a, c)) for s, a, c in zip(layers, weight.unbind(0), bias.unbind(0))], per_sample(ld, h)
    saving = mode != "none" and torch.is_grad_enabled() and _ready(layers)
    if saving and mode == "invertible" and layers[0] not in _stored:
        h, ld = _InvertibleSteps.apply(parts, layers[0], h, *_inputs(parts))
    else:
        h, ld = _run_all(parts, h, _checkpointed if saving else _run)
    return h, ld if logdet is None else logdet + ld


def _grad(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], inputs: Sequence[torch.Tensor]) -> tuple:
    """vjp of the (output, grad) pairs whose output needs one (a volume-preserving step's zero log-det does not)."""
    pairs = [(out, g) for out, g in pairs if out is not None and out.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def _step_backward(p: _Part, y: torch.Tensor, g: torch.Tensor, g_logdet: torch.Tensor) -> tuple:
    """(x, ∂ℓ/∂x, gradients of p's inputs) of one flow step, from its output ``y`` and ``g = ∂ℓ/∂y``."""
    coupling, split = p.layer.coupling, p.layer.coupling.split
    a = y[:, :split].detach().requires_grad_()
    net_out = coupling.net(a)  # evaluated once, on y_a = x_a, for the inverse and the re-run
    with torch.no_grad():
        h = coupling.inverse(y, net_out)
    b = h[:, split:].detach().requires_grad_()
    y_again, ld = coupling(torch.cat([a, b], dim=1), net_out)
    g_a, g_b, *g_coupling = _grad([(y_again, g), (ld, g_logdet)], [a, b, *_trainable(coupling)])
    with torch.no_grad():
        x = _unmix(p, h)
    x, p = x.detach().requires_grad_(), _leaves(p)
    h_again, ld = _mix(p, x)
    mix_params = () if p.tensors else _trainable(p.layer.actnorm, p.layer.permutation)
    g_x, *g_mix = _grad([(h_again, torch.cat([g_a, g_b], dim=1)), (ld, g_logdet)], [x, *p.tensors, *mix_params])
    return x.detach(), g_x, [*g_mix, *g_coupling]


class _InvertibleSteps(torch.autograd.Function):
    """A level's flow steps keeping only their output and input: backward inverts them (module docstring)."""

    @staticmethod
    def forward(ctx, parts: list[_Part], key: nn.Module, x: torch.Tensor, *inputs: torch.Tensor):
        ctx.parts, ctx.key, ctx.replay = parts, key, _replay([p.layer.coupling for p in parts])
        y, logdet = _run_all(parts, x)
        ctx.save_for_backward(x, y)
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: torch.Tensor, g_logdet: torch.Tensor):
        x0, y = ctx.saved_tensors
        g, grads = g_y, []
        with torch.enable_grad(), ctx.replay:
            for p in reversed(ctx.parts):
                y, g, step_grads = _step_backward(p, y, g, g_logdet)
                grads = step_grads + grads
            drift = (torch.linalg.vector_norm((y - x0).double()) / torch.linalg.vector_norm(x0.double())).item()
            last_drift[ctx.key] = drift
            if not drift <= DRIFT_LIMIT:  # recompute from x_0 with stored activations
                x = x0.detach().requires_grad_()
                parts = [_leaves(p) for p in ctx.parts]
                y, logdet = _run_all(parts, x)
                g, *grads = _grad([(y, g_y), (logdet, g_logdet)], [x, *_inputs(parts)])
                _stored.add(ctx.key)
                _log.warning("memory_saving='invertible': a level of %d flow steps on %s reconstructed its input with "
                             "relative drift %.1e > %.0e; it keeps its activations from now on (memory as 'none')",
                             len(ctx.parts), list(x0.shape), drift, DRIFT_LIMIT)
        return (None, None, g, *grads)
