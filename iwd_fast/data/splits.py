"""Label noise and stratified splits of a labelled set (all seeded, never the global RNG)."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from ..scoring.checks import as_labels
from .datasets import ImageSet

__all__ = ["add_label_noise", "stratified_split", "stratified_subset", "class_indices"]


def add_label_noise(labels: torch.Tensor, rate: float, kind: str = "symmetric",
                    num_classes: Optional[int] = None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * N)`` labels chosen at random.

    labels: int [N]. ``symmetric``: a flipped label is drawn uniformly from the other classes;
    ``pairflip``: y -> (y + 1) % num_classes. Returns (noisy int64 [N], flipped bool [N]).
    """
    labels = as_labels(labels, "add_label_noise")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"add_label_noise: rate must be in [0, 1), got {rate}")
    if kind not in ("symmetric", "pairflip"):
        raise ValueError(f"add_label_noise: kind must be 'symmetric' or 'pairflip', got {kind!r}")
    n = labels.numel()
    c = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if n else 0)
    if n and int(labels.max()) >= c:
        raise ValueError(f"add_label_noise: labels go up to {int(labels.max())} but num_classes={c}")
    k = int(round(float(rate) * n))
    if k > 0 and c < 2:
        raise ValueError("add_label_noise: flipping labels needs num_classes >= 2")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:k]
    noisy = labels.clone()
    if kind == "symmetric":
        offset = torch.randint(1, max(c, 2), (k,), generator=gen)
        noisy[chosen] = (labels[chosen] + offset) % c
    else:
        noisy[chosen] = (labels[chosen] + 1) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def stratified_split(labels: torch.Tensor, fraction: float,
                     seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``round(fraction * n_c)`` instances of every class c.

    A class with >= 2 instances gives at least 1 (when fraction > 0) and keeps at least 1.
    Returns (keep_idx, heldout_idx), sorted int64 indices into ``labels`` [N]; same seed, same split.
    """
    labels = as_labels(labels, "stratified_split")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"stratified_split: fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_c = idx.numel()
        k = int(round(float(fraction) * n_c))
        if fraction > 0 and n_c >= 2:
            k = max(k, 1)
        k = min(k, max(n_c - 1, 0))
        perm = idx[torch.randperm(n_c, generator=gen)]
        held.append(perm[:k])
        keep.append(perm[k:])
    empty = [torch.zeros(0, dtype=torch.long)]
    return torch.sort(torch.cat(keep + empty)).values, torch.sort(torch.cat(held + empty)).values


def class_indices(labels: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Indices of each class: a list of ``num_classes`` int64 tensors into ``labels`` [N]."""
    labels = as_labels(labels, "class_indices")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"class_indices: labels go up to {int(labels.max())} but num_classes={num_classes}")
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def stratified_subset(s: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A class-stratified subset of about ``n`` instances of ``s`` (deterministic for a seed)."""
    _, picked = stratified_split(s.labels, min(1.0, n / len(s)), seed=seed)
    return dataclasses.replace(s, images=s.images[picked], labels=s.labels[picked])
