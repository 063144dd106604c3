"""Glow's fast path (``Glow.fused``): the ActNorm → 1×1 / n×n conv of a level's K steps, composed at once.

ActNorm followed by an invertible 1×1 or n×n convolution is affine per pixel, so those two layers
of a flow step are one 1×1 convolution ``y = A x + c`` with a data-independent log-det. Composing
all K steps' ``(A, c)`` on stacked parameters turns K times a few dozen tiny weight operations
(forward and backward) into one set, and two passes over the activations into one matrix product:
about a tenth of a CPU training step. The map is exactly that of the layers' own ``forward``
(:class:`flowlab.flows.glow.FlowStep`); a test checks values and gradients in float64. The steps run in
:func:`flowlab.flows.memory.encode_steps` (with any ``memory_saving``).
"""

from collections.abc import Sequence

import torch

from .conv1x1 import InvertibleConv1x1
from .nxn import InvertibleNxNConv
from .utils import bounded_log_scale, in_accumulation_dtype


def _conv1x1(layer: torch.nn.Module) -> InvertibleConv1x1 | None:
    """The invertible 1×1 convolution of a 1×1 or n×n mixing layer, else None."""
    if isinstance(layer, InvertibleNxNConv):
        return layer.conv
    return layer if type(layer) is InvertibleConv1x1 else None


def applies(steps: Sequence[torch.nn.Module]) -> bool:
    """Whether :func:`compose` applies to these steps: initialised ActNorms, then 1×1 or n×n convolutions
    of one kind and one form (plain or LU), as Glow builds them."""
    convs = [_conv1x1(s.permutation) for s in steps]
    return (all(c is not None and c.lu == convs[0].lu for c in convs)
            and len({type(s.permutation) for s in steps}) == 1
            and all(s.actnorm._initialized for s in steps))


def _stacked_conv1x1(convs: Sequence[InvertibleConv1x1]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [K, C, C], log|det W| [K]) of K invertible 1×1 convolutions of one form."""
    if not convs[0].lu:
        weight = torch.stack([c.weight for c in convs])
        return weight, torch.linalg.slogdet(weight.double())[1].to(in_accumulation_dtype(weight).dtype)
    first, log_s = convs[0], torch.stack([c.log_s for c in convs])
    lower = torch.stack([c.L for c in convs]) * first.lower_mask + first.eye
    sign = torch.stack([c.sign_s for c in convs])
    upper = torch.stack([c.U for c in convs]) * first.lower_mask.T + torch.diag_embed(sign * torch.exp(log_s))
    return torch.stack([c.P for c in convs]) @ lower @ upper, in_accumulation_dtype(log_s).sum(dim=1)


def compose(steps: Sequence[torch.nn.Module], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K steps' ActNorm + mixing layer as 1×1 convolutions ``x ↦ A_k x + c_k``: (A [K, C, C], c [K, C], their
    summed log-det over an H×W image, a scalar)."""
    weight, logabsdet = _stacked_conv1x1([_conv1x1(s.permutation) for s in steps])
    bias = None
    if isinstance(steps[0].permutation, InvertibleNxNConv):  # S: x ↦ α·x + β, then W
        shifts = [s.permutation.shift for s in steps]
        log_alpha = bounded_log_scale(torch.stack([s.log_alpha for s in shifts]))
        alpha = torch.stack([s.sign for s in shifts]) * torch.exp(log_alpha)
        bias = (weight @ torch.stack([s.beta for s in shifts]).unsqueeze(2)).squeeze(2)
        weight = weight * alpha.unsqueeze(1)
        logabsdet = logabsdet + in_accumulation_dtype(log_alpha).sum(dim=1)
    # ActNorm: x ↦ s·x + s·b, so A = W'·diag(s) and c = W'·(s·b) + c'
    logs = torch.stack([s.actnorm.log_scale().view(-1) for s in steps])
    scale = torch.exp(logs)
    shift = torch.stack([s.actnorm.bias.view(-1) for s in steps]) * scale
    composed_bias = (weight @ shift.unsqueeze(2)).squeeze(2)
    if bias is not None:
        composed_bias = composed_bias + bias
    return weight * scale.unsqueeze(1), composed_bias, height * width * (in_accumulation_dtype(logs).sum() + logabsdet.sum())

