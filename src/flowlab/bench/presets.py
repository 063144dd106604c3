"""Benchmark presets: model sizes, batch, repetitions and the layer shapes for the micro-benchmarks.

``cpu``   the quick-start model of issue 6 (32x32x3, K=8, L=3, width 128, batch 32), sized so that
          ``make bench`` prints its table in a few minutes on a 2-core machine.
``gpu``   the paper's CIFAR-10 model (32x32x3, K=32, L=3, width 512, batch 256).
``quick`` tiny sizes for the tests (seconds on a CPU); not a performance number.

Layer micro-benchmark shapes ``[B, C, H, W]`` are the activations a Glow for 32x32x3 images sees:
``[B, 12, 16, 16]`` is the input of every flow step of level 1 (3 channels squeezed once),
``[B, 48, 16, 16]`` is a 4x wider activation at the same resolution (the size the paper's
"fewer parameters and less time than a standard convolution" claim is about, and where the cost
of the channel-mixing matrix starts to show), and ``[B, 48, 4, 4]`` is level 3 of the CIFAR
model (small spatial size, where per-call overhead dominates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from flowlab.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    in_channels: int
    image_size: int
    K: int
    L: int
    hidden_channels: int
    batch: int
    n_bits: int = 8
    # training throughput: warm-up steps, then `repeats` timed blocks of `steps` steps each
    warmup: int = 2
    steps: int = 3
    repeats: int = 5
    # evaluation / sampling throughput: warm-up calls, then `eval_repeats` timed calls
    eval_repeats: int = 5
    # layer micro-benchmarks: timed calls per repetition and repetitions
    layer_inner: int = 5
    layer_repeats: int = 7
    layer_shapes: tuple[tuple[int, int, int, int], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_shapes"] = [list(s) for s in self.layer_shapes]
        return d


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu", in_channels=3, image_size=32, K=8, L=3, hidden_channels=128, batch=32,
        warmup=2, steps=2, repeats=5, eval_repeats=3, layer_inner=3, layer_repeats=5,
        layer_shapes=((32, 12, 16, 16), (32, 48, 16, 16), (32, 48, 4, 4)),
    ),
    "gpu": Preset(
        name="gpu", in_channels=3, image_size=32, K=32, L=3, hidden_channels=512, batch=256,
        warmup=5, steps=10, repeats=5, eval_repeats=5, layer_inner=20, layer_repeats=7,
        layer_shapes=((256, 12, 16, 16), (256, 48, 16, 16), (256, 48, 4, 4)),
    ),
    "quick": Preset(
        name="quick", in_channels=3, image_size=8, K=2, L=2, hidden_channels=16, batch=4,
        warmup=1, steps=1, repeats=2, eval_repeats=2, layer_inner=1, layer_repeats=2,
        layer_shapes=((4, 12, 4, 4),),
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    """The named preset with ``overrides`` (keys of :class:`Preset`; ``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        if not hasattr(preset, key):
            raise ConfigError(f"preset override {key!r} is not a preset field")
        if key != "layer_shapes" and (not isinstance(value, int) or value < (0 if key == "warmup" else 1)):
            raise ConfigError(f"--{key.replace('_', '-')}={value!r} must be a positive integer")
    return replace(preset, **changes)
