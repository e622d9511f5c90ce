"""Pieces every distiller shares: the real pool, the synthetic set, and the influence-weighting state."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .config import DistillConfig, NetSpec
from ..data.augment import dsa_augment
from ..evaluate import _mix, build_eval_network
from ..weighting.dropin import IndexedClassSampler
from ..weighting.targets import check_target, scores_from_capture, validation_gradient
from ..weighting.weighter import InfluenceWeighter, auroc, sign_for

__all__ = ["mix_seed", "RealPool", "SyntheticSet", "Distiller", "IWDState", "PhaseTimer", "build_net"]

mix_seed = _mix


@dataclass
class RealPool:
    """The real training instances a distiller draws from (the held-out split removed).

    images [n, C, H, W] on the run's device; labels int64 [n] (possibly noisy); flipped bool [n]
    (True where noise changed the label); heldout_* the stratified held-out split (validation target).
    """

    images: torch.Tensor
    labels: torch.Tensor
    flipped: torch.Tensor
    num_classes: int
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    source_indices: torch.Tensor  # [n] index of each pool instance in the training set

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


class PhaseTimer:
    """Wall-clock seconds per phase ("scoring", "distilling", ...); nested phases are subtracted."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self._stack: List[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - entry[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - entry[2]
            if self._stack:
                self._stack[-1][2] += spent


def build_net(spec: NetSpec, pool: RealPool, seed: int, device) -> nn.Module:
    return build_eval_network(spec, pool.channels, pool.num_classes, pool.im_size, seed).to(device)


class Distiller:
    """State every distiller shares: the image optimiser, the real-batch sampler and the DSA seed stream.

    Subclasses set ``SEED_KEY`` (distinct random streams per method) and implement ``step(it)``.
    """

    SEED_KEY = 0

    def __init__(self, cfg: DistillConfig, pool: RealPool, syn: SyntheticSet, iwd: Optional["IWDState"],
                 dsa_strategy: Optional[str], device):
        self.cfg, self.pool, self.syn, self.iwd = cfg, pool, syn, iwd
        self.dsa_strategy = dsa_strategy
        self.device = device
        self.opt_img = torch.optim.SGD(syn.parameters(), lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.sampler = IndexedClassSampler(pool.labels.cpu(), pool.num_classes,
                                           seed=mix_seed(cfg.seed, self.SEED_KEY + 1))
        self.aug_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, self.SEED_KEY + 2))

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


@dataclass
class IWDState:
    """Influence weighting inside a distillation loop: target, weighter, refresh schedule, scoring.

    ``weighter`` covers the pool's n instances (pool-local indices).
    """

    target: str
    weighter: InfluenceWeighter
    refresh: int
    heldout_batch: int = 256
    impl: str = "auto"
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    generator: torch.Generator = field(default_factory=torch.Generator)

    @classmethod
    def from_config(cls, cfg: DistillConfig, pool: RealPool, timer: PhaseTimer) -> Optional["IWDState"]:
        if cfg.weighting == "none":
            return None
        if cfg.weighting != "iwd":
            raise ValueError(f"weighting must be 'none' or 'iwd', got {cfg.weighting!r}")
        spec = cfg.iwd
        target = check_target(spec.influence)
        if spec.refresh < 1:
            raise ValueError(f"iwd.refresh must be >= 1, got {spec.refresh}")
        weighter = InfluenceWeighter(pool.labels.cpu(), pool.num_classes, temperature=spec.temperature,
                                     ema=spec.ema, floor=spec.floor, sign=sign_for(target, spec.sign))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 31))
        return cls(target, weighter, spec.refresh, spec.heldout_batch, timer=timer, generator=gen)

    def due(self, step: int) -> bool:
        return step % self.refresh == 0

    def validation_direction(self, net: nn.Module, pool: RealPool, scale: float) -> List[torch.Tensor]:
        """scale * gradient of the mean loss of a random held-out batch (SCIENCE.md 2c), one per parameter."""
        n = pool.heldout_labels.shape[0]
        pick = torch.randperm(n, generator=self.generator)[:self.heldout_batch].to(pool.heldout_labels.device)
        params = [p for p in net.parameters()]
        return validation_gradient(net, pool.heldout_images[pick], pool.heldout_labels[pick], params, scale=scale)

    def state_dict(self) -> Dict:
        return {"weighter": self.weighter.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.weighter.load_state_dict(state["weighter"])
        self.generator.set_state(state["generator"])

    def batch_weights(self, idx: torch.Tensor, device) -> torch.Tensor:
        return self.weighter.batch_weights(idx.cpu()).to(device)

    def score_and_update(self, cap, idx: torch.Tensor, names: Sequence[str], direction, weights) -> None:
        """Score the captured real batch (``weights``: the factors of its weighted-mean loss) and fold in."""
        factors = None if weights is None else weights / weights.sum()
        raw = scores_from_capture(cap, self.target, names, direction, factors, self.impl)
        self.update(idx, raw)

    def update(self, idx: torch.Tensor, raw: torch.Tensor) -> None:
        self.weighter.update(idx.cpu(), raw.detach().double().cpu())

    def report(self, flipped: torch.Tensor) -> Dict[str, float]:
        """Weight mass on flipped labels, their share, and the AUROC of the scores for flagging them."""
        w = self.weighter.weights()
        flipped = flipped.cpu()
        out = {"weight_on_flipped": self.weighter.weight_mass_on(flipped), "flipped_share": float(flipped.double().mean()),
               "scored_fraction": float(self.weighter.scored.double().mean())}
        scored = self.weighter.scored
        if bool(flipped[scored].any()) and not bool(flipped[scored].all()):
            suspicion = -w[scored].double()  # low weight = suspected harmful
            out["auroc_flipped"] = auroc(suspicion, flipped[scored])
        out["weight_max"] = float(w.max())
        return out


@contextlib.contextmanager
def maybe(ctx, enabled: bool):
    """``ctx`` when enabled, else a null context yielding None."""
    if enabled:
        with ctx as value:
            yield value
    else:
        yield None
