"""Fingerprints: sha256 digests of tensors, model states, directions and datasets.

A digest covers each tensor's dtype, shape and bytes (C order), so equal digests mean bitwise-equal
tensors. Scoring runs record these to refuse mixing runs on resume (``store``) and to name exactly
what was scored.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["update_digest", "tensors_sha256", "model_sha256", "named_tensors_sha256", "dataset_probe_sha256",
           "PROBE_ITEMS"]

PROBE_ITEMS = 16  # items read to fingerprint a dataset that is not held as tensors


def update_digest(h, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes into the hashlib object ``h``."""
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bool
                 else flat.to(torch.uint8).numpy().tobytes())


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        update_digest(h, t)
    return h.hexdigest()


def named_tensors_sha256(named: Mapping[str, torch.Tensor]) -> str:
    """Digest of {name: tensor}, names sorted (so dict order does not matter)."""
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode() + b"\0")
        update_digest(h, named[name])
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """Digest of the model's state_dict (parameters and buffers) and its class name."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    h.update(named_tensors_sha256(model.state_dict()).encode())
    return h.hexdigest()


def dataset_probe_sha256(dataset, n: int, tensors: Optional[Sequence[torch.Tensor]] = None) -> str:
    """Fingerprint of a dataset before scoring it.

    Held as tensors (``tensors`` given): every byte. Otherwise ``len``, the class name and the first
    tensor(s) of ``PROBE_ITEMS`` items spread evenly over the dataset (cheap; the run also records a
    digest of everything it scored, chunk by chunk).
    """
    h = hashlib.sha256(f"{type(dataset).__module__}.{type(dataset).__qualname__}:{n}".encode())
    if tensors is not None:
        for t in tensors:
            update_digest(h, t)
        return h.hexdigest()
    picks = sorted({(i * (n - 1)) // max(1, PROBE_ITEMS - 1) for i in range(PROBE_ITEMS)}) if n else []
    for i in picks:
        item = dataset[i]
        for part in (item if isinstance(item, (tuple, list)) else (item,)):
            update_digest(h, torch.as_tensor(part))
    return h.hexdigest()
