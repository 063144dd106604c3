"""Lightning side of flowlab: the training module, evaluation bits/dim, EMA, callbacks, checkpoint reading."""

from flowlab.lit.callbacks import ReconstructionGrid, SampleGrid, SampleSpeed, StepCheckpoint
from flowlab.lit.checkpoint import load_checkpoint, module_from_checkpoint, resolve_checkpoint
from flowlab.lit.ema import EMA
from flowlab.lit.metrics import KeyedBitsPerDim
from flowlab.lit.module import FlowModule, LinearWarmup, build_flow
from flowlab.lit.noise import eval_uniform

__all__ = ["EMA", "FlowModule", "KeyedBitsPerDim", "LinearWarmup", "ReconstructionGrid", "SampleGrid", "SampleSpeed",
           "StepCheckpoint", "build_flow", "eval_uniform", "load_checkpoint", "module_from_checkpoint",
           "resolve_checkpoint"]
