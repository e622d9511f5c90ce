"""Built-in distillers (DC, DSA, DM) on the same drop-in hooks offered to other people's loops."""
from .common import IWDState, RealPool, SyntheticSet
from .distribution_matching import DistributionMatching
from .gradient_matching import GradientMatching, layerwise_distance
from .run import METHODS, run_distillation

__all__ = ["METHODS", "run_distillation", "GradientMatching", "DistributionMatching", "layerwise_distance",
           "IWDState", "RealPool", "SyntheticSet"]
