"""The models the benchmark can time: flowlab's Glow per permutation, RealNVP when it exists, the reference.

Names: the six permutations of ``flowlab.flows.Glow`` (``nxn``, ``conv1x1``, ``conv1x1_lu``,
``reverse``, ``shuffle``, ``emerging``), ``realnvp`` (``flowlab.flows.RealNVP``, once it exists)
and ``reference`` (:class:`flowlab.bench.reference.ReferenceGlow`, the plain eager float32 path).
All flowlab models use the affine coupling, like the reference.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from flowlab.errors import ConfigError, UserError

from .presets import Preset
from .reference import ReferenceGlow

GLOW_PERMUTATIONS = ("nxn", "conv1x1", "conv1x1_lu", "reverse", "shuffle", "emerging")
REFERENCE = "reference"
REALNVP = "realnvp"
#: flowlab's model with the same architecture as the reference: the numerator of the speed-up ratio.
RATIO_MODEL = "conv1x1_lu"


def _flows():
    try:
        return importlib.import_module("flowlab.flows")
    except ImportError as e:
        raise UserError(f"flowlab.flows cannot be imported ({e}); benchmark only the reference with "
                        f"--models {REFERENCE}, or repair the install (make install)") from None


def flows_available() -> bool:
    try:
        _flows()
        return True
    except UserError:
        return False


def has_realnvp() -> bool:
    try:
        return hasattr(_flows(), "RealNVP")
    except UserError:
        return False


def available_models() -> list[str]:
    """Every model name this installation can build, in table order."""
    try:
        _flows()
        names = list(GLOW_PERMUTATIONS) + ([REALNVP] if has_realnvp() else [])
    except UserError:
        names = []
    return names + [REFERENCE]


def parse_models(spec: str | None) -> list[str]:
    """``"nxn,reference"`` -> ``["nxn", "reference"]``; ``None`` or ``"all"`` -> every available model."""
    if spec is None or spec.strip() in ("", "all"):
        return available_models()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = list(GLOW_PERMUTATIONS) + [REALNVP, REFERENCE]
    for name in names:
        if name not in known:
            raise ConfigError(f"--models: {name!r} is not a model; choose from {', '.join(known)} (comma-separated)")
        if name == REALNVP and not has_realnvp():
            raise ConfigError("--models realnvp: flowlab.flows has no RealNVP yet; leave it out of --models")
    if len(set(names)) != len(names):
        raise ConfigError(f"--models {spec!r} names a model twice")
    return names


def _construct(cls, kwargs: dict, name: str) -> nn.Module:
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot build {name} with {kwargs}: {e}; check --glow-kw") from None


def build_model(name: str, preset: Preset, glow_kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised model (on the CPU, float32, training mode); ActNorm not yet initialised."""
    common = dict(in_channels=preset.in_channels, image_size=preset.image_size, K=preset.K, L=preset.L,
                  hidden_channels=preset.hidden_channels, n_bits=preset.n_bits)
    if name == REFERENCE:
        return ReferenceGlow(**common)
    flows = _flows()
    if name == REALNVP:
        cls = flows.RealNVP
        params = inspect.signature(cls).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in common.items() if accepts_any or k in params}
        return _construct(cls, {**kwargs, **(glow_kwargs or {})}, name)
    if name not in GLOW_PERMUTATIONS:
        raise ConfigError(f"unknown model {name!r}")
    return _construct(flows.Glow, {**common, "permutation": name, "coupling": "affine", **(glow_kwargs or {})},
                      f"flowlab.flows.Glow(permutation={name!r})")


def initialize_actnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Data-dependent ActNorm initialisation on ``x`` (one forward pass in training mode, no gradients)."""
    if hasattr(model, "initialize"):
        model.initialize(x)
        return
    was_training = model.training
    model.train()
    with torch.no_grad():
        model.log_prob(x)
    model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
