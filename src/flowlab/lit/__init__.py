"""Lightning side of flowlab: the training module, bits/dim metric, EMA, callbacks, checkpoint reading."""

from flowlab.lit.callbacks import ReconstructionGrid, SampleGrid, StepCheckpoint
from flowlab.lit.checkpoint import load_checkpoint, module_from_checkpoint, resolve_checkpoint
from flowlab.lit.ema import EMA
from flowlab.lit.metrics import BitsPerDim
from flowlab.lit.module import FlowModule, build_flow
from flowlab.lit.noise import eval_uniform

__all__ = ["BitsPerDim", "EMA", "FlowModule", "ReconstructionGrid", "SampleGrid", "StepCheckpoint", "build_flow",
           "eval_uniform", "load_checkpoint", "module_from_checkpoint", "resolve_checkpoint"]
