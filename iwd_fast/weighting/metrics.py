"""How well weights and scores separate harmful instances: weight mass on a subset, AUROC."""
from __future__ import annotations

import numpy as np
import torch

from ..scoring.checks import format_indices

__all__ = ["weight_mass_on", "auroc"]


def weight_mass_on(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of ``weights`` [n] (float) carried by the instances where ``mask`` [n] (bool) is True."""
    weights = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    mask = torch.as_tensor(mask).detach().to("cpu")
    if mask.dtype != torch.bool or mask.shape != weights.shape:
        raise ValueError(f"weight_mass_on: mask must be bool {tuple(weights.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    total = float(weights.sum())
    if not total > 0:
        raise ValueError(f"weight_mass_on: total weight must be positive, got {total}")
    return float(weights[mask].sum()) / total


def _auroc_rank(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties."""
    uniq, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1          # 1-based rank of each distinct value's first copy
    avg_rank = first_rank + (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(scores: torch.Tensor, positives: torch.Tensor, *, impl: str = "auto") -> float:
    """Area under the ROC curve of ``scores`` [n] (higher = more suspicious) for flagging ``positives`` [n] bool.

    1.0: every positive scores above every negative; 0.5: no better than chance (ties count half).
    ``impl``: "sklearn" (sklearn.metrics.roc_auc_score), "rank" (Mann-Whitney with average ranks) or
    "auto" (sklearn when installed, else rank).
    """
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64).numpy().reshape(-1)
    p = torch.as_tensor(positives).detach().to("cpu").numpy().reshape(-1)
    if impl not in ("auto", "sklearn", "rank"):
        raise ValueError(f"auroc: impl must be 'auto', 'sklearn' or 'rank', got {impl!r}")
    if p.dtype != np.bool_:
        raise ValueError(f"auroc: positives must be bool, got {p.dtype}")
    if s.shape != p.shape:
        raise ValueError(f"auroc: scores {s.shape} and positives {p.shape} differ in shape")
    bad = np.nonzero(~np.isfinite(s))[0]
    if bad.size:
        raise ValueError(f"auroc: non-finite scores at indices {format_indices(bad.tolist())}")
    if p.all() or not p.any():
        raise ValueError("auroc: needs at least one positive and one negative instance")
    if impl in ("auto", "sklearn"):
        try:
            from sklearn.metrics import roc_auc_score
        except ImportError:
            if impl == "sklearn":
                raise ValueError("auroc: impl='sklearn' requested but scikit-learn is not installed") from None
        else:
            return float(roc_auc_score(p, s))
    return _auroc_rank(s, p)
