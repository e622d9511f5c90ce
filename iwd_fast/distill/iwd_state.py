"""Influence weighting inside a distillation loop: the target, the weighter, the refresh schedule
and the scoring of captured real batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..runtime import PhaseTimer, Stream, mix_seed
from ..weighting import InfluenceWeighter, auroc, sign_for
from ..weighting.targets import check_target, scores_from_capture, validation_gradient
from .base import RealPool

__all__ = ["IWDState"]


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
    def from_config(cls, cfg, pool: RealPool, timer: PhaseTimer) -> Optional["IWDState"]:
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
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, Stream.HELDOUT_BATCHES))
        return cls(target, weighter, spec.refresh, spec.heldout_batch, timer=timer, generator=gen)

    def due(self, step: int) -> bool:
        return step % self.refresh == 0

    def validation_direction(self, net: nn.Module, pool: RealPool, scale: float) -> List[torch.Tensor]:
        """scale * gradient of the mean loss of a random held-out batch (METHOD.md 2c), one per parameter."""
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
