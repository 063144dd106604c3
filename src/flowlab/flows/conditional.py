"""Glow's class-conditional top prior (Kingma & Dhariwal 2018, appendix; openai/glow ``prior()`` with ``ycond``).

The top latent z is scored under N(mean(y), exp(logs(y))²): the learned (or zero) per-channel mean and
log-std of :class:`~flowlab.flows.multiscale.TopPrior` plus ``[mean | logs] = LinearZeros(one_hot(y))``,
the same for every position. A classifier on the mean-pooled top latent gives class logits for Glow's
optional loss ``bits_x + y_weight · CE(logits, y) / ln 2``. Every linear map starts at zero, so a new
conditional prior equals the unconditional one and the classifier predicts uniformly.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .multiscale import TopPrior


class LinearZeros(nn.Module):
    """openai/glow's ``linear_zeros``: ``(x W + b) · exp(logscale_factor · logs)``, all zero-initialised."""

    def __init__(self, in_features: int, out_features: int, logscale_factor: float = 3.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logs = nn.Parameter(torch.zeros(out_features))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.exp(self.logs * self.logscale_factor)


class ConditionalTopPrior(TopPrior):
    """:class:`TopPrior` whose mean and log-std are shifted by a linear map of the one-hot class ``y``;
    ``classifier`` (only when ``classify``) maps the mean-pooled top latent to class logits."""

    def __init__(self, channels: int, n_classes: int, learn: bool = True, classify: bool = True):
        super().__init__(channels, learn)
        self.n_classes = n_classes
        self.y_emb = LinearZeros(n_classes, 2 * channels)
        self.classifier = LinearZeros(channels, n_classes) if classify else None

    def forward(self, shape: torch.Size, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.y_emb(F.one_hot(y, self.n_classes).to(self.mean.dtype))[:, :, None, None]
        c = self.mean.shape[1]
        return (self.mean + h[:, :c]).expand(shape), (self.logs + h[:, c:]).expand(shape)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits [B, n_classes] from the top latent ``z`` [B, C, H, W] (mean over positions)."""
        return self.classifier(z.to(self.mean.dtype).mean(dim=(2, 3)))
