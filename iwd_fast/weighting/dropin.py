"""Drop-in pieces that put instance weights into other people's distillation loops (METHOD.md section 1).

The weight enters a base method at exactly one place:

- gradient matching (DC, DSA) and expert training (MTT, FTD, DATM): the real loss becomes
  :func:`weighted_cross_entropy` before ``autograd.grad``;
- distribution matching (DM): the class mean of real embeddings becomes :func:`weighted_class_mean`;
- real-image initialisation of the synthetic set: :func:`select_initial`.

Reference loops draw real batches without returning indices; :class:`IndexedClassSampler` draws per-class
batches and returns the dataset indices, so that ``weights[idx]`` can be looked up. All randomness comes
from explicitly seeded ``torch.Generator`` objects: no global RNG, no time.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..scoring.checks import as_labels, check_weights, format_indices
from ..scoring.losses import weighted_mean

__all__ = ["weighted_cross_entropy", "weighted_class_mean", "normalize_weights", "IndexedClassSampler",
           "IndexedDataset", "select_initial", "INIT_MODES"]

INIT_MODES = ("top", "proportional", "random", "trusted")


def normalize_weights(weights: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """wn = w / sum(w), same shape and dtype as ``weights`` [B]. Gradients flow through ``weights``."""
    if validate:
        if not isinstance(weights, torch.Tensor) or weights.dim() != 1:
            raise ValueError("normalize_weights: weights must be a tensor [B]")
        check_weights(weights, weights.shape[0], "normalize_weights")
    return weights / weights.sum()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None,
                           *, validate: bool = True) -> torch.Tensor:
    """Weighted mean cross-entropy sum_i wn_i * CE_i with wn = w / sum(w); a scalar.

    Args:
        logits: float [B, C].
        labels: int64 [B].
        weights: float [B] (>= 0, finite, not all zero) or None for the plain mean.
        validate: check the weights (costs one host sync on GPU); set False inside hot loops.

    A class-mixed batch (expert training of trajectory matching) takes the dataset weights of its
    instances (e.g. ``InfluenceWeighter.batch_weights(idx)``): the weighted mean over the batch is what a
    weighted training set contributes to an SGD step. For gradient matching pass ONE class's batch (the
    per-class weighted mean of METHOD.md section 1). The weights follow the logits' device; gradients flow
    into ``weights`` too, so dL/dw is available by autograd.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"weighted_cross_entropy: expected logits [B, C] and labels [B], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("weighted_cross_entropy: empty batch")
    if weights is None:
        return F.cross_entropy(logits, labels)
    if validate:
        check_weights(weights, logits.shape[0], "weighted_cross_entropy")
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)


def weighted_class_mean(features: torch.Tensor, weights: Optional[torch.Tensor] = None,
                        *, dim: int = 0, validate: bool = True) -> torch.Tensor:
    """Weighted mean along ``dim``: sum_i w_i f_i / sum_i w_i.

    Args:
        features: float [B, ...] (e.g. DM's embeddings of the real images of one class), or any shape
            with the batch along ``dim`` (DM's ConvNetBN branch: [C, B, F] with ``dim=1``).
        weights: None for the plain mean; float [B] (>= 0, finite, not all zero), or shaped like
            ``features`` up to and including ``dim`` ([C, B] for the example above: one set per class).
    Returns:
        ``features`` with ``dim`` reduced, in its dtype; the weights follow its device.
    """
    dim = dim % max(features.dim(), 1)
    if features.dim() < 1 or features.shape[dim] == 0:
        raise ValueError(f"weighted_class_mean: features need a non-empty batch along dim {dim}, got "
                         f"{tuple(features.shape)}")
    if weights is None:
        return features.mean(dim=dim)
    w = weights.to(features.device, features.dtype)
    if w.dim() == 1 and w.shape[0] == features.shape[dim]:
        shape = [1] * features.dim()
        shape[dim] = w.shape[0]
        w = w.reshape(shape)
    elif tuple(w.shape) == tuple(features.shape[:dim + 1]):
        w = w.reshape(*w.shape, *([1] * (features.dim() - dim - 1)))
    else:
        raise ValueError(f"weighted_class_mean: weights of shape {tuple(weights.shape)} fit neither [{features.shape[dim]}] "
                         f"nor {tuple(features.shape[:dim + 1])} for features {tuple(features.shape)} along dim {dim}")
    if validate:
        check_weights(w.reshape(-1), w.numel(), "weighted_class_mean")
        sums = w.sum(dim=dim)
        if bool((sums <= 0).any()):
            raise ValueError("weighted_class_mean: a set of weights along dim sums to zero")
    return (w * features).sum(dim=dim) / w.sum(dim=dim)


def _draw_weighted(members: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator,
                   where: str, c: int) -> torch.Tensor:
    """k distinct members drawn in proportion to their weights (weights: float [n] over the whole dataset)."""
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    w_c = w[members]
    bad = members[~torch.isfinite(w_c) | (w_c < 0)]
    if bad.numel():
        raise ValueError(f"{where}: negative or non-finite weights at indices {format_indices(bad.tolist())}")
    positive = int((w_c > 0).sum())
    if positive < k:
        raise ValueError(f"{where}: class {c} has {positive} instances with positive weight, cannot draw {k} "
                         f"without replacement")
    return members[torch.multinomial(w_c, k, replacement=False, generator=gen)]


class IndexedClassSampler:
    """Per-class real batches that come with their dataset indices.

    Args:
        labels: int64 [n].
        num_classes: number of classes C.
        seed: seeds the sampler's own CPU ``torch.Generator``; the global RNG is never touched.
        support: bool [n] or None: draw only these instances (e.g. ``weights > 0``: instances whose weight
            is 0 would only shrink a batch's effective size). None: every instance.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, seed: int = 0,
                 support: Optional[torch.Tensor] = None):
        self.labels = as_labels(labels, "IndexedClassSampler", num_classes)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        keep = torch.ones_like(self.labels, dtype=torch.bool)
        if support is not None:
            keep = torch.as_tensor(support).detach().to("cpu")
            if keep.dtype != torch.bool or keep.shape != self.labels.shape:
                raise ValueError(f"IndexedClassSampler: support must be bool {tuple(self.labels.shape)}, got "
                                 f"{keep.dtype} {tuple(keep.shape)}")
            emptied = [c for c in range(self.num_classes) if bool((self.labels == c).any())
                       and not bool(keep[self.labels == c].any())]
            if emptied:
                raise ValueError(f"IndexedClassSampler: support excludes every instance of classes "
                                 f"{format_indices(emptied)}")
        self.members: List[torch.Tensor] = [torch.nonzero((self.labels == c) & keep).flatten()
                                            for c in range(self.num_classes)]
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def _members_of(self, c: int, batch_size: int, where: str) -> torch.Tensor:
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"{where}: class {c} outside [0, {self.num_classes})")
        if int(batch_size) < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
        members = self.members[int(c)]
        if members.numel() == 0:
            raise ValueError(f"{where}: class {c} has no instances")
        return members

    def sample(self, c: int, batch_size: int) -> torch.Tensor:
        """Indices int64 [min(batch_size, n_c)] of class ``c``, uniformly without replacement."""
        members = self._members_of(c, batch_size, "IndexedClassSampler.sample")
        perm = torch.randperm(members.numel(), generator=self.generator)
        return members[perm[:batch_size]]

    def sample_weighted(self, c: int, batch_size: int, weights: torch.Tensor) -> torch.Tensor:
        """Indices int64 [min(batch_size, n_c)] of class ``c`` drawn in proportion to ``weights`` [n]
        (whole-dataset weights, e.g. ``InfluenceWeighter.weights()``), without replacement."""
        where = "IndexedClassSampler.sample_weighted"
        members = self._members_of(c, batch_size, where)
        if torch.as_tensor(weights).shape != (self.labels.numel(),):
            raise ValueError(f"{where}: weights must have shape ({self.labels.numel()},), got "
                             f"{tuple(torch.as_tensor(weights).shape)}")
        return _draw_weighted(members, weights, min(int(batch_size), members.numel()), self.generator, where, c)

    def state_dict(self) -> Dict[str, object]:
        """Generator state (uint8 tensor), seed and dataset size, so a resumed run continues the same stream."""
        return {"generator_state": self.generator.get_state(), "seed": self.seed, "n": int(self.labels.numel()),
                "num_classes": self.num_classes}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if int(state["n"]) != self.labels.numel() or int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"IndexedClassSampler.load_state_dict: state is for n={state['n']}, "
                             f"num_classes={state['num_classes']}; this sampler has n={self.labels.numel()}, "
                             f"num_classes={self.num_classes}")
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator_state"])


class IndexedDataset(Dataset):
    """A map-style dataset whose items carry their index: ``dataset[i] + (i,)``, so a DataLoader yields
    (x, y, idx) batches and ``weights[idx]`` can be looked up (expert training of MTT/DATM)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


def select_initial(labels: torch.Tensor, weights: Optional[torch.Tensor], num_classes: int, ipc: int,
                   mode: str = "top", seed: int = 0) -> torch.Tensor:
    """Indices of the real instances that initialise the synthetic set, int64 [num_classes * ipc].

    Args:
        labels: int64 [n].
        weights: float [n] (e.g. ``InfluenceWeighter.weights()``); may be None for mode "random".
        ipc: images per class.
        mode: "top" (the ipc highest-weight instances of each class, ties to the lower index),
            "proportional" (ipc drawn in proportion to the weights, without replacement),
            "trusted" (ipc drawn uniformly among the instances with positive weight, the rest of a class
            filling in, drawn the same way, only where fewer than ipc are trusted: the start for
            ``trust_weights``, as diverse as a random start without the suspects, and the very draw of
            "random" where every weight is positive) or
            "random" (ipc drawn uniformly without replacement). "weighted" is accepted for "top".
        seed: seeds a private ``torch.Generator`` (unused by "top").

    Returned class by class: entries [c*ipc, (c+1)*ipc) belong to class c.
    """
    mode = "top" if mode == "weighted" else mode
    if mode not in INIT_MODES:
        raise ValueError(f"select_initial: mode must be one of {INIT_MODES}, got {mode!r}")
    if int(ipc) < 1:
        raise ValueError(f"select_initial: ipc must be >= 1, got {ipc}")
    labels = as_labels(labels, "select_initial", num_classes)
    if weights is None:
        if mode != "random":
            raise ValueError(f"select_initial: mode {mode!r} needs weights")
    else:
        weights = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        if weights.shape != labels.shape:
            raise ValueError(f"select_initial: weights shape {tuple(weights.shape)} does not match labels "
                             f"shape {tuple(labels.shape)}")
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    small = [c for c in range(num_classes) if members[c].numel() < ipc]
    if small:
        raise ValueError(f"select_initial: classes {format_indices(small)} have fewer than ipc={ipc} instances")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    picked = []
    for c, m in enumerate(members):
        if mode == "random":
            picked.append(m[torch.randperm(m.numel(), generator=gen)[:ipc]])
        elif mode == "trusted":
            bad = m[~torch.isfinite(weights[m]) | (weights[m] < 0)]
            if bad.numel():
                raise ValueError(f"select_initial: negative or non-finite weights at indices {format_indices(bad.tolist())}")
            trusted = weights[m] > 0
            order = torch.cat([m[trusted], m[~trusted]])  # the trusted first, in index order
            first = torch.randperm(int(trusted.sum()), generator=gen)
            rest = torch.randperm(int((~trusted).sum()), generator=gen) + first.numel() if first.numel() < ipc \
                else first.new_zeros(0)
            picked.append(order[torch.cat([first, rest])[:ipc]])
        elif mode == "proportional":
            picked.append(_draw_weighted(m, weights, ipc, gen, "select_initial", c))
        else:
            w_c = weights[m]
            bad = m[~torch.isfinite(w_c)]
            if bad.numel():
                raise ValueError(f"select_initial: non-finite weights at indices {format_indices(bad.tolist())}")
            order = torch.sort(w_c, descending=True, stable=True).indices
            picked.append(m[order[:ipc]])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)
