"""What a dataset-scoring run reads: any map-style dataset, a DataLoader, or tensors, as one ``Source``.

Scores are indexed by dataset position, so a source is always read in order, in fixed batches of
``batch_size`` positions (batch b = positions [b * batch_size, (b + 1) * batch_size)); each process of
a distributed run reads only its own chunks of whole batches. Items are ``(input, label)`` pairs
(extra entries are ignored); inputs and labels are collated by the DataLoader's ``collate_fn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from ..checks import format_indices
from .fingerprint import dataset_probe_sha256

__all__ = ["Source", "TensorPairs", "as_source", "split_batch", "nonfinite_rows", "describe_rows"]


class TensorPairs(Dataset):
    """(inputs [N, ...], labels [N, ...]) as a map-style dataset of (input, label) pairs."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"score_dataset: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]


@dataclass
class Source:
    """A dataset read in fixed batches. ``tensors``: (inputs, labels) when the whole set is in memory."""

    dataset: Dataset
    n: int
    batch_size: int
    num_workers: int
    collate_fn: Callable
    pin_memory: bool
    tensors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def fingerprint(self) -> str:
        return dataset_probe_sha256(self.dataset, self.n, self.tensors)

    def loader(self, positions: Sequence[int]) -> DataLoader:
        """Batches over ``positions`` (whole batches of the fixed grid, in order)."""
        if self.tensors is not None:
            return _TensorBatches(self.tensors, positions, self.batch_size)
        subset = Subset(self.dataset, list(positions))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def subset(self, positions: Sequence[int]) -> "Source":
        """The items at ``positions`` as a source of their own (a held-out split of this one)."""
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        tensors = None if self.tensors is None else (self.tensors[0][idx], self.tensors[1][idx])
        return Source(Subset(self.dataset, idx.tolist()), int(idx.numel()), self.batch_size, self.num_workers,
                      self.collate_fn, self.pin_memory, tensors)


class _TensorBatches:
    """In-memory batches: slices (contiguous positions) or one gather per batch; no worker processes."""

    def __init__(self, tensors, positions: Sequence[int], batch_size: int):
        self.tensors, self.positions, self.batch_size = tensors, list(positions), batch_size

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self):
        x, y = self.tensors
        for s in range(0, len(self.positions), self.batch_size):
            pos = self.positions[s:s + self.batch_size]
            if pos[-1] - pos[0] == len(pos) - 1:
                yield x[pos[0]:pos[-1] + 1], y[pos[0]:pos[-1] + 1]
            else:
                idx = torch.as_tensor(pos, dtype=torch.long)
                yield x[idx], y[idx]


def as_source(data, batch_size: int = 256, num_workers: int = 0, pin_memory: bool = False) -> Source:
    """A :class:`Source` from a map-style Dataset, a DataLoader, (inputs, labels) tensors, or an object
    with ``images`` and ``labels`` tensors (``iwd_fast.data.ImageSet``).

    A DataLoader gives its dataset, batch size, workers, collate_fn and pin_memory; it must read in
    order (no shuffle, no sampler): scores are indexed by dataset position.
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"score_dataset: batch_size must be >= 1, got {batch_size}")
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise ValueError("score_dataset: the DataLoader shuffles or uses its own sampler; scores are indexed by "
                             "dataset position: pass a DataLoader with shuffle=False (or the dataset itself)")
        return _from_dataset(data.dataset, data.batch_size, data.num_workers, data.collate_fn, data.pin_memory)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return _from_tensors(data[0], data[1], batch_size)
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return _from_tensors(images, labels, batch_size)
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return _from_tensors(data.tensors[0], data.tensors[1], batch_size)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return _from_dataset(data, int(batch_size), int(num_workers), default_collate, pin_memory)
    raise ValueError(f"score_dataset: data must be a map-style Dataset, a DataLoader, (inputs, labels) tensors or an "
                     f"ImageSet, got {type(data).__name__}")


def _from_tensors(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Source:
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"score_dataset: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
    ds = TensorPairs(inputs, labels)
    return Source(ds, len(ds), int(batch_size), 0, default_collate, False, (inputs, labels))


def _from_dataset(ds, batch_size: int, num_workers: int, collate_fn, pin_memory: bool) -> Source:
    try:
        n = len(ds)
    except TypeError:
        raise ValueError(f"score_dataset: {type(ds).__name__} has no len(): scoring needs a map-style dataset "
                         "(scores are indexed by position)") from None
    return Source(ds, int(n), int(batch_size), int(num_workers), collate_fn or default_collate, bool(pin_memory))


def split_batch(batch, first: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, ...], labels [B, ...]) of one collated batch whose first item is dataset position ``first``."""
    if isinstance(batch, dict):
        keys = [k for k in ("input", "inputs", "image", "images", "x") if k in batch]
        lab = [k for k in ("label", "labels", "target", "targets", "y") if k in batch]
        if keys and lab:
            batch = (batch[keys[0]], batch[lab[0]])
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"score_dataset: items must be (input, label) pairs; the batch at dataset position {first} "
                         f"is a {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"score_dataset: inputs must collate to a tensor; at dataset position {first} they are "
                         f"{type(x).__name__}")
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"score_dataset: the batch at dataset position {first} has {x.shape[0]} inputs but "
                         f"{y.shape[0]} labels")
    return x, y


def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """bool [B]: rows of ``t`` [B, ...] with NaN or Inf (all False for integer tensors)."""
    if not t.is_floating_point() or t.shape[0] == 0:
        return torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    finite = torch.isfinite(t)
    return ~(finite.flatten(1).all(dim=1) if t.dim() > 1 else finite)


def describe_rows(mask: torch.Tensor, first: int) -> str:
    """Dataset positions of the True rows of ``mask`` for a batch starting at ``first``."""
    return format_indices((mask.nonzero().flatten() + first).tolist())
