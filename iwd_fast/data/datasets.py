"""Datasets as normalised tensors: the :class:`ImageSet` and :class:`DatasetSplits` containers and
builders from tensors or a torch Dataset.

Every dataset is float32 images ``[N, C, H, W]`` normalised with the per-channel mean/std of the train
split, and int64 labels ``[N]``. ``iwd_fast.data.loaders`` reads the standard files of the named
datasets; ``iwd_fast.data.splits`` adds label noise and stratified splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..scoring.checks import as_labels

__all__ = ["ImageSet", "DatasetSplits", "from_tensors", "from_torch_dataset", "make_splits"]


@dataclass
class ImageSet:
    """One split. ``images`` float32 [N, C, H, W] (normalised), ``labels`` int64 [N].

    ``mean``/``std`` are the per-channel statistics used for normalisation (length C), so that
    ``denormalize`` recovers pixel values in [0, 1] for plots.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    mean: tuple
    std: tuple
    class_names: Optional[List[str]] = None

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dim() != 4 or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"ImageSet {self.name!r}: need images [N, C, H, W] and labels [N], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1]:
            raise ValueError(f"ImageSet {self.name!r}: mean/std need {x.shape[1]} entries")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def im_size(self) -> Tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``x`` [..., C, H, W]; returns pixel values (not clamped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean


@dataclass
class DatasetSplits:
    """The train and test :class:`ImageSet` of one dataset (test normalised with train statistics).

    ``origin``: where the data came from, for the run folder (a dataset of one's own: its source, kind,
    image size and how the test set was made, split seed included); None for the built-in datasets.
    """

    train: ImageSet
    test: ImageSet
    origin: Optional[Dict[str, Any]] = None

    def record(self) -> Dict[str, Any]:
        """What a run folder keeps about its data (data.json): names, shapes, the normalisation statistics of
        the training split, the split sizes, a fingerprint of the normalised tensors and the origin."""
        digest = hashlib.sha256()
        for t in (self.train.images, self.train.labels, self.test.images, self.test.labels):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        train = self.train
        counts = torch.bincount(train.labels, minlength=train.num_classes).tolist()
        return {"name": train.name, "num_classes": train.num_classes, "class_names": train.class_names,
                "channels": train.channels, "image_size": list(train.im_size), "mean": list(train.mean),
                "std": list(train.std), "train_images": len(train), "test_images": len(self.test),
                "train_class_counts": counts, "fingerprint": digest.hexdigest()[:20], "origin": self.origin}


def _channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    """Per-channel mean and std of ``images`` [N, C, H, W] (std floored so constant channels work).

    Images holding NaN or Inf are left out, so normalising keeps a non-finite pixel in its own image
    instead of spreading it over every image (callers name the bad images by index)."""
    if images.is_floating_point():
        finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
        images = images if bool(finite.all()) else images[finite]
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-8) if x.shape[1] > 0 else torch.ones_like(mean)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images.float() - m) / s).contiguous()


def make_splits(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, class_names: Optional[List[str]], scale: float = 255.0) -> DatasetSplits:
    """Raw pixel arrays [N, C, H, W] in [0, scale] -> DatasetSplits normalised with train statistics."""
    tx = torch.from_numpy(np.require(train_x, requirements=["C", "W"])).float() / scale
    vx = torch.from_numpy(np.require(test_x, requirements=["C", "W"])).float() / scale
    mean, std = _channel_stats(tx)
    sets = [ImageSet(_normalise(x, mean, std), torch.as_tensor(np.asarray(y).reshape(-1).astype(np.int64)),
                     num_classes, name, mean, std, class_names) for x, y in ((tx, train_y), (vx, test_y))]
    return DatasetSplits(train=sets[0], test=sets[1])


def from_tensors(images: torch.Tensor, labels: torch.Tensor, name: str, num_classes: Optional[int] = None,
                 *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 normalize: bool = True, class_names: Optional[List[str]] = None) -> ImageSet:
    """Wrap tensors as an :class:`ImageSet`.

    images: [N, C, H, W] (or [N, H, W], read as one channel); labels: integer [N].
    ``normalize=True``: images are raw; they are normalised with ``mean``/``std`` (computed per channel
    from ``images`` when not given). ``normalize=False``: images are already normalised; ``mean``/``std``
    (default 0 and 1) are only stored for de-normalisation.
    """
    images = torch.as_tensor(images)
    images = images.unsqueeze(1) if images.dim() == 3 else images
    if images.dim() != 4:
        raise ValueError(f"from_tensors: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    labels = as_labels(labels, "from_tensors")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"from_tensors: labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    inferred = int(labels.max()) + 1 if labels.numel() else 0
    num_classes = inferred if num_classes is None else int(num_classes)
    if num_classes < inferred:
        raise ValueError(f"from_tensors: num_classes={num_classes} but labels go up to {inferred - 1}")
    c = images.shape[1]
    if normalize:
        if mean is None or std is None:
            mean, std = _channel_stats(images)
        images = _normalise(images, mean, std)
    else:
        mean = (0.0,) * c if mean is None else mean
        std = (1.0,) * c if std is None else std
        images = images.float().contiguous()
    return ImageSet(images, labels, num_classes, name, tuple(float(v) for v in mean),
                    tuple(float(v) for v in std), class_names)


def from_torch_dataset(ds, name: str, num_classes: Optional[int] = None, **kwargs) -> ImageSet:
    """Materialise a torch Dataset yielding ``(image [C, H, W], int label)`` into an :class:`ImageSet`.

    Keyword arguments (``mean``, ``std``, ``normalize``, ``class_names``) go to :func:`from_tensors`.
    """
    if len(ds) == 0:
        raise ValueError(f"from_torch_dataset: dataset {name!r} is empty")
    pairs = [ds[i] for i in range(len(ds))]
    xs, ys = [torch.as_tensor(p[0]) for p in pairs], [int(p[1]) for p in pairs]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"from_torch_dataset: images of {name!r} have different shapes {sorted(shapes)[:3]}")
    return from_tensors(torch.stack(xs), torch.tensor(ys, dtype=torch.long), name, num_classes, **kwargs)
