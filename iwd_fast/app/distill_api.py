"""Distil data one already has, from Python: a torch Dataset, tensors, an image folder or a tensors file.

    from iwd_fast.app import distill_data

    result = distill_data(train_dataset, test_dataset, method="dc", weighting="auto")
    result.images, result.labels            # the synthetic set [C * ipc, C, H, W] (normalised) and its labels
    result.pixels(), result.class_names     # the same images in [0, 1]; label c is class_names[c]

The data goes through the checks, normalisation and preset scaling of ``iwd-fast distill --dataset PATH``
(iwd_fast.data.user_data, iwd_fast.app.scaling), so the same pixels give the same synthetic set either way.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.user_data import UserData, UserDataSpec, open_user_data, user_data_from_tensors
from ..distill.config import DistillConfig, validate
from .distill_job import run_distillation
from .scaling import scaled_config

__all__ = ["distill_data", "DistilledSet"]

Data = Union[str, Path, Tuple[torch.Tensor, torch.Tensor], torch.utils.data.Dataset]


@dataclass
class DistilledSet:
    """A distilled set. ``images`` float32 [C * ipc, C, H, W] in the normalised space the networks train in
    (``mean``/``std`` per channel, computed on the training part), class-major; ``labels`` int64 [C * ipc];
    ``accuracy`` / ``init_accuracy``: the evaluation of the synthetic and of the initial real images (None
    without evaluation); ``summary``: everything the run reports; ``config``: the run's config."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    accuracy: Optional[float]
    init_accuracy: Optional[float]
    weights: Optional[torch.Tensor]
    summary: Dict[str, Any]
    config: DistillConfig

    def pixels(self) -> torch.Tensor:
        """The synthetic images as pixels in [0, 1], float32 [C * ipc, C, H, W]."""
        m = torch.tensor(self.mean, dtype=self.images.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=self.images.dtype).view(1, -1, 1, 1)
        return (self.images * s + m).clamp(0.0, 1.0)


def _as_tensors(data, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a pair or of a map-style Dataset yielding (image, label) (image a tensor, an array
    or a PIL image; [C, H, W], [H, W] or channels-last)."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{where}: give a path, an (images, labels) pair or a map-style Dataset of (image, label), "
                         f"got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{where}: the dataset is empty")
    images, labels = [], []
    for i in range(len(data)):
        x, y = data[i][:2]
        images.append(torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x)
        labels.append(int(y))
    shapes = sorted({tuple(x.shape) for x in images})
    if len(shapes) != 1:
        raise ValueError(f"{where}: images of different shapes {shapes[:3]}; resize them first (or pass image_size)")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _open(train: Data, test: Optional[Data], spec: UserDataSpec, class_names,
          name: str) -> Tuple[UserData, str, UserDataSpec]:
    """The opened data, the config's dataset field (the path for files, else ``name``) and its data spec."""
    if isinstance(train, (str, Path)):
        if test is not None and not isinstance(test, (str, Path)):
            raise ValueError("test: with a train path, give the test set as a path too (folder or tensors file)")
        spec = dataclasses.replace(spec, test=str(Path(test).resolve()) if test is not None else None)
        return open_user_data(str(train), spec), str(Path(train).resolve()), spec
    if isinstance(test, (str, Path)):
        raise ValueError("test: with training data in memory, give the test set in memory too")
    pair = None if test is None else _as_tensors(test, "test")
    images, labels = _as_tensors(train, "train")
    return user_data_from_tensors(images, labels, pair, class_names, name, spec), name, spec


def _merge(target: Dict[str, Any], changes: Dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def distill_data(train: Data, test: Optional[Data] = None, *, method: str = "dc", ipc: Optional[int] = None,
                 weighting: str = "auto", preset: str = "cpu", model: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, name: str = "data",
                 image_size: Optional[Sequence[int]] = None, test_fraction: float = 0.2, split_seed: int = 0,
                 seed: int = 0, out: Optional[str] = None, device: str = "auto", evaluate: bool = True,
                 progress: bool = True, **config: Any) -> DistilledSet:
    """Distil ``train`` into ``ipc`` synthetic images per class with ``method``.

    Args:
        train: a map-style Dataset of (image, label), an (images, labels) pair (uint8 pixels are divided by 255,
            floats taken as pixels), an image folder in class subfolders or a tensors file.
        test: the same kinds (a path with a path); None: a tensors file's test arrays, else a stratified split of
            ``test_fraction`` of every class drawn with ``split_seed``.
        weighting: "auto" (influence weighting whose strength follows the estimated label noise), "iwd",
            "static" or "none" (the base method).
        preset: the budget ("cpu", "paper", "demo", "smoke"), scaled to the data (iwd_fast.app.scaling); ``ipc``
            None chooses it. model: a built-in network name or "package.module:factory".
        out: a run folder (resumable; config, data.json, synthetic.safetensors, plots); None: nothing written.
        config: further DistillConfig fields (nested ones as dicts), e.g. ``iterations=50``,
            ``iwd={"init": "weighted"}``.
    Bad input is refused with a one-line ValueError naming it before any long work.
    """
    spec = UserDataSpec(list(image_size) if image_size is not None else None, None, test_fraction, split_seed)
    data, dataset, spec = _open(train, test, spec, class_names, name)
    cfg, notes = scaled_config(preset, method, dataset, data, ipc, fixed=set(config) | ({"net"} if model else set()))
    cfg = cfg.replace(weighting=weighting, seed=int(seed), device=device, data=spec)
    if model is not None:
        cfg = cfg.replace(net=dataclasses.replace(cfg.net, name=model))
    d = cfg.to_dict()
    _merge(d, config)
    cfg = DistillConfig.from_dict(d)
    validate(cfg)
    if progress:
        print(f"{data.name}: preset {preset!r} scaled to the data:\n  " + "\n  ".join(notes))
    splits = data.load(progress=progress)
    summary = run_distillation(cfg, splits, out_dir=out, progress=progress, evaluate=evaluate)
    syn, acc, init = summary["synthetic"], summary.get("accuracy"), summary.get("init_accuracy")
    return DistilledSet(images=syn["images"], labels=syn["labels"], class_names=list(data.class_names),
                        mean=splits.train.mean, std=splits.train.std, accuracy=acc["mean"] if acc else None,
                        init_accuracy=init["mean"] if init else None, weights=summary.get("weights"),
                        summary=summary, config=cfg)
