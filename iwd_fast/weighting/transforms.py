"""Score transforms and sign policies: how raw influence scores of one class become the z the weights are a
softmax of (METHOD.md section 4), and which sign makes "larger = upweight" right for each target.

| target | raw score | policy -> sign |
|---|---|---|
| explicit, implicit | influence I_i on the distillation loss | informative -> +1, consistent (= auto) -> -1 |
| validation | benefit -I_i (alignment with the held-out descent direction) | auto -> +1 |
| self | squared per-sample gradient norm ||g_i||^2 | auto -> -1 (small norm = trusted) |
| crossfit | out-of-sample margin max_{k != y} p_ik - p_iy | auto -> -1 (small margin = trusted) |
| prototype | embedding margin <f^_i, mu_y - mu_k*> (DM) | auto -> +1 (agrees with its class = trusted) |
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

__all__ = ["SIGN_POLICIES", "TRANSFORMS", "sign_for", "zscore", "rank_normal"]

TRANSFORMS = ("zscore", "rank")

# target -> {accepted policy: sign}; "auto" for explicit/implicit is "consistent" (METHOD.md section 2).
SIGN_POLICIES: Dict[str, Dict[str, int]] = {
    "explicit": {"auto": -1, "consistent": -1, "informative": +1},
    "implicit": {"auto": -1, "consistent": -1, "informative": +1},
    "validation": {"auto": +1},
    "self": {"auto": -1},
    "crossfit": {"auto": -1},  # out-of-sample margin (iwd_fast.weighting.trust): large = suspected wrong label
    "prototype": {"auto": +1},  # DM's embedding margin (targets.prototype_margin): large = agrees with its class
}


def zscore(s: torch.Tensor, scored: torch.Tensor, eps: float) -> torch.Tensor:
    """(s - mean) / (std + eps) over the ``scored`` entries; the others get 0 (the class mean)."""
    known = s[scored]
    z = (s - known.mean()) / (known.std(unbiased=False) + eps)
    return torch.where(scored, z, torch.zeros_like(z))


def rank_normal(s: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Phi^-1((rank - 1/2) / n) over the ``scored`` entries (average ranks for ties); the others get 0."""
    known = s[scored].numpy()
    order = np.argsort(known, kind="stable")
    ranks = np.empty(known.size, dtype=np.float64)
    ranks[order] = np.arange(1, known.size + 1, dtype=np.float64)
    uniq, inverse = np.unique(known, return_inverse=True)
    if uniq.size < known.size:  # ties share their average rank
        ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    z = torch.zeros_like(s)
    z[scored] = torch.special.ndtri(torch.from_numpy((ranks - 0.5) / known.size))
    return z


def sign_for(target: str, policy: str = "auto") -> int:
    """Sign (+1 or -1) that makes "larger signed score = larger weight" right for ``target`` and ``policy``.

    "auto" for explicit/implicit means "consistent" (-1): benchmarks/RESULTS.md measured that
    "informative" amplifies mislabeled instances. validation and self only accept "auto".
    """
    if target not in SIGN_POLICIES:
        raise ValueError(f"sign_for: unknown target {target!r}; expected one of {sorted(SIGN_POLICIES)}")
    allowed = SIGN_POLICIES[target]
    if policy not in allowed:
        raise ValueError(f"sign_for: policy {policy!r} is not valid for target {target!r}; "
                         f"expected one of {sorted(allowed)}")
    return allowed[policy]
