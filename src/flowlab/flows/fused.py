"""Glow's fast path (``Glow.fused``): the ActNorm → 1×1 / n×n conv of a level's K steps, composed at once.

ActNorm then an invertible 1×1 or n×n convolution is one 1×1 convolution ``y = A x + c`` with a data-independent
log-det. Composing all K steps' ``(A, c)`` on stacked parameters makes K times a few dozen tiny weight operations
one set, and two passes over the activations one matrix product (about a tenth of a CPU training step). The map is
that of the layers' own ``forward`` (a test checks values and gradients in float64).
"""

from collections.abc import Sequence

import torch

from .conv1x1 import InvertibleConv1x1
from .nxn import InvertibleNxNConv
from .utils import bounded_log_scale, in_accumulation_dtype


def _conv1x1(layer: torch.nn.Module) -> InvertibleConv1x1 | None:
    """The invertible 1×1 convolution of a 1×1 or n×n mixing layer, else None."""
    return layer.conv if isinstance(layer, InvertibleNxNConv) else layer if type(layer) is InvertibleConv1x1 else None


def applies(steps: Sequence[torch.nn.Module]) -> bool:
    """Whether :func:`compose` applies: initialised ActNorms, then 1×1 or n×n convolutions of one kind and form."""
    convs = [_conv1x1(s.permutation) for s in steps]
    return (all(c is not None and c.lu == convs[0].lu for c in convs) and len({type(s.permutation) for s in steps}) == 1
            and all(s.actnorm._initialized for s in steps))


def compose(steps: Sequence[torch.nn.Module], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K steps' ActNorm + mixing layer as 1×1 convolutions ``x ↦ A_k x + c_k``: (A [K, C, C], c [K, C], their
    summed log-det over an H×W image, a scalar)."""
    convs = [_conv1x1(s.permutation) for s in steps]
    if not convs[0].lu:  # W and log|det W| of each 1×1 conv, stacked
        weight = torch.stack([c.weight for c in convs])
        logabsdet = torch.linalg.slogdet(weight.double())[1].to(in_accumulation_dtype(weight).dtype)
    else:
        first, log_s = convs[0], torch.stack([c.log_s for c in convs])
        lower = torch.stack([c.L for c in convs]) * first.lower_mask + first.eye
        diagonal = torch.stack([c.sign_s for c in convs]) * torch.exp(log_s)
        upper = torch.stack([c.U for c in convs]) * first.lower_mask.T + torch.diag_embed(diagonal)
        weight, logabsdet = torch.stack([c.P for c in convs]) @ lower @ upper, in_accumulation_dtype(log_s).sum(dim=1)
    bias = None
    if isinstance(steps[0].permutation, InvertibleNxNConv):  # S: x ↦ α·x + β, then W
        shifts = [s.permutation.shift for s in steps]
        log_alpha = bounded_log_scale(torch.stack([s.log_alpha for s in shifts]))
        bias = (weight @ torch.stack([s.beta for s in shifts]).unsqueeze(2)).squeeze(2)
        weight = weight * (torch.stack([s.sign for s in shifts]) * torch.exp(log_alpha)).unsqueeze(1)
        logabsdet = logabsdet + in_accumulation_dtype(log_alpha).sum(dim=1)
    # ActNorm: x ↦ s·x + s·b, so A = W'·diag(s) and c = W'·(s·b) + c'
    logs = torch.stack([s.actnorm.log_scale().view(-1) for s in steps])
    scale = torch.exp(logs)
    shift = torch.stack([s.actnorm.bias.view(-1) for s in steps]) * scale
    composed_bias = (weight @ shift.unsqueeze(2)).squeeze(2)
    return (weight * scale.unsqueeze(1), composed_bias if bias is None else composed_bias + bias,
            height * width * (in_accumulation_dtype(logs).sum() + logabsdet.sum()))
