"""Run configuration: every knob of a distillation run, seeds included, in one serialisable record."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..evaluate import EvalSpec
from ..networks import NetSpec

__all__ = ["NetSpec", "EvalSpec", "IWDSpec", "DistillConfig"]


@dataclass
class IWDSpec:
    """Influence weighting (METHOD.md sections 2 and 4).

    Defaults chosen by measurement (benchmarks/RESULTS.md: DC, label-noised Fashion-MNIST, paired seeds):
    the validation target puts the least weight on flipped labels in the loop, and a self-influence
    warm-up choosing the initial real images is what recovers accuracy.
    """

    influence: str = "validation"   # explicit | implicit | validation | self
    sign: str = "auto"              # auto | informative | consistent (distillation targets only)
    temperature: float = 1.0
    ema: float = 0.8
    floor: float = 0.0
    refresh: int = 3                # rescore every `refresh` outer steps (DC/DSA) or iterations (DM)
    heldout_fraction: float = 0.1   # validation target: stratified split held out of the training set
    heldout_batch: int = 256        # validation target: held-out instances per refresh (drawn at random)
    warmup_steps: int = 50          # network training steps before scoring for weighted init
    init: str = "weighted"          # random | weighted (highest weight) | proportional (sample by weight)
    init_influence: str = "self"    # target scored after the warm-up to pick initial images: self | validation


@dataclass
class DistillConfig:
    method: str = "dc"              # dc | dsa | dm
    dataset: str = "digits"
    ipc: int = 10
    weighting: str = "none"         # none | iwd
    iwd: IWDSpec = field(default_factory=IWDSpec)
    noise: float = 0.0
    noise_kind: str = "symmetric"
    seed: int = 0
    iterations: int = 1000
    outer_loop: int = 10
    inner_loop: int = 50
    batch_real: int = 256
    lr_img: float = 0.1
    lr_net: float = 0.01
    momentum_img: float = 0.5
    batch_train_net: int = 256      # DC: batch for the network update on the synthetic set
    dsa_strategy: str = "auto"      # "auto": per dataset (no flip for digits); ignored unless method is dsa
    eval_every: int = 0             # 0: evaluate only at the end
    net: NetSpec = field(default_factory=NetSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    preset: str = ""
    device: str = "auto"
    data_root: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        for key, sub in (("iwd", IWDSpec), ("net", NetSpec)):
            if isinstance(d.get(key), dict):
                d[key] = sub(**d[key])
        if isinstance(d.get("eval"), dict):
            ev = dict(d["eval"])
            if isinstance(ev.get("net"), dict):
                ev["net"] = NetSpec(**ev["net"])
            d["eval"] = EvalSpec(**ev)
        return cls(**d)

    def replace(self, **changes) -> "DistillConfig":
        return dataclasses.replace(self, **changes)
