"""The real pool of one run and where the synthetic set starts: label noise, the held-out split, the
warm-up scoring of the pool, and the initial real images.

Everything here derives from the run seed through named streams, so runs that differ only in their
weighting share noise, split, warm-up network and (for the same ``init``) initial images: they are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..data import DatasetSplits, add_label_noise, stratified_split
from ..evaluate import EvalSpec, train_network
from ..runtime import PhaseTimer, Stream, mix_seed
from ..scoring.checks import check_finite
from ..weighting import InfluenceWeighter, auroc, select_initial, sign_for
from ..weighting.targets import instance_scores, validation_directions
from .base import RealPool, build_net

__all__ = ["prepare_pool", "Warmup", "warmup_weights", "initial_indices"]


def prepare_pool(cfg, splits: DatasetSplits, device) -> RealPool:
    """Noisy labels (seeded, flips recorded) and the stratified held-out split of ``splits.train``.

    Non-finite pixels are refused here, naming the training indices, before any work.
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
                    heldout_labels=held_labels.to(device), source_indices=keep)


@dataclass
class Warmup:
    """The warm-up network's view of the pool: its raw scores [n] and the weighter holding them."""

    target: str
    scores: torch.Tensor
    weighter: InfluenceWeighter
    auroc_flipped: Optional[float]


def warmup_weights(cfg, pool: RealPool, device, timer: PhaseTimer) -> Warmup:
    """Score every pool instance at a network trained ``iwd.warmup_steps`` SGD steps on the pool.

    ``iwd.warmup_influence``: "self" (||g_i||^2: small = trusted; METHOD.md 2e) or "validation". The
    scores become weights with the run's transform and temperature (no EMA: one scoring).
    """
    target = cfg.iwd.warmup_influence
    with timer.phase("warm-up scoring"):
        net = build_net(cfg.net, pool, mix_seed(cfg.seed, Stream.WARMUP_NETWORK), device)
        spec = EvalSpec(num_nets=1, epochs=1, lr=cfg.lr_net, batch_size=256, dsa=False)
        train_network(net, pool.images, pool.labels, spec, mix_seed(cfg.seed, Stream.WARMUP_TRAINING), None, device,
                      steps=cfg.iwd.warmup_steps)
        net.eval()
        direction = None
        if target == "validation":
            direction = validation_directions(net, pool.heldout_images, pool.heldout_labels, scale=cfg.lr_net)
        raw = instance_scores(net, pool.images, pool.labels, target, direction).detach().double().cpu()
    weighter = InfluenceWeighter(pool.labels.cpu(), pool.num_classes, temperature=cfg.iwd.temperature, ema=0.0,
                                 floor=cfg.iwd.floor, sign=sign_for(target), transform=cfg.iwd.transform)
    weighter.update(torch.arange(raw.shape[0]), raw)
    flipped = pool.flipped.cpu()
    score_auc = None
    if bool(flipped.any()) and not bool(flipped.all()):
        score_auc = auroc(-sign_for(target) * raw, flipped)  # low signed score = suspected harmful
    return Warmup(target, raw, weighter, score_auc)


def initial_indices(cfg, pool: RealPool, warmup: Optional[Warmup]) -> Dict[str, object]:
    """Pool indices [C * ipc] of the real images that initialise the synthetic set, and how they were chosen.

    "random": uniform per class. "weighted": the highest warm-up weights of each class. "proportional":
    drawn in proportion to them. The choice is the same whatever the run's ``weighting``.
    """
    mode = cfg.iwd.init
    gen_seed = mix_seed(cfg.seed, Stream.INITIAL_IMAGES)
    if mode == "random":
        idx = select_initial(pool.labels.cpu(), None, pool.num_classes, cfg.ipc, "random", gen_seed)
        return {"indices": idx, "init": "random"}
    if warmup is None:
        raise ValueError(f"iwd.init={mode!r} needs the warm-up scores")
    idx = select_initial(pool.labels.cpu(), warmup.weighter.weights(), pool.num_classes, cfg.ipc,
                         "top" if mode == "weighted" else "proportional", gen_seed)
    return {"indices": idx, "init": f"{mode} ({warmup.target} scores after {cfg.iwd.warmup_steps} warm-up steps)"}
