"""The multi-scale flow shared by Glow and RealNVP: levels of flow layers, each but the last followed by a split
that factors out half the channels (under Glow's learned conditional prior or RealNVP's N(0, I)), and a top prior.

Data convention (written down once, here). An image with integer values ``v ∈ {0, …, 2^n_bits − 1}`` is
preprocessed to ``x = v / 2^n_bits − 0.5 + u``, ``u ~ U[0, 1/2^n_bits)``: a continuous point in the pixel's bin
inside [−0.5, 0.5]. ``log_prob(x)`` is the continuous log-density in nats; the discrete log-likelihood of ``v`` is
bounded below by ``log_prob(x) − D·n_bits·ln 2`` (D = C·H·W), so bits/dim, the figure of the paper's Table 2, is

    bits_per_dim(x) = (−log_prob(x) / D + n_bits · ln 2) / ln 2.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, check_bool, check_choice, check_int, check_number
from . import memory
from .coupling import CouplingNet
from .multiscale import ConditionalTopPrior, SplitPrior, StandardSplit, TopPrior, gaussian_log_prob, gaussian_sample
from .utils import in_accumulation_dtype


class MultiScaleFlow(nn.Module):
    """x → z through ``levels``; after level l < L−1 a split factors out half the channels.

    The constructor checks the shared arguments (ConfigError naming the key); subclasses fill ``self.levels`` with
    :meth:`add_level` and end with :meth:`finish`. ``y_condition``: Glow's class-conditional top prior over
    ``n_classes`` classes; then ``log_prob``, ``bits_per_dim`` and ``sample`` need the labels ``y``, and
    ``y_weight`` > 0 adds the classifier of Glow's loss ``bits_x + y_weight · bits_y``.
    """

    #: what training keeps for backward (:mod:`flowlab.flows.memory`); subclasses take it as a keyword
    memory_saving = "none"

    def __init__(self, in_channels: int, image_size, K: int, L: int, hidden_channels: int, n_bits: int,
                 squeezes: int | None = None, split_prior: str = "learned", y_condition: bool = False,
                 n_classes: int | None = None, y_weight: float = 0.0):
        check_choice("model.split_prior", split_prior, ("learned", "standard"))
        check_int("in_channels", in_channels, 1)
        check_int("model.K", K, 1)
        check_int("model.L", L, 1)
        check_int("model.hidden_channels", hidden_channels, 1)
        check_int("model.n_bits", n_bits, 1, 8)
        squeezes = L if squeezes is None else squeezes  # 2×2 squeezes: L for Glow, L − 1 for RealNVP
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2:
            raise ConfigError(f"model.image_size={image_size!r} is not allowed: give a positive int or (height, width)")
        for s in hw:
            check_int("model.image_size", s, 1)
        for s in sorted(set(hw)):
            if s % 2**squeezes:
                largest = int(math.log2(s & -s)) + (L - squeezes)
                raise ConfigError(f"model.L={L}: image size {s} is not divisible by 2^{squeezes} = {2**squeezes}; "
                                  f"use a smaller L (at most {largest} for size {s}) or resize/pad the images")
        if check_bool("model.y_condition", y_condition):
            if n_classes is None:
                raise ConfigError("model.y_condition=true needs class labels, but model.n_classes=None: the data has "
                                  "none (data.n_classes=null, e.g. CelebA-HQ or ImageNet's PNG release); use labelled "
                                  "data (cifar10, mnist, fashion_mnist, imagenet32_chrabaszcz, ...) or model.y_condition=false")
            check_int("model.n_classes", n_classes, 2)
            check_number("model.y_weight", y_weight, 0)
        super().__init__()
        self.y_condition, self.n_classes, self.y_weight = y_condition, n_classes, float(y_weight)
        self.in_channels, self.image_size, self.K, self.L, self.n_bits = in_channels, hw, K, L, n_bits
        self.split_prior = split_prior
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []

    def add_level(self, layers: list[nn.Module], shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Append a level whose output has ``shape`` (C, H, W); returns the shape passed on."""
        self.levels.append(nn.ModuleList(layers))
        channels, height, width = shape
        if len(self.levels) == self.L:
            return shape
        split = (SplitPrior(channels, edge_bias=getattr(self, "edge_bias", False))
                 if self.split_prior == "learned" else StandardSplit(channels))
        self.splits.append(split)
        self.latent_shapes.append((split.out_channels, height, width))
        return split.keep, height, width

    def finish(self, shape: tuple[int, int, int], learn_top: bool) -> None:
        self.latent_shapes.append(shape)
        self.top_prior = (ConditionalTopPrior(shape[0], self.n_classes, learn_top, classify=self.y_weight > 0)
                          if self.y_condition else TopPrior(shape[0], learn=learn_top))

    def _check_y(self, y: torch.Tensor | int | None, n: int, device: torch.device) -> torch.Tensor | None:
        """``y`` as int64 labels [n] (an int is one class for all), checked against the model's conditioning."""
        name = type(self).__name__
        if not self.y_condition:
            if y is not None:
                raise ValueError(f"this {name} is not class-conditional (y_condition=False): call it without y")
            return None
        if y is None:
            raise ValueError(f"this {name} is class-conditional (y_condition=True, {self.n_classes} classes): "
                             "give the class labels y, e.g. log_prob(x, y) or sample(n, y=3)")
        if isinstance(y, int) and not 0 <= y < self.n_classes:
            raise ValueError(f"y={y} is not a class of this {name}: classes are 0 .. {self.n_classes - 1}")
        y = torch.as_tensor(y, device=device).to(torch.int64)
        if y.dim() == 0:
            y = y.expand(n)
        if y.shape != (n,):  # the range is checked by one_hot (on the GPU by a device assert: no host sync)
            raise ValueError(f"y must hold {n} class labels (one per image), got shape {tuple(y.shape)}")
        return y

    def set_coupling_dtype(self, dtype: torch.dtype | None, channels_last: bool | None = None) -> None:
        """The mixed-precision fast path: every :class:`CouplingNet` (nearly all FLOPs) in ``dtype`` (None: the model's
        own), channels-last if ``channels_last`` is given. RealNVP, without CouplingNets, is left as it is."""
        nets = self.__dict__.get("_coupling_nets")
        if nets is None:  # found once: the training step sets and resets the dtype every step
            nets = self.__dict__["_coupling_nets"] = [m for m in self.modules() if isinstance(m, CouplingNet)]
        for net in nets:
            net.compute_dtype = dtype
            if channels_last is not None:
                net.channels_last = channels_last

    # -- the map x -> z ---------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, y=None, top: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(zs, log-det, log prior given ``y``) in one pass; ``top=False`` leaves the top latent's prior out."""
        expected = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(in_channels={self.in_channels}, image_size={self.image_size}), got {list(x.shape)}")
        y = self._check_y(y, x.shape[0], x.device) if top else None
        logdet = in_accumulation_dtype(x.new_zeros(x.shape[0]))
        log_prior = torch.zeros_like(logdet)
        zs, h = [], x
        for level, layers in enumerate(self.levels):
            h, ld = self._encode_level(layers, h)
            logdet = logdet + ld
            if level < self.L - 1:
                split = self.splits[level]
                h, z = split.split(h)
                log_prior = log_prior + gaussian_log_prob(z, *split(h))
                zs.append(z)
        if top:
            log_prior = log_prior + gaussian_log_prob(h, *self.top_prior(h.shape, y))
        return [*zs, h], logdet, log_prior

    def _encode_level(self, layers: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return memory.encode_layers(list(layers), h, self.memory_saving)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(zs, logdet)``: one latent per level (factored-out halves, then the top) and log|det ∂z/∂x| [B]."""
        zs, logdet, _ = self._encode(x, top=False)
        return zs, logdet

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Continuous log-density of ``x`` (given the classes ``y`` for a class-conditional model) in nats, [B]."""
        _, logdet, log_prior = self._encode(x, y)
        return log_prior + logdet

    def bits_per_dim(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Bits per dimension [B] including the discretisation term: the number of the paper's tables."""
        return self._bits(self.log_prob(x, y))

    def _bits(self, log_prob: torch.Tensor) -> torch.Tensor:
        D = self.in_channels * self.image_size[0] * self.image_size[1]
        return (-log_prob / D + self.n_bits * math.log(2)) / math.log(2)

    def bits_and_logits(self, x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(bits_per_dim(x, y), class logits [B, n_classes])`` of a class-conditional model in one pass; the logits
        come from the mean-pooled top latent (None without a classifier, ``y_weight`` = 0)."""
        zs, logdet, log_prior = self._encode(x, y)
        classify = getattr(self.top_prior, "classifier", None) is not None
        return self._bits(log_prior + logdet), self.top_prior.logits(zs[-1]) if classify else None

    def initialize(self, x: torch.Tensor) -> None:
        """One training-mode pass on ``x`` without gradients: ActNorm's data-dependent initialisation (a no-op once
        done); batch norms update their running averages once."""
        was_training = self.training
        self.train()
        with torch.no_grad():
            self._encode(x, top=False)  # the top prior has no data-dependent initialisation (and may need y)
        self.train(was_training)

    # -- the map z -> x ---------------------------------------------------------------------
    def _decode(self, zs: Sequence[torch.Tensor] | None, n: int, temperature: float, y=None) -> torch.Tensor:
        """Decode level by level; latents not given are drawn from the prior (given ``y``) at ``temperature``."""
        if zs is not None and len(zs) != self.L:
            raise ValueError(f"decode expects {self.L} latents (one per level), got {len(zs)}")
        if zs is None:
            y = self._check_y(y, n, self.top_prior.mean.device)
            h = gaussian_sample(*self.top_prior((n, *self.latent_shapes[-1]), y), temperature)
        else:
            h = zs[-1]
        for level in reversed(range(self.L)):
            if level < self.L - 1:
                z = zs[level] if zs is not None else gaussian_sample(*self.splits[level](h), temperature)
                h = torch.cat([h, z.to(h.dtype)], dim=1)
            for layer in reversed(self.levels[level]):
                h = layer.inverse(h)
        return h

    def decode(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x`` from the latents returned by :meth:`encode`."""
        return self._decode(list(zs), zs[0].shape[0], 1.0)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None) -> torch.Tensor:
        """``n`` images (about [−0.5, 0.5]); temperature 0 decodes the prior means, level by level. A class-conditional
        model needs ``y``: one class (int) for all, or ``n`` labels."""
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        return self._decode(None, n, temperature, y)
