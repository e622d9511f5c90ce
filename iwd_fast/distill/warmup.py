"""The warm-up: how a run scores its real pool before distilling, and the pool-cleaning baselines.

Three warm-up scores (``config.warmup_target``):

- "self" / "validation": one network trained ``iwd.warmup_steps`` SGD steps on the whole pool scores
  every instance (METHOD.md 2e, 2c); the scores become softmax weights with the run's transform.
- "crossfit" (weighting "auto", METHOD.md 4b): ``iwd.crossfit_folds`` networks, each trained on the other
  folds, predict every instance out of sample; confident learning estimates each class's noise rate and
  its suspects (``iwd_fast.weighting.trust``). The weights are 0 on the suspects and 1 elsewhere
  (normalised per class), held by the weighter as its prior.

The baselines of ``iwd.pool_cleaning`` (what users try instead of weighting) change the pool itself:
"prune" drops the lowest-weighted ``prune_fraction`` of each class, "relabel" gives every suspect of the
cross-fitted estimate the class its out-of-sample prediction ranks first among the other classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..evaluate import EvalSpec, train_network
from ..runtime import PhaseTimer, Stream, mix_seed
from ..weighting import InfluenceWeighter, NoiseEstimate, auroc, sign_for, trusted_weights
from ..weighting.targets import instance_scores, validation_directions
from .base import RealPool, build_net
from .config import warmup_target

__all__ = ["Warmup", "warmup_weights", "crossfit_estimate", "clean_pool"]


@dataclass
class Warmup:
    """The warm-up's view of the pool: raw scores [n] (signed so that ``sign_for(target)`` makes larger =
    trusted), the weighter holding the weights, and, for "crossfit", the noise estimate."""

    target: str
    scores: torch.Tensor
    weighter: InfluenceWeighter
    auroc_flipped: Optional[float]
    noise: Optional[NoiseEstimate] = None


def crossfit_estimate(cfg, pool: RealPool, device) -> Tuple[torch.Tensor, NoiseEstimate]:
    """The trust weights float32 [n] and the noise estimate of the pool: ``trusted_weights`` with the run's
    ``iwd.crossfit_*``, networks of the run's architecture seeded from the run seed."""
    spec = cfg.iwd
    base_seed = mix_seed(cfg.seed, Stream.WARMUP_NETWORK)
    return trusted_weights(lambda s: build_net(cfg.net, pool, mix_seed(base_seed, s), device), pool.images,
                           pool.labels, pool.num_classes, seed=mix_seed(cfg.seed, Stream.WARMUP_TRAINING),
                           folds=spec.crossfit_folds, steps=spec.crossfit_steps, lr=spec.crossfit_lr)


def _single_network_scores(cfg, pool: RealPool, device, target: str) -> torch.Tensor:
    net = build_net(cfg.net, pool, mix_seed(cfg.seed, Stream.WARMUP_NETWORK), device)
    spec = EvalSpec(num_nets=1, epochs=1, lr=cfg.lr_net, batch_size=256, dsa=False)
    train_network(net, pool.images, pool.labels, spec, mix_seed(cfg.seed, Stream.WARMUP_TRAINING), None, device,
                  steps=cfg.iwd.warmup_steps)
    net.eval()
    direction = None
    if target == "validation":
        direction = validation_directions(net, pool.heldout_images, pool.heldout_labels, scale=cfg.lr_net)
    return instance_scores(net, pool.images, pool.labels, target, direction).detach().double().cpu()


def warmup_weights(cfg, pool: RealPool, device, timer: PhaseTimer) -> Warmup:
    """Score every pool instance with the run's warm-up (module docstring) and turn the scores into weights."""
    target = warmup_target(cfg)
    labels = pool.labels.cpu()
    noise = None
    with timer.phase("warm-up scoring"):
        if target == "crossfit":
            trusted, noise = crossfit_estimate(cfg, pool, device)
            raw = noise.margin
        else:
            raw = _single_network_scores(cfg, pool, device, target)
    if noise is not None:
        weighter = InfluenceWeighter(labels, pool.num_classes, ema=0.0, sign=sign_for(target),
                                     prior=trusted)
    else:
        weighter = InfluenceWeighter(labels, pool.num_classes, temperature=cfg.iwd.temperature, ema=0.0,
                                     floor=cfg.iwd.floor, sign=sign_for(target), transform=cfg.iwd.transform,
                                     standardize=False)
        weighter.update(torch.arange(raw.shape[0]), raw)
    flipped = pool.flipped.cpu()
    score_auc = None
    if bool(flipped.any()) and not bool(flipped.all()):
        score_auc = auroc(-sign_for(target) * raw, flipped)  # low signed score = suspected harmful
    return Warmup(target, raw, weighter, score_auc, noise)


def clean_pool(cfg, pool: RealPool, warmup: Warmup) -> RealPool:
    """The pool after ``iwd.pool_cleaning`` ("none": unchanged). ``flipped`` is recomputed against the clean
    labels, so a relabelled instance counts as flipped exactly when its new label is wrong."""
    how = cfg.iwd.pool_cleaning
    if how == "none":
        return pool
    labels = pool.labels.cpu()
    if how == "prune":
        keep = torch.ones(labels.shape[0], dtype=torch.bool)
        signed = sign_for(warmup.target) * warmup.scores  # larger = more trusted
        for c in range(pool.num_classes):
            members = torch.nonzero(labels == c).flatten()
            drop = int(round(cfg.iwd.prune_fraction * members.numel()))
            drop = min(drop, max(members.numel() - cfg.ipc, 0))  # never fewer than ipc left
            order = torch.sort(signed[members], stable=True).indices
            keep[members[order[:drop]]] = False
        idx = torch.nonzero(keep).flatten()
        dev = pool.images.device
        return dataclasses.replace(pool, images=pool.images[idx.to(dev)], labels=pool.labels[idx.to(dev)],
                                   flipped=pool.flipped[idx], source_indices=pool.source_indices[idx],
                                   clean_labels=None if pool.clean_labels is None else pool.clean_labels[idx])
    if warmup.noise is None:
        raise ValueError("iwd.pool_cleaning='relabel' needs the cross-fitted warm-up")
    new = labels.clone()
    suspect = warmup.noise.suspect
    new[suspect] = warmup.noise.runner_up[suspect]
    flipped = pool.flipped.clone() if pool.clean_labels is None else (new != pool.clean_labels.cpu())
    return dataclasses.replace(pool, labels=new.to(pool.labels.device), flipped=flipped)
