"""The three dataset-scoring targets and what each needs before the scoring pass.

  validation  s_i = <g_i, v>, v = scale * grad_theta of the mean loss over a validation set
              (METHOD.md 2c; a held-out split given as positions into the scored data, or its own set)
  self        s_i = ||g_i||^2                      (METHOD.md 2e)
  direction   s_i = <g_i, v_k> for user-given directions (any form ``stack_directions`` takes, or a
              ``.pt`` file of one), K >= 1 in one pass
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..checks import format_indices
from ..params import StackedDirections, stack_directions, trainable_parameters
from .fingerprint import named_tensors_sha256, tensors_sha256
from .source import Source, as_source, nonfinite_rows, split_batch

__all__ = ["DATASET_TARGETS", "Target", "resolve_target", "mean_loss_gradient"]

DATASET_TARGETS = ("validation", "self", "direction")


@dataclass
class Target:
    """``name``; ``descriptor``: what identifies it before any work; ``stacked``: the directions (known
    up front for "direction", computed for "validation", None for "self"); ``validation``: its set;
    ``validation_positions``: positions into the scored data when the validation set is a held-out split."""

    name: str
    descriptor: Dict[str, object]
    stacked: Optional[StackedDirections] = None
    validation: Optional[Source] = None
    validation_positions: Optional[torch.Tensor] = None
    scale: float = 1.0


def resolve_target(model: torch.nn.Module, target: str, source: Source, validation, directions, scale: float,
                   batch_size: int, num_workers: int, pin_memory: bool) -> Target:
    """Check the target's inputs and fingerprint them (no scoring work yet)."""
    if target not in DATASET_TARGETS:
        raise ValueError(f"score_dataset: target must be one of {DATASET_TARGETS}, got {target!r}")
    if target == "self":
        if validation is not None or directions is not None:
            raise ValueError("score_dataset: target 'self' takes neither validation= nor directions=")
        return Target("self", {"target": "self"})
    if target == "direction":
        if directions is None:
            raise ValueError("score_dataset: target 'direction' needs directions= (a dict, a list of dicts, tensors "
                             "aligned with the trainable parameters, or a .pt file of one)")
        if isinstance(directions, (str, Path)):
            path = Path(directions)
            if not path.is_file():
                raise ValueError(f"score_dataset: direction file {path} does not exist")
            directions = torch.load(path, map_location="cpu", weights_only=True)
        stacked = stack_directions(model, directions)
        return Target("direction", {"target": "direction", "directions": named_tensors_sha256(stacked.tensors),
                                    "k": stacked.k, "single": stacked.single}, stacked=stacked)
    if validation is None:
        raise ValueError("score_dataset: target 'validation' needs validation=: positions of a held-out split of the "
                         "data (e.g. from iwd_fast.data.stratified_split) or a validation set")
    if not float(scale) > 0:
        raise ValueError(f"score_dataset: scale must be > 0, got {scale}")
    positions = _positions(validation, source.n)
    if positions is not None:
        vsrc = source.subset(positions.tolist())
        desc = {"target": "validation", "heldout_positions": tensors_sha256([positions]), "scale": float(scale)}
    else:
        vsrc = as_source(validation, batch_size, num_workers, pin_memory)
        desc = {"target": "validation", "validation_set": vsrc.fingerprint(), "n_validation": vsrc.n,
                "scale": float(scale)}
    if vsrc.n == 0:
        raise ValueError("score_dataset: the validation set is empty")
    return Target("validation", desc, validation=vsrc, validation_positions=positions, scale=float(scale))


def _positions(validation, n: int) -> Optional[torch.Tensor]:
    """int64 positions when ``validation`` is a list/tensor of indices into the data, else None."""
    if isinstance(validation, torch.Tensor) and not validation.is_floating_point() and validation.dim() == 1:
        pos = validation.to("cpu", torch.long)
    elif isinstance(validation, (list, tuple)) and all(isinstance(i, int) for i in validation):
        pos = torch.tensor(validation, dtype=torch.long)
    else:
        return None
    bad = (pos < 0) | (pos >= n)
    if bool(bad.any()):
        raise ValueError(f"score_dataset: validation positions outside [0, {n}) at entries {format_indices(bad)}")
    if pos.unique().numel() != pos.numel():
        raise ValueError("score_dataset: validation positions repeat")
    return torch.sort(pos).values


def mean_loss_gradient(model: torch.nn.Module, vsrc: Source, loss_fn: Callable, device: torch.device, scale: float,
                       progress=None) -> Dict[str, torch.Tensor]:
    """{name: scale * grad of the mean per-sample loss over ``vsrc``} for the trainable parameters.

    One ordinary backward of each batch's summed per-sample losses (METHOD.md 2c), batches in order.
    Non-finite validation inputs are refused by position (a direction must not be NaN).
    """
    named = list(trainable_parameters(model).items())
    params: List[torch.Tensor] = [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    bar = progress(total=vsrc.n, desc="validation direction", unit="img") if progress else None
    seen = 0
    for batch in vsrc.loader(range(vsrc.n)):
        x, y = split_batch(batch, seen)
        bad = nonfinite_rows(x) | nonfinite_rows(y)
        if bool(bad.any()):
            raise ValueError(f"score_dataset: non-finite validation inputs (NaN or Inf) at validation positions "
                             f"{format_indices((bad.nonzero().flatten() + seen).tolist())}")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.enable_grad():
            losses = loss_fn(model(x), y)
            if losses.shape != (x.shape[0],):
                raise ValueError(f"loss must return per-sample losses of shape [{x.shape[0]}], got {tuple(losses.shape)}")
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g)
        seen += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return {n: scale * t / seen for (n, _), t in zip(named, total)}
