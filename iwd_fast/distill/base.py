"""Pieces every distiller shares: the real pool, the synthetic set, and the method base class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..data.augment import dsa_augment
from ..evaluate import build_eval_network
from ..networks import NetSpec
from ..runtime import MethodStreams, PhaseTimer, mix_seed
from ..weighting import IndexedClassSampler

__all__ = ["RealPool", "SyntheticSet", "FrozenImages", "Distiller", "build_net", "PLAIN_REAL_SIDE", "SCORED_REAL_SIDE"]

# Timer phases of the real side of a step: plain, and captured for scoring. Their difference per call is
# what scoring adds to the loop beyond its own "scoring" phase (directions, dots read out, updates).
PLAIN_REAL_SIDE = "real side"
SCORED_REAL_SIDE = "real side (scored)"


@dataclass
class RealPool:
    """The real training instances a distiller draws from (the held-out split removed).

    images [n, C, H, W] on the run's device; labels int64 [n] (possibly noisy); flipped bool [n]
    (True where noise changed the label); heldout_* the stratified held-out split (validation target);
    clean_labels int64 [n] the labels before noise (None where unknown): the truth ``flipped`` is kept
    against when a baseline relabels the pool.
    """

    images: torch.Tensor
    labels: torch.Tensor
    flipped: torch.Tensor
    num_classes: int
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    source_indices: torch.Tensor  # [n] index of each pool instance in the training set
    clean_labels: Optional[torch.Tensor] = None

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def im_size(self):
        return tuple(self.images.shape[2:])


class SyntheticSet(nn.Module):
    """Learnable synthetic images [num_classes * ipc, C, H, W], class-major, and their labels."""

    def __init__(self, images: torch.Tensor, num_classes: int, ipc: int):
        super().__init__()
        self.images = nn.Parameter(images.detach().clone())
        self.num_classes, self.ipc = num_classes, ipc
        self.register_buffer("labels", torch.arange(num_classes, device=images.device).repeat_interleave(ipc))

    def of_class(self, c: int) -> torch.Tensor:
        return self.images[c * self.ipc:(c + 1) * self.ipc]


@dataclass
class FrozenImages:
    """Synthetic images a distiller trains with but never updates (PDD: the earlier stages' images).

    images [num_classes * per_class, C, H, W], class-major like a SyntheticSet; labels int64 [num_classes *
    per_class]. The methods that accept them (MTT, IDC) put them beside their own images: the student of
    MTT unrolls on the union, IDC decodes and matches each class's union.
    """

    images: torch.Tensor
    labels: torch.Tensor
    per_class: int

    def of_class(self, c: int) -> torch.Tensor:
        return self.images[c * self.per_class:(c + 1) * self.per_class]


def build_net(spec: NetSpec, pool: RealPool, seed: int, device) -> nn.Module:
    return build_eval_network(spec, pool.channels, pool.num_classes, pool.im_size, seed).to(device)


class Distiller:
    """State every distiller shares: the image optimiser, the real-batch sampler and the DSA seed stream.

    Subclasses set ``STREAMS`` (their own random streams) and implement ``step(it)``. ``cfg`` is the run's
    :class:`~iwd_fast.distill.config.DistillConfig`; ``iwd`` an :class:`~iwd_fast.distill.iwd_state.IWDState`
    or None for an unweighted run.
    """

    STREAMS: MethodStreams
    frozen: Optional[FrozenImages] = None  # earlier images trained with, never updated (set by PDD; MTT and IDC use it)

    def __init__(self, cfg, pool: RealPool, syn: SyntheticSet, iwd,
                 dsa_strategy: Optional[str], device, timer: Optional[PhaseTimer] = None):
        self.cfg, self.pool, self.syn, self.iwd = cfg, pool, syn, iwd
        self.timer = timer if timer is not None else PhaseTimer()
        self.dsa_strategy = dsa_strategy
        self.device = device
        self.opt_img = torch.optim.SGD(syn.parameters(), lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.sampler = IndexedClassSampler(pool.labels.cpu(), pool.num_classes,
                                           seed=mix_seed(cfg.seed, self.STREAMS.sampler),
                                           support=iwd.support if iwd is not None else None)
        self.aug_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, self.STREAMS.augment))

    def state_dict(self) -> Dict:
        return {"opt_img": self.opt_img.state_dict(), "sampler": self.sampler.state_dict(),
                "aug_gen": self.aug_gen.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.opt_img.load_state_dict(state["opt_img"])
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])

    def _next_seed(self) -> Optional[int]:
        """Seed of the next DSA draw (shared by a real and a synthetic batch), or None without DSA."""
        if not self.dsa_strategy:
            return None
        return int(torch.randint(0, 2 ** 31 - 1, (), generator=self.aug_gen))

    def _augment(self, x: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
        return x if seed is None else dsa_augment(x, self.dsa_strategy, seed=seed)

    def step(self, it: int) -> Dict[str, float]:
        raise NotImplementedError
