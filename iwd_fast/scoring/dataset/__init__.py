"""Dataset-scale scoring: every instance of a dataset against a model, streamed through a DataLoader,
written in atomic resumable chunks, sharded over torch.distributed ranks.

``score_dataset`` (run) drives it; ``source`` reads any map-style dataset in fixed batches,
``score_targets`` resolves validation / self / direction, ``store`` owns the output folder, ``shard`` the
ranks, ``fingerprint`` the digests that keep runs apart. Imports torch only (the engine's rule).
"""
from .run import NONFINITE_POLICIES, ScoreResult, score_dataset
from .score_targets import DATASET_TARGETS
from .shard import Shard, init_from_env

__all__ = ["score_dataset", "ScoreResult", "NONFINITE_POLICIES", "DATASET_TARGETS", "Shard", "init_from_env"]
