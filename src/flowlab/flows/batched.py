"""The weights of all K flow steps of a level, computed together.

Every Glow step folds its parameters into the weights it applies (ActNorm + 1×1 / n×n conv into one
composed 1×1 convolution, the coupling network's ActNorms and output scale into its convolutions).
Per step that is a few dozen tiny operations, forward and backward: on a CPU, where each costs a
few microseconds whatever its size, they add up to a sixth of a training step. Stacking the K
steps' parameters and doing the same algebra once on ``[K, ...]`` tensors turns ~40·K operations
into ~40. The arithmetic is the per-step arithmetic of :meth:`flowlab.flows.glow.FlowStep.forward`
and :meth:`flowlab.flows.coupling.CouplingNet.folded_weights`, batched; the tests check that both
paths give the same values and gradients.

Only the weights are batched; the activations still go through the steps one after the other.
"""

from collections.abc import Sequence

import torch

from .conv1x1 import InvertibleConv1x1
from .coupling import CouplingNet
from .nxn import InvertibleNxNConv
from .utils import bounded_log_scale, exact


def _vectors(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """K per-channel parameters of any shape with C elements -> [K, C]."""
    return torch.stack([p.reshape(-1) for p in params])


def _conv1x1_weights(convs: Sequence[InvertibleConv1x1]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [K, C, C], log|det W| [K]) of K invertible 1×1 convolutions of one kind (all LU or all plain)."""
    first = convs[0]
    if not first.lu:
        weight = torch.stack([c.weight for c in convs])
        logabsdet = torch.linalg.slogdet(weight.double())[1].to(exact(weight).dtype)
        return weight, logabsdet
    log_s = torch.stack([c.log_s for c in convs])
    lower = torch.stack([c.L for c in convs]) * first.lower_mask + first.eye
    sign = torch.stack([c.sign_s for c in convs])
    upper = torch.stack([c.U for c in convs]) * first.lower_mask.T + torch.diag_embed(sign * torch.exp(log_s))
    permutation = torch.stack([c.P for c in convs])
    return permutation @ lower @ upper, exact(log_s).sum(dim=1)


def mixing_supported(permutations: Sequence[torch.nn.Module]) -> bool:
    """Whether :func:`mixing_weights` handles these channel-mixing layers (1×1 or n×n convs of one kind)."""
    first = permutations[0]
    if isinstance(first, InvertibleNxNConv):
        return all(isinstance(p, InvertibleNxNConv) and p.conv.lu == first.conv.lu for p in permutations)
    if isinstance(first, InvertibleConv1x1):
        return all(type(p) is InvertibleConv1x1 and p.lu == first.lu for p in permutations)
    return False


def mixing_weights(actnorms, permutations, height: int, width: int
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """ActNorm → 1×1 / n×n conv of K steps as K composed 1×1 convolutions, and their summed log-det.

    Returns ``([(A_k, c_k)], logdet)`` with ``y = A_k x + c_k`` per pixel for step k and ``logdet``
    the scalar ``H·W·Σ_k (Σ_c logs_k + log|det W_k| [+ Σ_c log|α_k|])``.
    """
    if isinstance(permutations[0], InvertibleNxNConv):
        weight, logabsdet = _conv1x1_weights([p.conv for p in permutations])
        log_alpha = bounded_log_scale(_vectors([p.shift.log_alpha for p in permutations]))
        alpha = _vectors([p.shift.sign for p in permutations]) * torch.exp(log_alpha)
        beta = _vectors([p.shift.beta for p in permutations])
        weight, bias = weight * alpha.unsqueeze(1), (weight @ beta.unsqueeze(2)).squeeze(2)
        logabsdet = logabsdet + exact(log_alpha).sum(dim=1)
    else:
        weight, logabsdet = _conv1x1_weights(permutations)
        bias = None
    logs = _vectors([a.log_scale() for a in actnorms])
    scale = torch.exp(logs)
    shift = _vectors([a.bias for a in actnorms]) * scale
    composed_bias = (weight @ shift.unsqueeze(2)).squeeze(2)
    if bias is not None:
        composed_bias = composed_bias + bias
    composed = weight * scale.unsqueeze(1)
    logdet = height * width * (exact(logs).sum() + logabsdet.sum())
    return list(zip(composed.unbind(0), composed_bias.unbind(0))), logdet


def nets_supported(nets: Sequence[torch.nn.Module]) -> bool:
    """Whether :func:`coupling_net_weights` handles these networks (CouplingNets of one shape)."""
    def shapes(net):
        return (net.conv1.weight.shape, net.out.conv.weight.shape, net.out.logscale_factor, net.edge_bias,
                net.norm1.logscale_factor)

    return all(isinstance(n, CouplingNet) for n in nets) and all(shapes(n) == shapes(nets[0]) for n in nets)


def coupling_net_weights(nets: Sequence[CouplingNet], dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """:meth:`CouplingNet.folded_weights` of K networks of one shape, computed together."""
    s1 = torch.exp(_vectors([n.norm1.log_scale() for n in nets]))
    w1 = torch.stack([n.conv1.weight for n in nets]) * s1.view(*s1.shape, 1, 1, 1)
    c1 = _vectors([n.norm1.bias for n in nets]) * s1
    s2 = torch.exp(_vectors([n.norm2.log_scale() for n in nets]))
    w2 = torch.stack([n.conv2.weight.view(n.conv2.out_channels, -1) for n in nets]) * s2.unsqueeze(2)
    c2 = _vectors([n.norm2.bias for n in nets]) * s2
    factor = nets[0].out.logscale_factor
    s3 = torch.exp(_vectors([n.out.logs for n in nets]) * factor)
    w3 = torch.stack([n.out.conv.weight for n in nets]) * s3.view(*s3.shape, 1, 1, 1)
    b3 = torch.stack([n.out.conv.bias for n in nets]) * s3
    parts = [t.to(dtype).unbind(0) for t in (w1, c1, w2, c2, w3, b3)]
    return list(zip(*parts))
