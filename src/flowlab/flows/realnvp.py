"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017, "Density estimation using Real NVP"), as published.

The map x → z (sections 3.4–3.7 and 4.1 of the paper; released code: tensorflow/models
research/real_nvp/real_nvp_multiscale_dataset.py; PyTorch port: chrischute/real-nvp)::

    logit preprocessing                                          (:class:`~flowlab.flows.logit.Logit`)
    level l < L−1, at resolution s with c channels:
        K × [checkerboard affine coupling → batch norm]          (alternating checkerboard masks)
        squeeze (s × s × c → s/2 × s/2 × 4c)
        K × [channel-wise affine coupling → batch norm]          (alternating halves)
        factor out half the variables, under N(0, I)
    level L−1: (K + 1) × [checkerboard affine coupling → batch norm]; top latent under N(0, I)

The paper's K is 3 (three couplings each side of the squeeze, four at the last scale).

Affine coupling (eq. 9): ``y = b⊙x + (1−b)⊙(x⊙exp(s(b⊙x)) + t(b⊙x))``, log-det ``Σ (1−b)⊙s``, inverse
``x = b⊙y + (1−b)⊙((y − t(b⊙y))⊙exp(−s(b⊙y)))``. The checkerboard mask ``b`` is 1 where the sum of the
spatial coordinates is odd (``parity`` 0) or even (1); the channel-wise one keeps the first half of the
channels (or the second, ``flip``) and transforms the other. ``s = scale · tanh(raw)`` with a learned
per-channel ``scale`` (initialised to 1), ``t`` affine; both come from one :class:`~flowlab.flows.resnet.ResNet`
whose last layer is zero-initialised, so a new coupling is the identity. The s/t networks' feature maps
double at every scale, and the channel-wise couplings of a scale use twice the checkerboard ones' (the
reference's ``dim = base_dim · 2^scale`` and ``2 · dim``): ``hidden_channels`` is the width of the first
checkerboard couplings, the paper's "feature maps".

Batch normalisation of every coupling's whole output (section 3.7), an
:class:`~flowlab.flows.batchnorm.InvertibleBatchNorm` without learned scale and shift (eq. 17):
batch statistics in training, running averages (momentum 0.1) in evaluation and in every inverse, so
``decode``/``sample`` invert the evaluation-mode map, and decode(encode(x)) = x holds in evaluation mode.

Factoring out follows the reference's ``squeeze_2x2_ordered``: of every 2×2 block of the (unsqueezed)
image the diagonal pixels (0,0), (1,1) go on and the anti-diagonal ones (0,1), (1,0) are factored out
(:class:`FactorOutOrder`, a fixed channel permutation before the split). Every factored-out latent and
the top one are scored under N(0, I) (``split_prior="standard"``; ``learn_top=True`` learns a
per-channel mean and scale for the top instead).
"""

from collections.abc import Sequence

import torch
from torch import nn

from . import memory
from .base import MultiScaleFlow, check_int
from .batchnorm import InvertibleBatchNorm
from .logit import Logit
from .multiscale import Squeeze
from .permute import ChannelPermutation
from .resnet import ResNet
from .utils import in_accumulation_dtype, sum_except_batch


def _affine(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x·exp(s) + t`` in float32 (float64 stays), returned in x's dtype."""
    return (in_accumulation_dtype(x) * torch.exp(s) + t).to(x.dtype)


def _affine_inverse(y: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(y − t)·exp(−s)`` in float32 (float64 stays), returned in y's dtype."""
    return ((in_accumulation_dtype(y) - t) * torch.exp(-s)).to(y.dtype)


class CheckerboardCoupling(nn.Module):
    """Affine coupling with a spatial checkerboard mask; ``parity`` chooses which squares condition.

    The s/t network sees ``b⊙x`` (normalised and doubled) and the mask itself as an extra channel,
    as in the reference's ``masked_conv_aff_coupling``.
    """

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int, parity: int):
        super().__init__()
        self.parity = parity
        self.net = ResNet(channels, hidden_channels, 2 * channels, num_blocks, double_after_norm=True,
                          extra_channels=1)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """``b`` [1, 1, H, W]: 1 on the conditioning squares."""
        h, w = x.shape[2], x.shape[3]
        ii = torch.arange(h, device=x.device).view(h, 1)
        jj = torch.arange(w, device=x.device).view(1, w)
        return ((ii + jj + self.parity) % 2).to(x.dtype).view(1, 1, h, w)

    def _s_t(self, x: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mask(x)
        t, raw = self.net(x * m, batch_stats, m.expand(x.shape[0], 1, -1, -1)).chunk(2, dim=1)
        keep = 1 - in_accumulation_dtype(m)
        s = in_accumulation_dtype(self.scale) * torch.tanh(in_accumulation_dtype(raw))
        return s * keep, in_accumulation_dtype(t) * keep

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._s_t(x, self.training)
        return _affine(x, s, t), sum_except_batch(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._s_t(y, False)
        return _affine_inverse(y, s, t)


class ChannelCoupling(nn.Module):
    """Affine coupling with a channel-wise mask: the first half of the channels conditions the second;
    ``flip`` swaps the roles. The s/t network sees only the conditioning half."""

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int, flip: bool):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a channel-wise coupling needs at least 2 channels, got {channels}")
        self.half, self.flip = channels // 2, flip
        cond = channels - self.half if flip else self.half
        self.net = ResNet(cond, hidden_channels, 2 * (channels - cond), num_blocks)
        self.scale = nn.Parameter(torch.ones(1, channels - cond, 1, 1))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning, transformed) halves."""
        a, b = x[:, : self.half], x[:, self.half :]
        return (b, a) if self.flip else (a, b)

    def _join(self, cond: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([changed, cond] if self.flip else [cond, changed], dim=1)

    def _s_t(self, cond: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t, raw = self.net(cond, batch_stats).chunk(2, dim=1)
        return in_accumulation_dtype(self.scale) * torch.tanh(in_accumulation_dtype(raw)), in_accumulation_dtype(t)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, changed = self._split(x)
        s, t = self._s_t(cond, self.training)
        return self._join(cond, _affine(changed, s, t)), sum_except_batch(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, changed = self._split(y)
        s, t = self._s_t(cond, False)
        return self._join(cond, _affine_inverse(changed, s, t))


class FactorOutOrder(ChannelPermutation):
    """Reorders squeezed channels (:func:`flowlab.flows.multiscale.squeeze2d`'s order ``c·4 + 2i + j`` for
    pixel (i, j) of a 2×2 block) into the reference's ``squeeze_2x2_ordered`` order ``k·C + c``, with blocks
    k = (0,0), (1,1), (0,1), (1,0): the split then keeps the diagonal pixels and factors out the others."""

    _POSITIONS = (0, 3, 1, 2)  # k -> 2i + j

    def __init__(self, channels_before_squeeze: int):
        c = channels_before_squeeze
        super().__init__(torch.tensor([ch * 4 + p for p in self._POSITIONS for ch in range(c)]))


class RealNVP(MultiScaleFlow):
    """RealNVP with the same contract as :class:`flowlab.flows.Glow` (see the module docstring).

    Args:
        in_channels, image_size, n_bits: the data (see :mod:`flowlab.flows.base`).
        K: couplings on each side of a squeeze (the last level has K + 1); the paper's 3.
        L: scales; only L − 1 of them squeeze, so the image size must be divisible by 2^(L−1).
        hidden_channels: feature maps of the first checkerboard couplings' s/t networks (doubled per
            scale and for the channel-wise couplings).
        learn_top: learn a per-channel mean and scale of the top latent (the paper: N(0, I), False).
        num_blocks: residual blocks per s/t network.
        logit_alpha: α of the logit preprocessing (the paper's 0.05).
        y_condition, n_classes, y_weight: Glow's class-conditional top prior (not in the paper; see
            :class:`~flowlab.flows.base.MultiScaleFlow`).
        memory_saving: ``"none"`` or ``"checkpoint"`` (:mod:`flowlab.flows.memory`); not ``"invertible"``: the
            batch norms invert with their running averages, not the batch statistics a training step used.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        K: int,
        L: int,
        hidden_channels: int,
        learn_top: bool = False,
        n_bits: int = 8,
        num_blocks: int = 4,
        logit_alpha: float = 0.05,
        y_condition: bool = False,
        n_classes: int | None = None,
        y_weight: float = 0.01,
        memory_saving: str = "none",
    ):
        check_int("model.num_blocks", num_blocks, 1)
        memory_saving = memory.check_mode(memory_saving, ("none", "checkpoint"), " for RealNVP (its batch norms "
                                          "invert with running averages, not the training batch's statistics)")
        logit = Logit(logit_alpha)
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits, squeezes=L - 1,
                         split_prior="standard", y_condition=y_condition, n_classes=n_classes, y_weight=y_weight)
        self.permutation = "realnvp"
        self.num_blocks, self.logit_alpha, self.memory_saving = num_blocks, logit_alpha, memory_saving

        def normed(coupling: nn.Module, channels: int) -> list[nn.Module]:
            return [coupling, InvertibleBatchNorm(channels, affine=False)]

        shape = (in_channels, *self.image_size)
        for level in range(L):
            c, h, w = shape
            width = hidden_channels * 2**level
            layers: list[nn.Module] = [logit] if level == 0 else []
            last = level == L - 1
            for i in range(K + 1 if last else K):
                layers += normed(CheckerboardCoupling(c, width, num_blocks, parity=i % 2), c)
            if last:
                shape = self.add_level(layers, shape)
            else:
                layers.append(Squeeze())
                for i in range(K):
                    layers += normed(ChannelCoupling(4 * c, 2 * width, num_blocks, flip=bool(i % 2)), 4 * c)
                layers.append(FactorOutOrder(c))
                shape = self.add_level(layers, (4 * c, h // 2, w // 2))
        self.finish(shape, learn_top)
