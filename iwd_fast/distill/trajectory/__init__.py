"""Trajectory matching (MTT, DATM) on expert trajectories trained with a weighted cross entropy, and the
two-pass IWD scheme (METHOD.md 2d): ``buffer`` (snapshots on disk), ``experts`` (training, resume),
``student`` (flat-parameter unroll and matching loss), ``checkpoint_scores`` (influence along expert
checkpoints), ``prepare`` (the stage before distillation), ``mtt`` and ``datm`` (the distillers)."""
from .buffer import ExpertBuffer
from .datm import DATM
from .mtt import TrajectoryMatching

__all__ = ["ExpertBuffer", "TrajectoryMatching", "DATM"]
