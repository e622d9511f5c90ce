"""Datasets of one's own: an image folder in class subfolders, a tensors file, or tensors in memory, made
into normalised train and test sets the way the built-in datasets are (pixels in [0, 1], per-channel
statistics of the training part, the test set normalised with them).

Files are read through the loaders ``iwd-fast score`` uses (:class:`~iwd_fast.data.image_folder.ImageFolder`,
:func:`~iwd_fast.data.tensor_file.load_tensor_file`). :func:`open_user_data` reads labels, class names and
image sizes (only the headers of a folder's images) and checks them, so bad input is refused in one line
naming the culprit before a pixel is decoded; :meth:`UserData.load` then decodes, splits and normalises.

The test set is ``UserDataSpec.test`` (a folder or tensors file), else a tensors file's own
``test_images``/``test_labels``, else a stratified split holding out ``test_fraction`` of every class,
drawn with ``split_seed`` (recorded; independent of the run seed, so paired runs share it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..scoring.checks import as_labels, check_finite
from .datasets import DatasetSplits, from_tensors
from .image_folder import ImageFolder
from .loaders import DATASET_NAMES, builtin_name
from .splits import stratified_split
from .tensor_file import TENSOR_FILE_SUFFIXES, image_batch, load_tensor_file

__all__ = ["UserDataSpec", "UserData", "open_user_data", "user_data_from_tensors", "is_user_dataset",
           "dataset_label", "check_class_sizes", "describe_sources"]


@dataclass
class UserDataSpec:
    """How a dataset of one's own (``DistillConfig.dataset`` a folder or tensors file) becomes train and test
    sets. ``image_size``: [H, W] every image is resized to (bilinear); None: all images must share one size.
    ``test``: a test folder or tensors file; None: the tensors file's test arrays, else a stratified split of
    ``test_fraction`` of every class drawn with ``split_seed``."""

    image_size: Optional[List[int]] = None
    test: Optional[str] = None
    test_fraction: float = 0.2
    split_seed: int = 0

    def check(self) -> None:
        """Refuse impossible options in one line."""
        size = self.image_size
        if size is not None and (len(size) != 2 or any(int(v) != v or int(v) < 1 for v in size)):
            raise ValueError(f"image size must be two positive integers H W, got {list(size)}")
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ValueError(f"test fraction must lie in (0, 1), got {self.test_fraction}")


def describe_sources() -> str:
    return (f"a built-in name ({', '.join(DATASET_NAMES)}), a folder of images in class subfolders, or a tensors "
            f"file ({', '.join(TENSOR_FILE_SUFFIXES)}) with images and labels")


def is_user_dataset(name: str) -> bool:
    """Whether ``name`` names a dataset of one's own (a path), not a built-in dataset."""
    return builtin_name(name) is None


def dataset_label(name: str) -> str:
    """A short name for folders and tables: the built-in name, else the folder's or file's name."""
    return builtin_name(name) or Path(str(name)).name


def _class_ref(c: int, names: Optional[Sequence[str]]) -> str:
    return f"{names[c]!r} (label {c})" if names is not None and c < len(names) else f"label {c}"


def check_class_sizes(labels: torch.Tensor, num_classes: int, minimum: int, where: str,
                      class_names: Optional[Sequence[str]] = None, why: str = "") -> None:
    """Refuse, in one line naming them, the classes with fewer than ``minimum`` instances in ``labels`` [n]."""
    counts = torch.bincount(as_labels(labels, where, num_classes), minlength=num_classes).tolist()
    small = [c for c in range(num_classes) if counts[c] < minimum]
    if small:
        shown = ", ".join(f"{_class_ref(c, class_names)} has {counts[c]}" for c in small[:5])
        more = f" and {len(small) - 5} more classes" if len(small) > 5 else ""
        raise ValueError(f"{where}: {shown}{more} image{'s' if counts[small[0]] != 1 else ''}; every class needs "
                         f"at least {minimum}{why}")


@dataclass
class _Part:
    """One side of a source before decoding: labels int64 [N], class names (None: unnamed), channels,
    (H, W), a description for messages, and ``read(progress)`` -> raw pixels float32 [N, C, H, W]."""

    labels: torch.Tensor
    class_names: Optional[List[str]]
    channels: int
    im_size: Tuple[int, int]
    where: str
    read: Callable[[bool], torch.Tensor]


def _folder_part(path: Path, size, channels: Optional[int] = None) -> _Part:
    folder = ImageFolder(path, size=tuple(size) if size is not None else None, channels=channels)

    def read(progress: bool) -> torch.Tensor:
        from tqdm.auto import tqdm

        return torch.stack([folder.pixels(i) for i in tqdm(range(len(folder)), desc=f"reading {path.name}",
                                                           disable=not progress, unit="img")])

    return _Part(torch.tensor(folder.targets, dtype=torch.long), list(folder.classes), folder.channels,
                 tuple(folder.size), f"image folder {path}", read)


def _resized(images: torch.Tensor, size) -> torch.Tensor:
    if size is None or tuple(images.shape[2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False,
                         antialias=True)


def _tensor_part(images: torch.Tensor, labels: torch.Tensor, names, size, where: str) -> _Part:
    images = _resized(images, size)
    return _Part(labels, names, int(images.shape[1]), tuple(images.shape[2:]), where, lambda progress: images)


def _file_parts(path: Path, size) -> Tuple[_Part, Optional[_Part]]:
    f = load_tensor_file(path)
    train = _tensor_part(f.images, f.labels, f.class_names, size, f"tensor file {path}")
    test = None if f.test is None else _tensor_part(*f.test, f.class_names, size, f"tensor file {path} (test arrays)")
    return train, test


def _open_path(source: str, size) -> Tuple[_Part, Optional[_Part], str]:
    path = Path(source)
    if path.is_dir():
        return _folder_part(path, size), None, "image folder"
    if path.suffix.lower() in TENSOR_FILE_SUFFIXES:
        return (*_file_parts(path, size), "tensors file")
    if not path.exists():
        raise FileNotFoundError(f"dataset {source!r} is neither {describe_sources()}: no such file or folder")
    raise ValueError(f"dataset {source!r} is neither {describe_sources()}: unknown suffix {path.suffix!r}")


@dataclass
class UserData:
    """A dataset of one's own, opened and checked: labels, class names, image shape and the test split known,
    pixels not decoded yet (:meth:`load`). ``origin``: the facts the run folder keeps (data.json)."""

    name: str
    train: _Part
    test: Optional[_Part]
    split: Optional[Tuple[torch.Tensor, torch.Tensor]]  # (training, test) indices into train when split here
    num_classes: int
    class_names: List[str]
    origin: Dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def im_size(self) -> Tuple[int, int]:
        return self.train.im_size

    def train_labels(self) -> torch.Tensor:
        """Labels int64 [n] of the training part (after the test split, if any)."""
        return self.train.labels if self.split is None else self.train.labels[self.split[0]]

    def test_size(self) -> int:
        return int(self.split[1].numel()) if self.split is not None else int(self.test.labels.numel())

    def load(self, progress: bool = False) -> DatasetSplits:
        """Decode the pixels, split, and normalise both sets with the training part's per-channel statistics."""
        raw, labels = self.train.read(progress), self.train.labels
        if self.split is not None:
            keep, held = self.split
            raw_test, test_labels, raw, labels = raw[held], labels[held], raw[keep], labels[keep]
        else:
            raw_test, test_labels = self.test.read(progress), self.test.labels
        check_finite(raw, self.train.where, "pixels")
        check_finite(raw_test, self.test.where if self.test is not None else self.train.where, "test pixels")
        train = from_tensors(raw, labels, self.name, self.num_classes, class_names=self.class_names)
        test = from_tensors(raw_test, test_labels, self.name, self.num_classes, mean=train.mean, std=train.std,
                            class_names=self.class_names)
        return DatasetSplits(train=train, test=test, origin=dict(self.origin))


def open_user_data(source: str, spec: Optional[UserDataSpec] = None, name: Optional[str] = None) -> UserData:
    """Open a folder or tensors file (``source``) with ``spec`` and check it (labels 0..C-1, every class with at
    least 2 images, one image size, the test set's classes equal to the training set's); nothing is decoded."""
    spec = spec or UserDataSpec()
    spec.check()
    train, file_test, kind = _open_path(str(source), spec.image_size)
    origin = {"source": str(Path(source).resolve()), "kind": kind}
    return _assemble(name or dataset_label(source), train, file_test, spec, origin)


def user_data_from_tensors(images: torch.Tensor, labels: torch.Tensor,
                           test: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                           class_names: Optional[Sequence[str]] = None, name: str = "data",
                           spec: Optional[UserDataSpec] = None) -> UserData:
    """The same from tensors in memory: images uint8 (divided by 255) or float pixels [N, C, H, W] ([N, H, W]
    or channels-last accepted), labels int [N], ``test`` an optional (images, labels) pair."""
    spec = spec or UserDataSpec()
    spec.check()
    names = None if class_names is None else [str(n) for n in class_names]
    train = _tensor_part(image_batch(images, "images"), as_labels(labels, "labels"), names, spec.image_size,
                         f"dataset {name!r}")
    given = None
    if test is not None:
        given = _tensor_part(image_batch(test[0], "test images"), as_labels(test[1], "test labels"), names,
                             spec.image_size, f"test set of {name!r}")
    return _assemble(name, train, given, spec, {"source": "tensors in memory", "kind": "tensors"})


def _assemble(name: str, train: _Part, file_test: Optional[_Part], spec: UserDataSpec,
              origin: Dict[str, Any]) -> UserData:
    num_classes = len(train.class_names) if train.class_names is not None else int(train.labels.max()) + 1
    names = train.class_names or [str(c) for c in range(num_classes)]
    _check_labels(train.labels, num_classes, train.where, names)
    check_class_sizes(train.labels, num_classes, 2, train.where, names,
                      " (one to distil from, one for a held-out or test split)")
    test, split = file_test, None
    if spec.test is not None:
        test = _open_test(spec.test, spec, train)
        origin["test"] = {"from": str(Path(spec.test).resolve())}
    elif test is not None:
        origin["test"] = {"from": "the tensors file's test_images / test_labels"}
    if test is not None:
        _check_test(test, train, num_classes, names)
    else:
        split = stratified_split(train.labels, spec.test_fraction, seed=spec.split_seed)
        origin["test"] = {"from": "stratified split of the training data", "fraction": float(spec.test_fraction),
                          "seed": int(spec.split_seed)}
    origin.update(image_size=list(train.im_size), resized=spec.image_size is not None)
    return UserData(name, train, test, split, num_classes, names, origin)


def _check_labels(labels: torch.Tensor, num_classes: int, where: str, names: Sequence[str]) -> None:
    """Labels must be 0..C-1 with every class present (C: the class names' count, else the largest label + 1)."""
    labels = as_labels(labels, where)
    if labels.numel() == 0:
        raise ValueError(f"{where}: no images")
    if int(labels.max()) >= num_classes:
        bad = sorted({int(v) for v in labels[labels >= num_classes].tolist()})
        raise ValueError(f"{where}: labels {bad[:10]} lie outside 0..{num_classes - 1} ({num_classes} class names)")
    counts = torch.bincount(labels, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        found = sorted({int(v) for v in labels.unique().tolist()})
        raise ValueError(f"{where}: labels must be 0..{num_classes - 1} with every class present; no images of "
                         f"{', '.join(_class_ref(c, names) for c in missing[:10])} (labels found: {found[:12]})")


def _open_test(source: str, spec: UserDataSpec, train: _Part) -> _Part:
    path = Path(source)
    if path.is_dir():
        return _folder_part(path, spec.image_size, channels=train.channels)
    if path.suffix.lower() in TENSOR_FILE_SUFFIXES:
        f = load_tensor_file(path)  # its images and labels are the test set
        return _tensor_part(f.images, f.labels, f.class_names, spec.image_size, f"test tensor file {path}")
    if not path.exists():
        raise FileNotFoundError(f"test set {source!r}: no such folder or tensors file")
    raise ValueError(f"test set {source!r} is neither a folder nor a tensors file ({', '.join(TENSOR_FILE_SUFFIXES)})")


def _check_test(test: _Part, train: _Part, num_classes: int, names: Sequence[str]) -> None:
    where = f"test set ({test.where})"
    if test.class_names is not None and train.class_names is not None and test.class_names != train.class_names:
        only_test = [n for n in test.class_names if n not in train.class_names]
        only_train = [n for n in train.class_names if n not in test.class_names]
        detail = (f"only in the test set {only_test[:5]}, only in the training set {only_train[:5]}"
                  if only_test or only_train else "the same names in another order")
        raise ValueError(f"{where}: its classes differ from the training set's: {detail}")
    labels = as_labels(test.labels, where)
    extra = sorted({int(v) for v in labels[labels >= num_classes].tolist()})
    missing = sorted(set(range(num_classes)) - {int(v) for v in labels.unique().tolist()})
    if extra or missing:
        detail = f"labels {extra[:10]} are not training classes (0..{num_classes - 1})" if extra else \
            f"no test images of {', '.join(_class_ref(c, names) for c in missing[:10])}"
        raise ValueError(f"{where}: its classes differ from the training set's: {detail}")
    if test.channels != train.channels:
        raise ValueError(f"{where}: images have {test.channels} channels, the training images {train.channels}")
    if tuple(test.im_size) != tuple(train.im_size):
        raise ValueError(f"{where}: images are {test.im_size[0]}x{test.im_size[1]}, the training images "
                         f"{train.im_size[0]}x{train.im_size[1]}; pass --image-size H W to resize both")
