"""Presets scaled to a dataset of one's own, the way the field's protocol scales them, and said before the run.

The presets (``presets.py``) were written for the built-in datasets. For a folder or tensors file of one's
own, :func:`scaled_config` starts from the preset and changes only what the field ties to the data:

- IPC (when not given): 10, the field's headline setting, while the synthetic set stays at most a tenth
  of the smallest class; 1 below that (the field's other small setting). The gradient-matching loops
  follow the IPC through the preset's own table (``presets.loops_for_ipc``).
- ConvNet depth from the image side: the field uses 3 blocks at 28-32 px (MNIST, CIFAR), 4 at 64 px (Tiny
  ImageNet), 5 at 128 px (ImageNet subsets); one block per doubling, at least 2 (the cpu preset's depth on
  8x8 digits) and never so deep that a feature map falls below 2x2.
- The CPU budgets' data sizes: a preset measured on a Fashion-MNIST subset (the cpu preset: 10,000
  training and 2,000 test images) takes stratified subsets of those sizes from larger data; the field's
  protocol (``paper``) uses all of it.
- The evaluation budget is the field's: epochs per evaluation network, so its SGD steps grow with the
  synthetic set (ceil(C * IPC / batch) per epoch); its cost is printed.

Options given explicitly (``fixed``) are never changed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Collection, List, Optional, Tuple

import torch

from ..data.splits import stratified_split
from ..data.user_data import UserData, check_class_sizes
from ..distill.config import DistillConfig
from ..distill.preflight import images_needed
from .distill_job import SUBSET_SEED
from .presets import PRESETS, preset_config

__all__ = ["scaled_config", "field_depth", "auto_ipc", "REFERENCE_DATASET", "CONVNETS"]

REFERENCE_DATASET = "fashion-mnist"  # the data every CPU budget was measured on (10 classes of 1 x 28 x 28)
_REFERENCE_COST = 10 * 1 * 28 * 28
CONVNETS = ("convnet", "convnet_bn")


def field_depth(side: int) -> int:
    """ConvNet depth for images whose shorter side is ``side`` pixels: 3 + round(log2(side / 32)), at least 2,
    at most floor(log2(side)) - 1 (feature maps of at least 2x2), and at least 1."""
    if side < 2:
        raise ValueError(f"images of side {side} are too small for a ConvNet with 2x2 pooling")
    depth = max(2, 3 + round(math.log2(side / 32)))
    return max(1, min(depth, int(math.floor(math.log2(side))) - 1))


def auto_ipc(smallest_class: int) -> int:
    """10 while it is at most a tenth of the smallest class, else 1."""
    return 10 if smallest_class >= 100 else 1


def _subset_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """The labels of the stratified training subset ``distill_job.subset_splits`` takes (0: all)."""
    if size and size < labels.numel():
        labels = labels[stratified_split(labels, min(1.0, size / labels.numel()), seed=SUBSET_SEED)[1]]
    return labels


def scaled_config(preset: str, method: str, dataset: str, data: UserData, ipc: Optional[int] = None,
                  fixed: Collection[str] = (), base: Optional[str] = None) -> Tuple[DistillConfig, List[str]]:
    """The config of ``preset`` for ``method`` on the opened ``data`` (``dataset`` its path, as stored in the
    config), scaled as the module docstring says, and the lines that say what was chosen and why.

    ``ipc``: None chooses it (:func:`auto_ipc`). ``fixed``: config fields the caller sets itself afterwards
    ("train_size", "test_size", "net"), left as the preset has them. ``base``: PDD's base method (as in
    ``preset_config``).
    """
    labels = data.train_labels()
    start = preset_config(preset, method, dataset, ipc or 10, base=base)
    reference = PRESETS[preset].get("datasets", {}).get(REFERENCE_DATASET, {})
    changes, notes = {}, []
    n_train, n_test = int(labels.numel()), data.test_size()
    for key, n, what in (("train_size", n_train, "training"), ("test_size", n_test, "test")):
        cap = reference.get(key, 0)
        if key not in fixed and not getattr(start, key) and cap and n > cap:
            changes[key] = cap
            notes.append(f"{key} {cap}: a stratified subset of the {n} {what} images (the size preset {preset!r} was "
                         f"measured at on {REFERENCE_DATASET})")
    used = _subset_labels(labels, changes.get("train_size", start.train_size))
    counts = torch.bincount(used, minlength=data.num_classes)
    smallest = int(counts.min())
    small_name = data.class_names[int(counts.argmin())]
    if ipc is None:
        ipc = auto_ipc(smallest)
        notes.append(f"ipc {ipc}: the field's {'10' if ipc == 10 else '1 (10 would exceed a tenth of the smallest class)'}"
                     f"; smallest class {small_name!r} has {smallest} training images")
    cfg = preset_config(preset, method, dataset, ipc, base=base).replace(**changes)
    need = images_needed(cfg)
    check_class_sizes(used, data.num_classes, need, f"training set of {data.name!r}", data.class_names,
                      f" (ipc={ipc})" if need == ipc else f" (ipc={ipc} x {need // ipc} tiles of IDC's mix start)")
    if cfg.method in ("dc", "dsa"):
        notes.append(f"loops {cfg.outer_loop} outer x {cfg.inner_loop} inner at ipc {ipc} (preset {preset!r}'s table)")
    if cfg.net.name in CONVNETS and "net" not in fixed:
        depth = field_depth(min(data.im_size))
        if depth != cfg.net.depth:
            cfg = cfg.replace(net=dataclasses.replace(cfg.net, depth=depth))
            notes.append(f"ConvNet depth {depth} for {data.im_size[0]}x{data.im_size[1]} images (field: 3 at 28-32 px, "
                         f"4 at 64, 5 at 128)")
    notes += _cost_notes(cfg, data, n_test if not cfg.test_size else min(cfg.test_size, n_test))
    return cfg, notes


def _cost_notes(cfg: DistillConfig, data: UserData, n_test: int) -> List[str]:
    h, w = data.im_size
    ratio = data.num_classes * data.channels * h * w / _REFERENCE_COST
    syn = data.num_classes * cfg.ipc * (cfg.idc.factor ** 2 if cfg.method == "idc" else 1)
    steps = math.ceil(syn / max(1, min(cfg.eval.batch_size, syn)))
    notes = [f"data: {data.num_classes} classes of {data.channels}x{h}x{w}: an iteration costs about {ratio:.1f}x one "
             f"on {REFERENCE_DATASET} (classes x pixels)",
             f"evaluation: {cfg.eval.num_nets} networks x {cfg.eval.epochs} epochs of {steps} SGD step"
             f"{'s' if steps != 1 else ''} on {syn} synthetic images, tested on {n_test} images"]
    return notes
