"""The real pool of one run and where the synthetic set starts: label noise, the held-out split and the
initial real images (the warm-up that scores the pool is ``warmup.py``).

Everything here derives from the run seed through named streams, so runs that differ only in their
weighting share noise, split, warm-up network and (for the same ``init``) initial images: they are paired.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..data import DatasetSplits, add_label_noise, stratified_split
from ..runtime import Stream, mix_seed
from ..scoring.checks import check_finite
from ..weighting import select_initial
from .base import RealPool
from .config import init_mode
from .warmup import Warmup

__all__ = ["prepare_pool", "initial_indices", "SELECT_MODE"]

# iwd.init (resolved) -> select_initial's mode
SELECT_MODE = {"random": "random", "trusted": "trusted", "weighted": "top", "proportional": "proportional"}


def prepare_pool(cfg, splits: DatasetSplits, device) -> RealPool:
    """Noisy labels (seeded, flips recorded) and the stratified held-out split of ``splits.train``.

    Non-finite pixels are refused here, by index, before any work (too small classes: ``preflight.check_pool``).
    """
    train = splits.train
    check_finite(train.images, f"{train.name} training images")
    check_finite(splits.test.images, f"{splits.test.name} test images")
    labels, flipped = train.labels.clone(), torch.zeros(len(train), dtype=torch.bool)
    if cfg.noise > 0:
        labels, flipped = add_label_noise(train.labels, cfg.noise, cfg.noise_kind, train.num_classes,
                                          seed=mix_seed(cfg.seed, Stream.LABEL_NOISE))
    if cfg.iwd.heldout_fraction > 0:
        keep, held = stratified_split(labels, cfg.iwd.heldout_fraction, seed=mix_seed(cfg.seed, Stream.HELDOUT_SPLIT))
    else:
        keep, held = torch.arange(len(train)), torch.zeros(0, dtype=torch.long)
    held_labels = train.labels[held] if cfg.iwd.heldout_clean else labels[held]
    return RealPool(images=train.images[keep].to(device), labels=labels[keep].to(device), flipped=flipped[keep],
                    num_classes=train.num_classes, heldout_images=train.images[held].to(device),
                    heldout_labels=held_labels.to(device), source_indices=keep, clean_labels=train.labels[keep].clone())


def initial_indices(cfg, pool: RealPool, warmup: Optional[Warmup]) -> Dict[str, object]:
    """Pool indices [C * ipc] of the real images that initialise the synthetic set, and how they were chosen.

    By ``config.init_mode(cfg)``: "random": uniform per class. "trusted": uniform among the instances with
    positive warm-up weight. "weighted": the highest warm-up weights of each class. "proportional": drawn in
    proportion to them. The choice is the same whatever the run's ``weighting``.
    """
    mode = init_mode(cfg)
    gen_seed = mix_seed(cfg.seed, Stream.INITIAL_IMAGES)
    if mode == "random":
        idx = select_initial(pool.labels.cpu(), None, pool.num_classes, cfg.ipc, "random", gen_seed)
        return {"indices": idx, "init": "random"}
    if warmup is None:
        raise ValueError(f"iwd.init={mode!r} needs the warm-up scores")
    idx = select_initial(pool.labels.cpu(), warmup.weighter.weights(), pool.num_classes, cfg.ipc, SELECT_MODE[mode],
                         gen_seed)
    steps = f"{cfg.iwd.crossfit_folds}-fold cross-fit of {cfg.iwd.crossfit_steps} steps" if warmup.target == "crossfit" \
        else f"{cfg.iwd.warmup_steps} warm-up steps"
    return {"indices": idx, "init": f"{mode} ({warmup.target} scores after {steps})"}
