"""Built-in distillers (DC, DSA, DM) on the same drop-in hooks offered to other people's loops."""
from .base import RealPool, SyntheticSet
from .iwd_state import IWDState
from .distribution_matching import DistributionMatching
from .gradient_matching import GradientMatching, layerwise_distance

METHODS = {"dc": GradientMatching, "dsa": GradientMatching, "dm": DistributionMatching}

__all__ = ["METHODS", "GradientMatching", "DistributionMatching", "layerwise_distance", "IWDState", "RealPool",
           "SyntheticSet"]
