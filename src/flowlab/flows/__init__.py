"""flowlab.flows: exact, invertible flow layers and models in pure PyTorch.

Every layer: ``forward(x) -> (y, logdet[B])`` and ``inverse(y) -> x``.
"""

from .actnorm import ActNorm
from .base import MultiScaleFlow, StandardSplit, check_image_size
from .batchnorm import InvertibleBatchNorm
from .conditional import ConditionalTopPrior, LinearZeros
from .conv1x1 import InvertibleConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, CouplingNet, ZeroConv2d
from .emerging import EmergingConv, MaskedConv
from .glow import COUPLINGS, PERMUTATIONS, FlowStep, Glow
from .logit import Logit
from .multiscale import SplitPrior, Squeeze, TopPrior, squeeze2d, unsqueeze2d
from .nxn import InvertibleNxNConv
from .permute import ChannelPermutation, Reverse, Shuffle
from .realnvp import ChannelCoupling, CheckerboardCoupling, FactorOutOrder, RealNVP
from .resnet import ResNet, WNConv2d
from .shift import InvertibleShift

__all__ = [
    "ActNorm", "AdditiveCoupling", "AffineCoupling", "COUPLINGS", "ChannelPermutation", "ConditionalTopPrior",
    "CouplingNet", "LinearZeros",
    "EmergingConv", "FlowStep", "Glow", "InvertibleConv1x1", "InvertibleNxNConv", "InvertibleShift",
    "MaskedConv", "MultiScaleFlow", "PERMUTATIONS", "RealNVP", "ChannelCoupling", "CheckerboardCoupling",
    "Reverse", "Shuffle", "SplitPrior", "Squeeze", "TopPrior", "ZeroConv2d",
    "FactorOutOrder", "InvertibleBatchNorm", "Logit", "ResNet", "StandardSplit", "WNConv2d",
    "check_image_size", "squeeze2d", "unsqueeze2d",
]
