"""Built-in distillers (DC, DSA, DM, MTT, DATM, IDC, and PDD on MTT or IDC) on the same drop-in hooks offered to
other people's loops."""
from .base import RealPool, SyntheticSet
from .iwd_state import IWDState
from .distribution_matching import DistributionMatching
from .gradient_matching import GradientMatching, layerwise_distance
from .idc import IDC
from .pdd import PDD
from .trajectory import DATM, TrajectoryMatching

METHODS = {"dc": GradientMatching, "dsa": GradientMatching, "dm": DistributionMatching,
           "mtt": TrajectoryMatching, "datm": DATM, "idc": IDC, "pdd": PDD}

__all__ = ["METHODS", "GradientMatching", "DistributionMatching", "TrajectoryMatching", "DATM", "IDC", "PDD",
           "layerwise_distance", "IWDState", "RealPool", "SyntheticSet"]
