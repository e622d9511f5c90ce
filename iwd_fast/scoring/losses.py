"""Per-sample losses: the scalar whose gradient every score is taken of."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from .checks import format_indices

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossSpec = Union[str, PerSampleLoss]

__all__ = ["PerSampleLoss", "LossSpec", "cross_entropy_per_sample", "weighted_mean", "resolve_loss", "check_labels"]


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy per sample, [B].

    Args:
        logits: [B, C] (or [B, C, *] for dense prediction, summed over the trailing positions).
        labels: int64 class indices [B] (or [B, *]), or soft labels (probabilities) shaped like ``logits``.
    """
    if labels.is_floating_point():
        loss = -(labels * F.log_softmax(logits, dim=1)).sum(dim=1)
    else:  # any integer dtype (int32 labels included; F.cross_entropy takes int64 only)
        loss = F.cross_entropy(logits, labels if labels.dtype == torch.int64 else labels.long(), reduction="none")
    return loss.reshape(loss.shape[0], -1).sum(dim=1) if loss.dim() > 1 else loss


def weighted_mean(losses: torch.Tensor, weights: "torch.Tensor | None") -> torch.Tensor:
    """sum_i w_i l_i / sum_j w_j of per-sample ``losses`` [B] (the plain mean for ``weights`` None), a scalar.

    THE expression of a weighted real loss: ``weighting.weighted_cross_entropy`` and
    ``Capture.weighted_gradient`` both reduce with it, so a scored step's gradient is bitwise the unscored
    one. ``weights`` [B] (any positive scale, unchecked here) move to the losses' device and dtype.
    """
    if weights is None:
        return losses.mean()
    w = weights.to(losses.device, losses.dtype)
    return (w * losses).sum() / w.sum()


def resolve_loss(loss: LossSpec) -> PerSampleLoss:
    """Turn ``"cross_entropy"`` or a callable ``(outputs, labels) -> [B]`` into a per-sample loss."""
    if callable(loss):
        return loss
    if loss in ("cross_entropy", "ce"):
        return cross_entropy_per_sample
    raise ValueError(f"unknown loss {loss!r}: pass 'cross_entropy' or a callable (outputs, labels) -> [B]")


def check_labels(loss: LossSpec, outputs_shape: torch.Size, labels: torch.Tensor, batch: int) -> None:
    """Validate labels before any work, naming offending indices (checks that vmap cannot do)."""
    if labels.shape[0] != batch:
        raise ValueError(f"labels have {labels.shape[0]} rows but inputs have {batch}")
    if callable(loss) or batch == 0:
        return
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices or float soft labels, got {labels.dtype}")
    if len(outputs_shape) < 2:
        raise ValueError(f"cross entropy needs logits [B, C] but the model's outputs have shape {tuple(outputs_shape)}")
    num_classes = outputs_shape[1]
    if labels.is_floating_point():
        if labels.dim() == 1 and len(outputs_shape) >= 2:
            raise ValueError(f"labels are {labels.dtype} of shape [{batch}]: cross entropy takes int64 class indices "
                             f"[{batch}] (convert with labels.long()) or soft labels (probabilities) of the logits' "
                             f"shape {tuple(outputs_shape)}")
        if labels.shape != outputs_shape:
            raise ValueError(f"soft labels must have the logits' shape {tuple(outputs_shape)}, got {tuple(labels.shape)}")
        bad = (~torch.isfinite(labels)).flatten(1).any(1) | (labels < 0).flatten(1).any(1)
        if bad.any():
            raise ValueError(f"soft labels must be finite and non-negative; bad rows: {format_indices(bad)}")
        return
    if labels.shape[1:] != outputs_shape[2:]:
        want = f"[{batch}]" if len(outputs_shape) == 2 else f"{[batch, *outputs_shape[2:]]} (dense logits)"
        raise ValueError(f"class-index labels of shape {tuple(labels.shape)} do not fit the model's logits "
                         f"{tuple(outputs_shape)}: cross entropy takes labels {want}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        rows = bad.reshape(batch, -1).any(1)
        raise ValueError(f"labels outside [0, {num_classes}) at indices {format_indices(rows)}")
