"""Batch normalisation as an invertible flow layer (RealNVP, Dinh et al., 2017, section 3.7).

Per channel c, with statistics (μ_c, σ²_c) over the batch and the spatial positions,

    y = (x − μ_c) / sqrt(σ²_c + ε) · exp(log γ_c) + β_c,

    log|det ∂y/∂x| = H·W · Σ_c [log γ_c − ½ log(σ²_c + ε)]        (per sample; paper eq. 18).

Which statistics:

* training mode: the batch's (σ² the biased variance, as ``tf.nn.moments`` in the reference
  ``batch_norm_log_diff``); the running averages are updated with
  ``r ← (1 − momentum)·r + momentum·batch``, momentum 0.1 (the reference's ``decay=.1``).
* evaluation mode: the running averages, so one image's output does not depend on the batch.

The log-det is always computed from the statistics the map used. In training it is the paper's
eq. 18: the Jacobian of one sample's map with (μ, σ²) held at the batch values — not the Jacobian of
the whole batch map, in which every output also moves with every other sample through μ and σ².
Gradients do flow through the statistics (into both y and the log-det), as they do through
``tf.nn.moments`` in the reference code. The tests check exactly this log-det.

The inverse always uses the running averages: in evaluation mode it is the exact inverse; in
training mode it inverts the evaluation-mode map (a training-mode forward depends on the batch and
has no per-sample inverse). Decoding and sampling therefore see the model as it is evaluated.

Under ``torch.distributed`` the batch statistics are those of the global batch: the per-process sums
are all-reduced with an autograd-aware all-reduce, so every process normalises with the same μ, σ²
(and updates identical running averages) and the gradients reach every process's samples.
"""

import torch
import torch.distributed as dist
from torch import nn

from .utils import exact, per_sample


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum is the sum of the gradients
    (what ``torch.distributed.nn.functional.all_reduce`` does, without its deprecation warning)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` [B, C, H, W] over (B, H, W), each [C], in float32
    (float64 stays float64); over the global batch under ``torch.distributed`` (differentiable)."""
    x = exact(x)
    if not distributed():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var
    count = x.new_full((1,), float(x.numel() // x.shape[1]))
    totals = _AllReduceSum.apply(torch.cat([x.sum(dim=(0, 2, 3)), count]))
    n = totals[-1].detach()
    mean = totals[:-1] / n
    var = _AllReduceSum.apply(((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))) / n  # two passes: no cancellation
    return mean, var


class InvertibleBatchNorm(nn.Module):
    """Batch normalisation with its log-det (see the module docstring for the maths and the modes).

    ``affine``: learn ``log γ`` and ``β`` per channel (initialised to 0, i.e. the plain
    normalisation). RealNVP's paper and code normalise without them (``affine=False``).
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4, affine: bool = True):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        if affine:
            self.log_gamma = nn.Parameter(torch.zeros(channels))
            self.beta = nn.Parameter(torch.zeros(channels))
        else:
            self.log_gamma = self.beta = None

    def _scale_shift(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The map as ``y = a·x + b`` per channel: (a, b, log a), each [C], in the statistics' dtype."""
        log_a = -0.5 * torch.log(var + self.eps)
        if self.log_gamma is not None:
            log_a = log_a + exact(self.log_gamma).to(var.dtype)
        a = torch.exp(log_a)
        b = -mean * a
        if self.beta is not None:
            b = b + exact(self.beta).to(var.dtype)
        return a, b, log_a

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            mean, var = batch_mean_var(x)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = exact(self.running_mean), exact(self.running_var)
        a, b, log_a = self._scale_shift(mean, var)
        y = exact(x) * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        return y.to(x.dtype), per_sample(x.shape[2] * x.shape[3] * log_a.sum(), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b, _ = self._scale_shift(exact(self.running_mean), exact(self.running_var))
        return ((exact(y) - b.view(1, -1, 1, 1)) / a.view(1, -1, 1, 1)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, momentum={self.momentum}, eps={self.eps}, affine={self.beta is not None}"
