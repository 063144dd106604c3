"""The multi-scale flow skeleton shared by Glow and RealNVP: levels of flow layers, each but the
last followed by a split that factors out half the channels, and a prior on the top latent.

The factored-out halves are scored under Glow's learned conditional prior (``split_prior="learned"``,
N(mean, exp(logs)²) predicted from the kept half) or under N(0, I) (``"standard"``, RealNVP's: no
parameters); sampling draws them from the same prior.

Data convention (written down once, here). An image with integer values ``v ∈ {0, …, 2^n_bits − 1}``
is preprocessed to ``x = v / 2^n_bits − 0.5 + u``, ``u ~ U[0, 1/2^n_bits)``: a continuous point in
the pixel's bin of width ``1/2^n_bits`` inside [−0.5, 0.5]. ``log_prob(x)`` is the continuous
log-density in nats; the discrete log-likelihood of ``v`` is bounded below by
``log_prob(x) − D·n_bits·ln 2`` (D = C·H·W), so bits/dim, the figure of the paper's Table 2, is

    bits_per_dim(x) = (−log_prob(x) / D + n_bits · ln 2) / ln 2.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, check_bool, check_int, check_number  # realnvp.py takes check_int from here
from . import memory
from .conditional import ConditionalTopPrior
from .multiscale import SplitPrior, TopPrior, gaussian_log_prob, gaussian_sample
from .utils import in_accumulation_dtype

SPLIT_PRIORS = ("learned", "standard")


def check_n_bits(n_bits) -> int:
    return check_int("model.n_bits", n_bits, 1, 8)


def check_image_size(image_size, L: int, squeezes: int | None = None) -> tuple[int, int]:
    """(H, W) from an int or a pair; raise ConfigError unless both survive the model's squeezes.

    ``squeezes`` is how many 2×2 squeezes ``L`` levels make (L for Glow, L − 1 for RealNVP, whose
    last level keeps its resolution); the message names ``model.L`` either way.
    """
    squeezes = L if squeezes is None else squeezes
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2:
        raise ConfigError(f"model.image_size={image_size!r} is not allowed: give a positive int or (height, width)")
    for s in hw:
        check_int("model.image_size", s, 1)
    factor = 2**squeezes
    for s in sorted(set(hw)):
        if s % factor:
            largest = int(math.log2(s & -s)) + (L - squeezes)
            raise ConfigError(
                f"model.L={L}: image size {s} is not divisible by 2^{squeezes} = {factor}; "
                f"use a smaller L (at most {largest} for size {s}) or resize/pad the images"
            )
    return hw  # type: ignore[return-value]


class StandardSplit(nn.Module):
    """A split whose factored-out half is scored under N(0, I): :class:`SplitPrior`'s interface, no parameters.

    ``forward`` returns mean 0 and log-std 0 for the factored-out half, so
    ``gaussian_log_prob(z, *split(kept)) = Σ log N(z; 0, 1)`` and ``gaussian_sample`` draws
    ``temperature · ε``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.out_channels = channels - self.keep

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.keep], x[:, self.keep :]

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = kept.new_zeros(kept.shape[0], self.out_channels, *kept.shape[2:])
        return zeros, zeros


class MultiScaleFlow(nn.Module):
    """x → z through ``levels``; after level l < L−1 a split factors out half the channels.

    The constructor checks the arguments every such model shares (ConfigError naming the key);
    subclasses then fill ``self.levels`` (one ``nn.ModuleList`` of flow layers per level) by calling
    :meth:`add_level` and finish with :meth:`finish`. ``split_prior``: ``"learned"`` (a
    :class:`SplitPrior` per split, Glow) or ``"standard"`` (a parameter-free :class:`StandardSplit`,
    N(0, I), RealNVP).

    ``y_condition``: Glow's class-conditional top prior over ``n_classes`` classes
    (:mod:`flowlab.flows.conditional`); then ``log_prob``, ``bits_per_dim`` and ``sample`` need the labels
    ``y``, and ``y_weight`` > 0 adds the classifier of Glow's loss ``bits_x + y_weight · bits_y``.
    """

    #: what training keeps for backward (:mod:`flowlab.flows.memory`); subclasses take it as a keyword
    memory_saving = "none"

    def __init__(self, in_channels: int, image_size, K: int, L: int, hidden_channels: int, n_bits: int,
                 squeezes: int | None = None, split_prior: str = "learned", y_condition: bool = False,
                 n_classes: int | None = None, y_weight: float = 0.0):
        if split_prior not in SPLIT_PRIORS:
            raise ConfigError(f"model.split_prior={split_prior!r} is unknown; allowed: {', '.join(SPLIT_PRIORS)}")
        check_int("in_channels", in_channels, 1)
        check_int("model.K", K, 1)
        check_int("model.L", L, 1)
        check_int("model.hidden_channels", hidden_channels, 1)
        check_n_bits(n_bits)
        height, width = check_image_size(image_size, L, squeezes)
        if check_bool("model.y_condition", y_condition):
            if n_classes is None:
                raise ConfigError("model.y_condition=true needs class labels, but model.n_classes=None: the data has "
                                  "none (data.n_classes=null, e.g. CelebA-HQ or ImageNet's PNG release); use labelled "
                                  "data (cifar10, mnist, fashion_mnist, imagenet32_chrabaszcz, ...) or model.y_condition=false")
            check_int("model.n_classes", n_classes, 2)
            check_number("model.y_weight", y_weight, 0)
        super().__init__()
        self.y_condition, self.n_classes, self.y_weight = y_condition, n_classes, float(y_weight)
        self.in_channels, self.image_size, self.K, self.L, self.n_bits = in_channels, (height, width), K, L, n_bits
        self.split_prior = split_prior
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []

    def add_level(self, layers: list[nn.Module], shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Append a level whose output has ``shape`` (C, H, W); returns the shape passed on."""
        self.levels.append(nn.ModuleList(layers))
        channels, height, width = shape
        if len(self.levels) < self.L:
            split = (SplitPrior(channels, edge_bias=getattr(self, "edge_bias", False))
                     if self.split_prior == "learned" else StandardSplit(channels))
            self.splits.append(split)
            self.latent_shapes.append((channels - split.keep, height, width))
            return split.keep, height, width
        return shape

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

    def set_coupling_dtype(self, dtype: torch.dtype | None, channels_last: bool | None = None) -> "MultiScaleFlow":
        """Run every coupling network in ``dtype`` (None: the model's own dtype), and channels-last
        when ``channels_last`` is given (None leaves the layout as it is).

        The mixed-precision fast path: the coupling networks hold nearly all FLOPs; the flow's
        stream, log-dets, priors and weight algebra stay in float32/float64. See
        :class:`flowlab.flows.coupling.CouplingNet`. A model without CouplingNets (RealNVP, whose s/t
        networks are :class:`flowlab.flows.resnet.ResNet`) is left as it is: it runs in its own dtype.
        """
        from .coupling import CouplingNet

        nets = self.__dict__.get("_coupling_nets")
        if nets is None:  # found once: the training step sets and resets the dtype every step
            nets = self.__dict__["_coupling_nets"] = [m for m in self.modules() if isinstance(m, CouplingNet)]
        for net in nets:
            net.compute_dtype = dtype
            if channels_last is not None:
                net.channels_last = channels_last
        return self

    @property
    def dims(self) -> int:
        """D = C·H·W, the number of dimensions bits/dim divides by."""
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got {list(x.shape)}"
            )

    # -- the map x -> z ---------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, y=None, top: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(zs, log-det, log prior given ``y``) in one pass; ``top=False`` leaves the top latent's prior out."""
        self._check_input(x)
        y = self._check_y(y, x.shape[0], x.device) if top else None
        logdet = in_accumulation_dtype(x.new_zeros(x.shape[0]))
        log_prior = torch.zeros_like(logdet)
        zs = []
        h = x
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
        zs.append(h)
        return zs, logdet, log_prior

    def _encode_level(self, layers: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One level's layers, one after the other: (output, log-det [B]); each under
        :func:`torch.utils.checkpoint.checkpoint` with ``memory_saving="checkpoint"``."""
        logdet = None
        for layer in layers:
            h, ld = memory.checkpointed(layer, h) if self.memory_saving == "checkpoint" else layer(h)
            logdet = ld if logdet is None else logdet + ld
        return h, logdet

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(zs, logdet)``: one latent per level (factored-out halves, then the top) and log|det ∂z/∂x| [B]."""
        zs, logdet, _ = self._encode(x, top=False)
        return zs, logdet

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Continuous log-density of ``x`` in nats, [B] (prior + log-det); of ``x`` given the classes ``y``
        for a class-conditional model."""
        _, logdet, log_prior = self._encode(x, y)
        return log_prior + logdet

    def bits_per_dim(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Bits per dimension [B], including the discretisation term: the number of the paper's tables
        (−log₂ p(x|y)/D + n_bits for a class-conditional model)."""
        return self._bits(self.log_prob(x, y))

    def _bits(self, log_prob: torch.Tensor) -> torch.Tensor:
        return (-log_prob / self.dims + self.n_bits * math.log(2)) / math.log(2)

    def bits_and_logits(self, x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(bits_per_dim(x, y), class logits)`` of a class-conditional model in one pass: the logits [B, n_classes]
        come from the mean-pooled top latent (None without a classifier, ``y_weight`` = 0)."""
        zs, logdet, log_prior = self._encode(x, y)
        classify = getattr(self.top_prior, "classifier", None) is not None
        return self._bits(log_prior + logdet), self.top_prior.logits(zs[-1]) if classify else None

    def initialize(self, x: torch.Tensor) -> None:
        """One training-mode forward pass on ``x`` without gradients: the data-dependent ActNorm
        initialisation (a no-op once initialised); batch norms update their running averages once."""
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
                split = self.splits[level]
                z = zs[level] if zs is not None else gaussian_sample(*split(h), temperature)
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
