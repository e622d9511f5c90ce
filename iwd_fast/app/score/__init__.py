"""``iwd-fast score``: the job (``job``) and what it reads (``inputs``); the scoring itself is the engine's
``iwd_fast.scoring.dataset.score_dataset``."""
from .job import ScoreConfig, run_score

__all__ = ["ScoreConfig", "run_score"]
