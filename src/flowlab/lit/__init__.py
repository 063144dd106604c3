"""Lightning side of flowlab: the training module, evaluation bits/dim, EMA, callbacks, checkpoint reading."""

from flowlab.lit.checkpoint import load_checkpoint, module_from_checkpoint
from flowlab.lit.module import EMA, FlowModule, build_flow

__all__ = ["EMA", "FlowModule", "build_flow", "load_checkpoint", "module_from_checkpoint"]
