"""The fast-path switches the benchmark can turn on, and the plain float32 settings they are compared with.

``amp``            reduced-precision compute dtype ("off", "bf16", "fp16"). ``amp_scope="model"``
                   (default) uses the model's own switch where it has one (flowlab's
                   ``set_coupling_dtype``: coupling networks in that dtype, the flow stream,
                   log-dets, priors and weight algebra in float32) and otherwise autocasts the
                   whole call; ``amp_scope="autocast"`` always autocasts the whole call.
``compile``        torch.compile the training loss, the evaluation and the sampling functions.
``channels_last``  channels-last memory format: for flowlab's models (``set_coupling_dtype``) the
                   coupling networks' hidden activations (the flow's stream stays NCHW, as in
                   training); for other models the whole model and its inputs.
``tf32``           TF32 tensor cores for float32 matmuls and convolutions (CUDA only; the anchor
                   numbers of the design notes were measured with TF32 on).
``fused_adam``     ``torch.optim.Adam(..., fused=True)`` (CUDA, and CPU on torch >= 2.4).
``glow_kwargs``    extra keyword arguments for ``flowlab.flows.Glow`` (``--glow-kw key=value``), so
                   whatever fast-path switches flowlab's Glow grows are reachable without
                   changing the benchmark.

The reference Glow always runs with plain settings (float32 eager, TF32 as given) unless
``--reference-fast`` asks for the anchor rows of the design notes.
"""

from __future__ import annotations

import ast
import contextlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from flowlab.errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_SCOPES = ("model", "autocast")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on or off (no effect without CUDA).

    Uses the long-standing API on purpose: on torch >= 2.9, setting the newer per-backend
    ``fp32_precision`` makes ``torch.get_float32_matmul_precision()`` raise, and Inductor calls it.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def parse_glow_kwargs(items: list[str] | None) -> dict:
    """``["precision=bf16", "fused=True"]`` -> ``{"precision": "bf16", "fused": True}``."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--glow-kw {item!r}: expected KEY=VALUE with KEY a Python identifier")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string such as bf16
        out[key] = value
    return out


@dataclass(frozen=True)
class Switches:
    amp: str = "off"
    amp_scope: str = "model"
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    tf32: bool = True
    fused_adam: bool = False
    glow_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"--amp {self.amp!r} is not allowed; choose one of {', '.join(AMP_DTYPES)}")
        if self.amp_scope not in AMP_SCOPES:
            raise ConfigError(f"--amp-scope {self.amp_scope!r} is not allowed; choose one of {', '.join(AMP_SCOPES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"--compile-mode {self.compile_mode!r} is not allowed; choose one of "
                              f"{', '.join(COMPILE_MODES)}")

    @classmethod
    def plain(cls, tf32: bool = True) -> "Switches":
        """Float32 eager, as the public implementations run (TF32 as given)."""
        return cls(tf32=tf32)

    def for_reference(self) -> "Switches":
        """The same switches minus the ones only flowlab's Glow understands."""
        return replace(self, glow_kwargs={})

    @property
    def is_plain(self) -> bool:
        return (self.amp == "off" and not self.compile and not self.channels_last and not self.fused_adam
                and not self.glow_kwargs)

    def label(self) -> str:
        parts = [] if self.amp == "off" else [self.amp + ("" if self.amp_scope == "model" else "(autocast)")]
        if self.compile:
            parts.append("compile" + ("" if self.compile_mode == "default" else f"({self.compile_mode})"))
        if self.channels_last:
            parts.append("channels_last")
        if self.fused_adam:
            parts.append("fused_adam")
        parts += [f"{k}={v}" for k, v in self.glow_kwargs.items()]
        return "+".join(parts) or "fp32 eager"

    def to_dict(self) -> dict:
        return asdict(self)

    # --- applying the switches ---------------------------------------------------------------
    @staticmethod
    def native(model: torch.nn.Module | None) -> bool:
        """Whether ``model`` has flowlab's own fast-path switch (``set_coupling_dtype``)."""
        return model is not None and callable(getattr(model, "set_coupling_dtype", None))

    def native_amp(self, model: torch.nn.Module | None) -> bool:
        """Whether ``amp`` is applied through the model's own switch (``set_coupling_dtype``)."""
        return self.amp != "off" and self.amp_scope == "model" and self.native(model)

    def amp_applied(self, model: torch.nn.Module | None) -> str:
        if self.amp == "off":
            return "off"
        return f"{self.amp} via set_coupling_dtype" if self.native_amp(model) else f"{self.amp} via torch.autocast"

    def autocast(self, device: torch.device, model: torch.nn.Module | None = None):
        """torch.autocast for ``amp``, unless the model applies it itself (see :meth:`native_amp`)."""
        dtype = AMP_DTYPES[self.amp]
        if dtype is None or self.native_amp(model):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def activate(self, device: torch.device) -> None:
        """Global settings (TF32) for the next measurement."""
        if device.type == "cuda":
            set_tf32(self.tf32)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.native(model):
            dtype = AMP_DTYPES[self.amp] if self.native_amp(model) else None
            model.set_coupling_dtype(dtype, channels_last=self.channels_last)
        elif self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """``x`` channels-last when the whole model runs channels-last (not for flowlab's models)."""
        if self.channels_last and x.dim() == 4 and not self.native(model):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def wrap(self, fn: Callable, device: torch.device, model: torch.nn.Module | None = None) -> Callable:
        """``fn`` (a call of ``model``) run under autocast where needed, compiled when asked."""
        def run(*args, **kwargs):
            with self.autocast(device, model):
                return fn(*args, **kwargs)
        run.__name__ = getattr(fn, "__name__", "fn")
        if self.compile:
            return torch.compile(run, mode=self.compile_mode)
        return run

    def optimizer(self, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
        if self.fused_adam:
            try:
                return torch.optim.Adam(params, lr=lr, fused=True)
            except RuntimeError as e:
                raise ConfigError(f"--fused-adam: this torch cannot fuse Adam on {device.type} ({e}); "
                                  f"leave --fused-adam out") from None
        return torch.optim.Adam(params, lr=lr)
