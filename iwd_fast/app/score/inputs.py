"""What ``iwd-fast score`` reads: the dataset (a built-in name, an image folder, a tensors file) and the
model (a built-in network name or ``package.module:factory``, optionally a ``--checkpoint``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ...data import ImageSet, from_tensors, from_torch_dataset, load_dataset
from ...data.loaders import builtin_name
from ...data.user_data import describe_sources
from ...data.image_folder import ImageFolder, channel_stats
from ...data.tensor_file import TENSOR_FILE_SUFFIXES, read_tensor_file
from ...evaluate import build_eval_network
from ...networks import NETWORK_NAMES, NetSpec, is_factory
from ...scoring.checks import check_finite
from ...scoring.dataset.source import nonfinite_rows

__all__ = ["ScoreData", "load_score_data", "build_model", "load_checkpoint", "describe_dataset_spec"]


@dataclass
class ScoreData:
    """The set to score. ``train``: an ImageSet (in memory) or a lazy dataset (an image folder);
    ``labels`` int64 [N] either way; ``test``: an ImageSet or None; ``raw_nonfinite``: bool [N], the
    in-memory images whose pixels held NaN or Inf as read (before any normalisation), None for a folder."""

    name: str
    train: object
    labels: torch.Tensor
    num_classes: int
    channels: int
    im_size: Tuple[int, int]
    test: Optional[ImageSet]
    raw_nonfinite: Optional[torch.Tensor] = None

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ImageSet)

    def materialised(self) -> "ScoreData":
        """The same data held in memory (needed to train a network here)."""
        if self.in_memory:
            return self
        ds = self.train
        images = from_torch_dataset(ds, self.name, self.num_classes, normalize=False, mean=ds.mean, std=ds.std)
        return ScoreData(self.name, images, self.labels, self.num_classes, self.channels, self.im_size, self.test,
                         nonfinite_rows(images.images))


def describe_dataset_spec() -> str:
    return describe_sources()


def load_score_data(spec: str, data_root=None, download: bool = False, normalize: str = "auto",
                    image_size: Optional[Tuple[int, int]] = None) -> ScoreData:
    """Resolve ``--dataset``: a built-in name (standard files), a folder, or a tensors file."""
    if normalize not in ("auto", "none"):
        raise ValueError(f"--normalize must be auto or none, got {normalize!r}")
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path, normalize, image_size)
    if path.suffix.lower() in TENSOR_FILE_SUFFIXES:
        return _tensor_file(path, normalize)
    if builtin_name(spec) is not None:
        splits = load_dataset(spec, root=data_root, download=download)
        t = splits.train
        return ScoreData(t.name, t, t.labels, t.num_classes, t.channels, t.im_size, splits.test,
                         nonfinite_rows(t.images))
    raise ValueError(f"--dataset {spec!r} is not a built-in name, a folder or a tensors file; give "
                     f"{describe_dataset_spec()}")


def _image_folder(path: Path, normalize: str, image_size) -> ScoreData:
    ds = ImageFolder(path, size=image_size)
    if normalize == "auto":
        mean, std = channel_stats(ds)
        ds = ImageFolder(path, size=ds.size, channels=ds.channels, mean=mean, std=std)
    labels = torch.tensor(ds.targets, dtype=torch.long)
    return ScoreData(path.name, ds, labels, len(ds.classes), ds.channels, ds.size, None)


def _tensor_file(path: Path, normalize: str) -> ScoreData:
    images, labels, test = read_tensor_file(path)
    if labels.numel() == 0:
        raise ValueError(f"tensor file {path} holds no images (0 labels)")
    raw_nonfinite = nonfinite_rows(images)  # before the normalisation, which would spread a NaN over every image
    if test is not None:
        check_finite(test[0], f"tensor file {path}", "test_images")
    num_classes = int(labels.max()) + 1
    if test is not None:
        num_classes = max(num_classes, int(test[1].max()) + 1 if test[1].numel() else 0)
    train = from_tensors(images, labels, path.stem, num_classes, normalize=normalize == "auto")
    test_set = None
    if test is not None:
        test_set = from_tensors(test[0], test[1], path.stem + "-test", num_classes, normalize=normalize == "auto",
                                mean=train.mean, std=train.std)
    return ScoreData(path.stem, train, train.labels, num_classes, train.channels, train.im_size, test_set,
                     raw_nonfinite)


def build_model(spec: str, data: ScoreData, width: int, seed: int) -> nn.Module:
    """``--model``: a built-in network name, or ``package.module:factory`` called with whichever of
    ``channels``, ``num_classes``, ``im_size`` it accepts (``iwd_fast.networks.build_factory_network``); it
    must return an nn.Module. Built under ``seed`` either way."""
    if spec not in NETWORK_NAMES and not is_factory(spec):
        raise ValueError(f"--model {spec!r}: give a built-in network ({', '.join(NETWORK_NAMES)}) or "
                         "package.module:factory")
    try:
        return build_eval_network(NetSpec(name=spec, width=width), data.channels, data.num_classes, data.im_size, seed)
    except ValueError as err:
        raise ValueError(str(err).replace("network ", "--model ", 1) if is_factory(spec) else str(err)) from None


def load_checkpoint(model: nn.Module, path) -> None:
    """Load a state_dict (or {"state_dict" | "model" | "model_state_dict": state_dict}) into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or not weights-only
        raise ValueError(f"--checkpoint {path}: cannot read a state_dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path}: expected a state_dict, got {type(state).__name__}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: the first one, on one line
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise ValueError(f"--checkpoint {path} does not fit the model: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"--checkpoint {path} does not fit the model: missing {result.missing_keys[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
