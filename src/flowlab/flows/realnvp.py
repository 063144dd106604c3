"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017, "Density estimation using Real NVP"), as published.

The map x → z (sections 3.4–3.7 and 4.1; released code tensorflow/models research/real_nvp, PyTorch port
chrischute/real-nvp)::

    logit preprocessing                                          (:class:`~flowlab.flows.logit.Logit`)
    level l < L−1, at resolution s with c channels:
        K × [checkerboard affine coupling → batch norm]          (alternating checkerboard masks)
        squeeze (s × s × c → s/2 × s/2 × 4c)
        K × [channel-wise affine coupling → batch norm]          (alternating halves)
        factor out half the variables, under N(0, I)
    level L−1: (K + 1) × [checkerboard affine coupling → batch norm]; top latent under N(0, I)

Affine coupling (eq. 9): ``y = b⊙x + (1−b)⊙(x⊙exp(s(b⊙x)) + t(b⊙x))``, log-det ``Σ (1−b)⊙s``, inverse
``x = b⊙y + (1−b)⊙((y − t(b⊙y))⊙exp(−s(b⊙y)))``; ``b`` a checkerboard or a channel half. ``s = scale · tanh(raw)``
with a learned per-channel ``scale`` (starting at 1), ``t`` affine, both from one zero-initialised
:class:`~flowlab.flows.resnet.ResNet` (a new coupling is the identity) whose feature maps double at every scale and
for the channel-wise couplings (the reference's ``dim = base_dim · 2^scale`` and ``2 · dim``). Batch norms
(section 3.7) invert with running averages, so decode(encode(x)) = x holds in evaluation mode.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_int
from .base import MultiScaleFlow
from .batchnorm import InvertibleBatchNorm
from .logit import Logit
from .multiscale import Squeeze
from .permute import ChannelPermutation
from .resnet import ResNet
from .utils import in_accumulation_dtype, sum_except_batch


class _AffineCoupling(nn.Module):
    """``y = x·exp(s) + t`` on the transformed entries (``_parts``: conditioning and transformed; ``_s_t``: s and t,
    zero where nothing is transformed; ``_join``), in float32 (float64 stays)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, changed = self._parts(x)
        s, t = self._s_t(cond, self.training)
        return self._join(cond, (in_accumulation_dtype(changed) * torch.exp(s) + t).to(x.dtype)), sum_except_batch(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, changed = self._parts(y)
        s, t = self._s_t(cond, False)
        return self._join(cond, ((in_accumulation_dtype(changed) - t) * torch.exp(-s)).to(y.dtype))


class CheckerboardCoupling(_AffineCoupling):
    """Affine coupling with a spatial checkerboard mask ``b`` (``parity`` chooses which squares condition); the s/t
    network sees ``b⊙x`` (normalised and doubled) and ``b`` as an extra channel, as ``masked_conv_aff_coupling``."""

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int, parity: int):
        super().__init__()
        self.parity = parity
        self.net = ResNet(channels, hidden_channels, 2 * channels, num_blocks, double_after_norm=True, extra_channels=1)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """``b`` [1, 1, H, W]: 1 on the conditioning squares."""
        h, w = x.shape[2], x.shape[3]
        ii = torch.arange(h, device=x.device).view(h, 1)
        jj = torch.arange(w, device=x.device).view(1, w)
        return ((ii + jj + self.parity) % 2).to(x.dtype).view(1, 1, h, w)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x

    def _s_t(self, x: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mask(x)
        t, raw = self.net(x * m, batch_stats, m.expand(x.shape[0], 1, -1, -1)).chunk(2, dim=1)
        keep = 1 - in_accumulation_dtype(m)
        s = in_accumulation_dtype(self.scale) * torch.tanh(in_accumulation_dtype(raw))
        return s * keep, in_accumulation_dtype(t) * keep

    def _join(self, cond: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return changed


class ChannelCoupling(_AffineCoupling):
    """Affine coupling with a channel-wise mask: the first half of the channels conditions the second (``flip``
    swaps the roles); the s/t network sees only the conditioning half."""

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int, flip: bool):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a channel-wise coupling needs at least 2 channels, got {channels}")
        self.half, self.flip = channels // 2, flip
        cond = channels - self.half if flip else self.half
        self.net = ResNet(cond, hidden_channels, 2 * (channels - cond), num_blocks)
        self.scale = nn.Parameter(torch.ones(1, channels - cond, 1, 1))

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : self.half], x[:, self.half :]
        return (b, a) if self.flip else (a, b)

    def _s_t(self, cond: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t, raw = self.net(cond, batch_stats).chunk(2, dim=1)
        return in_accumulation_dtype(self.scale) * torch.tanh(in_accumulation_dtype(raw)), in_accumulation_dtype(t)

    def _join(self, cond: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([changed, cond] if self.flip else [cond, changed], dim=1)


class FactorOutOrder(ChannelPermutation):
    """Reorders squeezed channels (:class:`~flowlab.flows.multiscale.Squeeze`'s ``c·4 + 2i + j`` for pixel (i, j) of
    a 2×2 block) into the reference's ``squeeze_2x2_ordered`` order ``k·C + c``, blocks k = (0,0), (1,1), (0,1),
    (1,0): the split then keeps the diagonal pixels and factors out the others."""

    def __init__(self, channels_before_squeeze: int):
        c = channels_before_squeeze
        super().__init__(torch.tensor([ch * 4 + p for p in (0, 3, 1, 2) for ch in range(c)]))


class RealNVP(MultiScaleFlow):
    """RealNVP with the contract of :class:`flowlab.flows.Glow`. ``K``: couplings each side of a squeeze (the paper's
    3); ``L`` scales, L − 1 of them squeeze; ``hidden_channels``: the first checkerboard couplings' feature maps;
    ``learn_top``: a learned top prior (the paper: N(0, I)); ``y_condition`` etc.: Glow's class-conditional prior
    (not in the paper); ``memory_saving``: not ``"invertible"`` (batch norms invert with running averages)."""

    def __init__(self, in_channels: int, image_size: int | Sequence[int], K: int, L: int, hidden_channels: int,
                 learn_top: bool = False, n_bits: int = 8, num_blocks: int = 4, logit_alpha: float = 0.05,
                 y_condition: bool = False, n_classes: int | None = None, y_weight: float = 0.01,
                 memory_saving: str = "none"):
        check_int("model.num_blocks", num_blocks, 1)
        if memory_saving == "invertible":
            raise ConfigError("model.memory_saving='invertible' is not available for RealNVP (its batch norms invert with "
                              "running averages, not the training batch's statistics); allowed: none, checkpoint")
        check_choice("model.memory_saving", memory_saving, ("none", "checkpoint"))
        logit = Logit(logit_alpha)
        super().__init__(in_channels, image_size, K, L, hidden_channels, n_bits, squeezes=L - 1,
                         split_prior="standard", y_condition=y_condition, n_classes=n_classes, y_weight=y_weight)
        self.permutation = "realnvp"
        self.num_blocks, self.logit_alpha, self.memory_saving = num_blocks, logit_alpha, memory_saving
        shape = (in_channels, *self.image_size)
        for level in range(L):
            c, h, w = shape
            width = hidden_channels * 2**level
            layers: list[nn.Module] = [logit] if level == 0 else []
            last = level == L - 1
            for i in range(K + 1 if last else K):
                layers += [CheckerboardCoupling(c, width, num_blocks, parity=i % 2), InvertibleBatchNorm(c, affine=False)]
            if last:
                shape = self.add_level(layers, shape)
            else:
                layers.append(Squeeze())
                for i in range(K):
                    layers += [ChannelCoupling(4 * c, 2 * width, num_blocks, flip=bool(i % 2)),
                               InvertibleBatchNorm(4 * c, affine=False)]
                layers.append(FactorOutOrder(c))
                shape = self.add_level(layers, (4 * c, h // 2, w // 2))
        self.finish(shape, learn_top)
