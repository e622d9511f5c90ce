"""Influence weighting inside a distillation loop: where the weights come from, when they are
refreshed, and how a captured real batch is scored."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..runtime import PhaseTimer, Stream, mix_seed
from ..weighting import InfluenceWeighter, auroc, sign_for
from ..weighting.targets import exact_influence, scores_from_capture, validation_gradient
from .base import RealPool

__all__ = ["IWDState"]


@dataclass
class IWDState:
    """The weights of one run's real pool (pool-local indices) and, for in-loop weighting, their refresh.

    ``refresh`` is None for static weights (set once from the warm-up scores, never rescored).
    """

    target: str
    weighter: InfluenceWeighter
    refresh: Optional[int]
    heldout_batch: int = 256
    heldout_keep: float = 1.0
    impl: str = "auto"
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    generator: torch.Generator = field(default_factory=torch.Generator)
    skipped_batches: int = 0

    @classmethod
    def from_config(cls, cfg, pool: RealPool, timer: PhaseTimer, warmup=None) -> Optional["IWDState"]:
        """None for ``weighting="none"`` and for "auto" that finds no suspects; the warm-up weights held fixed for "static" and for "auto" (the
        cross-fitted trust weights); an in-loop weighter for "iwd" (uniform until its first scores) and for
        "auto" with ``iwd.auto_refresh`` (the trust weights as its prior). ``cfg`` was checked by
        ``config.validate``."""
        if cfg.weighting == "none":
            return None
        spec = cfg.iwd
        if cfg.weighting in ("static", "auto"):
            if warmup is None:
                raise ValueError(f"weighting={cfg.weighting!r} needs the warm-up scores")
            if cfg.weighting == "auto" and not spec.auto_refresh and not bool((warmup.weighter.prior == 0).any()):
                return None  # no suspects anywhere: the run is exactly the unweighted one
            if not (cfg.weighting == "auto" and spec.auto_refresh):
                return cls(warmup.target, warmup.weighter, None, timer=timer)
        prior = warmup.weighter.prior if cfg.weighting == "auto" else None
        weighter = InfluenceWeighter(pool.labels.cpu(), pool.num_classes, temperature=spec.temperature,
                                     ema=spec.ema, floor=spec.floor, sign=sign_for(spec.influence, spec.sign),
                                     transform=spec.transform, standardize=spec.standardize, prior=prior)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, Stream.HELDOUT_BATCHES))
        return cls(spec.influence, weighter, spec.refresh, spec.heldout_batch, spec.heldout_keep, timer=timer,
                   generator=gen)

    @property
    def support(self) -> Optional[torch.Tensor]:
        """Bool [n]: the instances real batches are drawn from (those with positive prior weight), or None
        for all of them. Instances of weight 0 would only shrink a batch."""
        prior = self.weighter.prior
        return None if prior is None else prior > 0

    @property
    def in_loop(self) -> bool:
        return self.refresh is not None

    def due(self, step: int) -> bool:
        """Whether the loop scores its real batches at ``step`` (never for static weights)."""
        return self.refresh is not None and step % self.refresh == 0

    def validation_direction(self, net: nn.Module, pool: RealPool, scale: float) -> List[torch.Tensor]:
        """scale * gradient of the mean loss of a random held-out batch, its highest-loss instances left out
        (``heldout_keep``; METHOD.md 2c), one tensor per parameter."""
        n = pool.heldout_labels.shape[0]
        pick = torch.randperm(n, generator=self.generator)[:self.heldout_batch].to(pool.heldout_labels.device)
        params = [p for p in net.parameters()]
        return validation_gradient(net, pool.heldout_images[pick], pool.heldout_labels[pick], params, scale=scale,
                                   keep=self.heldout_keep)

    def state_dict(self) -> Dict:
        return {"weighter": self.weighter.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.weighter.load_state_dict(state["weighter"])
        self.generator.set_state(state["generator"])

    def batch_weights(self, idx: torch.Tensor, device) -> torch.Tensor:
        """The batch's weights relative to its largest (what a weighted mean needs; defined at any temperature)."""
        return self.weighter.relative_batch_weights(idx, device=device)

    def score_captured(self, cap, idx: torch.Tensor, names: Sequence[str], direction=None) -> None:
        """Fold in the scores of a batch captured through ``Capture.weighted_gradient`` (validation and self
        targets; a validation direction given to the capture streams, pass None then)."""
        self.update(idx, scores_from_capture(cap, self.target, names, direction, self.impl))

    def score_influence(self, dots: torch.Tensor, idx: torch.Tensor, direction: Sequence[torch.Tensor],
                        real_statistic: Sequence[torch.Tensor]) -> None:
        """Fold in the exact influences dL/dw_i of a batch from its dots with ``direction`` (explicit and
        implicit targets; METHOD.md 2a). The scale 1 / sum_j w_j is the batch's absolute weight sum; with
        standardised updates it cancels, and it is taken as 1."""
        if self.weighter.standardize:
            weight_sum = 1.0
        else:
            weight_sum = math.exp(self.weighter.batch_log_weight_sum(idx.cpu()))
            if not 0.0 < weight_sum < math.inf:
                self.skipped_batches += 1  # the batch's weights are not representable in float64
                return
        self.update(idx, exact_influence(dots, direction, real_statistic, weight_sum))

    def update(self, idx: torch.Tensor, raw: torch.Tensor) -> None:
        self.weighter.update(idx.cpu(), raw.detach().double().cpu())

    def report(self, flipped: torch.Tensor) -> Dict[str, float]:
        """Weight mass on flipped labels, their share, and the AUROC of the weights for flagging them."""
        w = self.weighter.weights()
        flipped = flipped.cpu()
        out = {"weight_on_flipped": self.weighter.weight_mass_on(flipped), "flipped_share": float(flipped.double().mean()),
               "scored_fraction": float(self.weighter.scored.double().mean())}
        scored = self.weighter.scored
        if bool(flipped[scored].any()) and not bool(flipped[scored].all()):
            out["auroc_flipped"] = auroc(-w[scored].double(), flipped[scored])  # low weight = suspected harmful
        out["weight_max"] = float(w.max())
        if self.skipped_batches:
            out["skipped_batches"] = self.skipped_batches
        return out
