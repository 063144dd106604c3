"""flowlab.flows: exact, invertible flow layers and models in pure PyTorch (``forward(x) -> (y, logdet[B])``, ``inverse``)."""

from .actnorm import ActNorm
from .base import MultiScaleFlow
from .batchnorm import InvertibleBatchNorm
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, CouplingNet, fast_coupling_dtype
from .emerging import EmergingConv, MaskedConv
from .glow import COUPLINGS, PERMUTATIONS, FlowStep, Glow
from .logit import Logit
from .multiscale import ConditionalTopPrior, SplitPrior, Squeeze, StandardSplit
from .nxn import InvertibleNxNConv
from .permute import Reverse, Shuffle
from .realnvp import ChannelCoupling, CheckerboardCoupling, FactorOutOrder, RealNVP
from .resnet import ResNet
from .shift import InvertibleShift

__all__ = [
    "ActNorm", "AdditiveCoupling", "AffineCoupling", "COUPLINGS", "ChannelCoupling", "CheckerboardCoupling",
    "ConditionalTopPrior", "CouplingNet", "EmergingConv", "FactorOutOrder", "FlowStep", "Glow", "InvertibleBatchNorm",
    "InvertibleConv1x1", "InvertibleNxNConv", "InvertibleShift", "Logit", "MaskedConv", "MultiScaleFlow",
    "PERMUTATIONS", "RealNVP", "ResNet", "Reverse", "Shuffle", "SplitPrior", "Squeeze", "StandardSplit",
    "fast_coupling_dtype",
]
