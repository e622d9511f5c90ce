"""Input checks shared by every layer: one way to name offending indices, validate labels, refuse
non-finite values. Each raises ValueError with a one-line message that names the problem and where.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

__all__ = ["format_indices", "as_labels", "check_finite", "check_weights"]


def format_indices(indices: Union[Iterable[int], torch.Tensor], limit: int = 10) -> str:
    """``[3, 17, 41, ... (12 more)]``: the first ``limit`` offending indices and how many were left out.

    ``indices`` is a list of ints, or a tensor of indices, or a bool mask (whose True positions are named).
    """
    if isinstance(indices, torch.Tensor):
        t = indices.detach().cpu()
        indices = (t.reshape(-1).nonzero().flatten() if t.dtype == torch.bool else t.reshape(-1)).tolist()
    idx = [int(i) for i in indices]
    more = f", ... ({len(idx) - limit} more)" if len(idx) > limit else ""
    return "[" + ", ".join(str(i) for i in idx[:limit]) + more + "]"


def as_labels(labels, where: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Integer class labels as int64 [n] on the CPU; refuses anything else, naming the bad indices.

    Args:
        labels: integer tensor (or array-like) [n].
        where: the caller's name, which starts the error message.
        num_classes: when given, every label must lie in [0, num_classes); else only >= 0.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be an integer tensor [n], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.detach().to("cpu", torch.int64)
    bad = (labels < 0) if num_classes is None else (labels < 0) | (labels >= int(num_classes))
    if bool(bad.any()):
        span = "must be non-negative" if num_classes is None else f"outside [0, {int(num_classes)})"
        raise ValueError(f"{where}: labels {span} at indices {format_indices(bad)}")
    return labels


def check_finite(values: torch.Tensor, where: str, what: str = "values") -> None:
    """Refuse NaN or Inf anywhere in ``values`` [n, ...], naming the rows (first-dimension indices)."""
    if not isinstance(values, torch.Tensor) or not (values.is_floating_point() or values.is_complex()):
        return
    if values.dim() == 0:
        if not bool(torch.isfinite(values)):
            raise ValueError(f"{where}: {what} is not finite ({float(values)})")
        return
    finite = torch.isfinite(values.detach())
    bad = ~(finite.flatten(1).all(dim=1) if values.dim() > 1 else finite)
    if bool(bad.any()):
        raise ValueError(f"{where}: non-finite {what} (NaN or Inf) at indices {format_indices(bad)}")


def check_weights(weights: torch.Tensor, size: int, where: str) -> None:
    """Per-sample weights must be a floating-point tensor [size], finite, non-negative and not all zero; the
    message names the offending indices. One host sync."""
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise ValueError(f"{where}: weights must be a floating-point tensor")
    if weights.shape != (size,):
        raise ValueError(f"{where}: weights must have shape ({size},), got {tuple(weights.shape)}")
    w = weights.detach()
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        raise ValueError(f"{where}: negative or non-finite weights at indices {format_indices(bad)}")
    if size and not bool((w > 0).any()):
        raise ValueError(f"{where}: all weights are zero")
