"""flowlab.bench: the speed benchmark behind ``flowlab-bench`` / ``make bench`` (issue 6).

Times flowlab's Glow (every permutation) beside :class:`~flowlab.bench.reference.ReferenceGlow`,
a plain eager float32 Glow written the way the public implementations write it, and the
channel-mixing layers beside a standard 3x3 convolution. Imports torch and ``flowlab.flows``
only (never Hydra, OmegaConf, Lightning or W&B), so it runs where only torch is installed.

Modules, one concept each: ``presets`` (sizes), ``reference`` (the reference Glow), ``models``
(building models by name), ``switches`` (fast-path switches), ``data`` (inputs), ``timing``,
``memory``, ``flops`` (FLOPs and MFU), ``env`` (hardware and versions), ``model_bench`` and
``layer_bench`` (the measurements), ``check_bpd`` (bits/dim of the fast path vs a float32 run),
``runner`` (one benchmark run) and ``report`` (markdown and JSON).
"""

from .presets import PRESETS, Preset, get_preset
from .reference import ReferenceGlow

__all__ = ["PRESETS", "Preset", "ReferenceGlow", "get_preset"]
