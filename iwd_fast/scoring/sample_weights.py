"""The per-sample factors a differentiated loss gave its samples, and how a capture's results undo them.

A capture sees c_i * delta_i at each layer output when the loss was sum_i c_i l_i (c_i = 1/B for a mean,
w_i / sum w for a weighted mean). Every per-layer dot is linear in delta_i and every squared norm quadratic,
so the results of the unweighted per-sample losses are the captured ones divided by c_i (by c_i^2).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .checks import check_weights, format_indices

__all__ = ["SampleWeights", "inverse_factors", "unscaled", "divisible_factor", "checked_loss_weights"]

SampleWeights = Union[None, str, torch.Tensor]


def inverse_factors(sample_weights: SampleWeights, batch: int, device) -> Optional[torch.Tensor]:
    """1 / c_i, float64 [B], for the factors a caller names: None or "mean" (c_i = 1/B), "sum" (1: returns None,
    nothing to undo) or a tensor [B] of c_i (finite, non-zero: a zero factor hides that sample's gradient)."""
    if sample_weights is None or (isinstance(sample_weights, str) and sample_weights == "mean"):
        return torch.full((batch,), float(batch), device=device, dtype=torch.float64)
    if isinstance(sample_weights, str):
        if sample_weights == "sum":
            return None
        raise ValueError(f"sample_weights must be None, 'mean', 'sum' or a tensor [B], got {sample_weights!r}")
    w = torch.as_tensor(sample_weights, device=device)
    if w.shape != (batch,):
        raise ValueError(f"sample_weights must have shape [{batch}], got {tuple(w.shape)}")
    bad = (~torch.isfinite(w)) | (w == 0)
    if bool(bad.any()):
        raise ValueError(f"sample_weights must be finite and non-zero (a zero weight hides that sample's gradient); "
                         f"bad indices: {format_indices(bad)}")
    return 1.0 / w.to(torch.float64)


def unscaled(total: torch.Tensor, scale: Optional[torch.Tensor], power: int) -> torch.Tensor:
    """Per-sample results [B] or [B, K] of scaled output gradients times ``scale`` [B] (1 / c_i) to the
    ``power``: 1 for dots (linear in a sample's output gradient), 2 for squared norms."""
    if scale is None:
        return total
    s = scale.to(total.dtype)
    s = s if total.dim() == 1 else s.unsqueeze(1)
    for _ in range(power):
        total = total * s
    return total


def divisible_factor(dtype: torch.dtype) -> float:
    """The smallest factor c a captured c * delta can be divided by without precision loss: the cube root of
    the dtype's smallest normal number (float32 2.3e-13; c^-2 then stays far from overflow)."""
    return torch.finfo(dtype).tiny ** (1.0 / 3.0) if dtype.is_floating_point else 0.0


def checked_loss_weights(weights, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``weights`` [B] checked (``checks.check_weights``) and moved to ``like``'s device and dtype."""
    w = torch.as_tensor(weights).detach()
    w = w.to(like.dtype) if not w.dtype.is_floating_point else w
    check_weights(w, batch, "weighted_gradient")
    return w.to(like.device, like.dtype)
