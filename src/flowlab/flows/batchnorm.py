"""Batch normalisation as an invertible flow layer (RealNVP, Dinh et al., 2017, section 3.7).

Per channel ``y = (x − μ) / sqrt(σ² + ε) · exp(log γ) + β``, log-det ``H·W · Σ_c [log γ_c − ½ log(σ²_c + ε)]`` per
sample (eq. 18: one sample's Jacobian with the statistics held at their values). Training mode uses the batch's
statistics (biased variance, differentiable as ``tf.nn.moments``; of the global batch under ``torch.distributed``)
and updates running averages (momentum 0.1); evaluation mode and every inverse use the running averages.
"""

import torch
import torch.distributed as dist
from torch import nn

from .utils import in_accumulation_dtype, per_sample


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes (``torch.distributed.nn.functional.all_reduce`` without its deprecation
    warning): the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.forward(ctx, grad)


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` [B, C, H, W], each [C], in float32 (float64 stays); over the
    global batch under ``torch.distributed`` (differentiable)."""
    x = in_accumulation_dtype(x)
    if not (dist.is_available() and dist.is_initialized()):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var
    count = x.new_full((1,), float(x.numel() // x.shape[1]))
    totals = _AllReduceSum.apply(torch.cat([x.sum(dim=(0, 2, 3)), count]))
    n = totals[-1].detach()
    mean = totals[:-1] / n
    var = _AllReduceSum.apply(((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))) / n  # two passes: no cancellation
    return mean, var


class InvertibleBatchNorm(nn.Module):
    """Batch normalisation with its log-det (module docstring); ``affine``: learn ``log γ`` and ``β`` per channel
    (starting at 0); RealNVP's paper and code normalise without them (``affine=False``)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4, affine: bool = True):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.log_gamma = nn.Parameter(torch.zeros(channels)) if affine else None
        self.beta = nn.Parameter(torch.zeros(channels)) if affine else None

    def _scale_shift(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The map as ``y = a·x + b`` per channel: (a, b, log a), each [C], in the statistics' dtype."""
        log_a = -0.5 * torch.log(var + self.eps)
        if self.log_gamma is not None:
            log_a = log_a + in_accumulation_dtype(self.log_gamma).to(var.dtype)
        a = torch.exp(log_a)
        b = -mean * a if self.beta is None else -mean * a + in_accumulation_dtype(self.beta).to(var.dtype)
        return a, b, log_a

    def _running(self) -> tuple[torch.Tensor, torch.Tensor]:
        return in_accumulation_dtype(self.running_mean), in_accumulation_dtype(self.running_var)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            mean, var = batch_mean_var(x)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self._running()
        a, b, log_a = self._scale_shift(mean, var)
        y = in_accumulation_dtype(x) * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        return y.to(x.dtype), per_sample(x.shape[2] * x.shape[3] * log_a.sum(), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b, _ = self._scale_shift(*self._running())
        return ((in_accumulation_dtype(y) - b.view(1, -1, 1, 1)) / a.view(1, -1, 1, 1)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, momentum={self.momentum}, eps={self.eps}, affine={self.beta is not None}"
