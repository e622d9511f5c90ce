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

    ``DistillConfig.weighting`` says where weights come from: "none" (uniform), "iwd" (scores of the
    ``influence`` target refreshed inside the loop) or "static" (the warm-up network's scores of the
    whole pool, held fixed). ``init`` picks the real images that start the synthetic set, for every
    ``weighting``: "random", "weighted" (the highest warm-up weights of each class) or "proportional"
    (drawn in proportion to them). The defaults and the measurements behind them are in
    benchmarks/RESULTS.md.
    """

    influence: str = "validation"   # in-loop target: explicit | implicit | validation | self
    sign: str = "auto"              # auto | informative | consistent (distillation targets only)
    temperature: float = 1.0
    transform: str = "rank"         # rank (bounded: normal quantile of the rank) | zscore (unbounded)
    ema: float = 0.8
    floor: float = 0.0
    standardize: bool = True        # z-score each refresh's scores per class before the EMA
    refresh: int = 3                # rescore every `refresh` outer steps (DC/DSA) or iterations (DM)
    heldout_fraction: float = 0.1   # validation target: stratified split held out of the training set
    heldout_batch: int = 256        # validation target: held-out instances per refresh (drawn at random)
    heldout_keep: float = 0.7       # validation target: the lowest-loss share of that batch defines the direction
    heldout_clean: bool = False     # simulate a trusted held-out set (its clean labels; for benchmarks)
    warmup_steps: int = 50          # SGD steps of the warm-up network on the pool
    warmup_influence: str = "self"  # its score, which picks initial images and gives static weights: self | validation
    init: str = "weighted"          # random | weighted | proportional


@dataclass
class DistillConfig:
    method: str = "dc"              # see iwd_fast.distill.METHODS
    dataset: str = "digits"
    ipc: int = 10
    weighting: str = "none"         # none | iwd (in-loop scores) | static (warm-up scores held fixed)
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
    train_size: int = 0             # class-stratified training subset (0: the whole training split)
    test_size: int = 0              # class-stratified test subset (0: the whole test split)

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


WEIGHTINGS = ("none", "iwd", "static")
INIT_MODES = ("random", "weighted", "proportional")
WARMUP_INFLUENCES = ("self", "validation")
NOISE_KINDS = ("symmetric", "pairflip")


def validate(cfg: DistillConfig) -> None:
    """Refuse a config that cannot run, with a one-line reason, before any file is written or data read."""
    from . import METHODS  # the registry imports the methods, which import this module
    from ..weighting import TRANSFORMS, sign_for
    from ..weighting.targets import check_target

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(cfg.method in METHODS, f"unknown method {cfg.method!r}; choose from {sorted(METHODS)}")
    need(isinstance(cfg.ipc, int) and cfg.ipc >= 1, f"ipc must be a positive integer, got {cfg.ipc!r}")
    need(0.0 <= float(cfg.noise) < 1.0, f"noise must be a rate in [0, 1), got {cfg.noise}")
    need(cfg.noise_kind in NOISE_KINDS, f"noise_kind must be one of {NOISE_KINDS}, got {cfg.noise_kind!r}")
    need(cfg.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    need(cfg.iterations >= 0 and cfg.outer_loop >= 1 and cfg.inner_loop >= 0,
         f"need iterations >= 0, outer_loop >= 1, inner_loop >= 0; got {cfg.iterations}, {cfg.outer_loop}, "
         f"{cfg.inner_loop}")
    need(cfg.batch_real >= 1 and cfg.lr_img > 0 and cfg.lr_net > 0,
         f"need batch_real >= 1, lr_img > 0, lr_net > 0; got {cfg.batch_real}, {cfg.lr_img}, {cfg.lr_net}")
    need(cfg.train_size >= 0 and cfg.test_size >= 0, "train_size and test_size must be >= 0 (0: all)")
    spec = cfg.iwd
    check_target(spec.influence)
    sign_for(spec.influence, spec.sign)
    need(spec.init in INIT_MODES, f"iwd.init must be one of {INIT_MODES}, got {spec.init!r}")
    need(spec.warmup_influence in WARMUP_INFLUENCES,
         f"iwd.warmup_influence must be one of {WARMUP_INFLUENCES}, got {spec.warmup_influence!r}")
    need(spec.transform in TRANSFORMS, f"iwd.transform must be one of {TRANSFORMS}, got {spec.transform!r}")
    need(float(spec.temperature) > 0, f"iwd.temperature must be > 0, got {spec.temperature}")
    need(0.0 <= spec.ema <= 1.0 and 0.0 <= spec.floor <= 1.0, "iwd.ema and iwd.floor must lie in [0, 1]")
    need(spec.refresh >= 1, f"iwd.refresh must be >= 1, got {spec.refresh}")
    need(0.0 <= spec.heldout_fraction < 1.0, f"iwd.heldout_fraction must lie in [0, 1), got {spec.heldout_fraction}")
    need(0.0 < spec.heldout_keep <= 1.0, f"iwd.heldout_keep must lie in (0, 1], got {spec.heldout_keep}")
    need(spec.heldout_batch >= 1 and spec.warmup_steps >= 1, "iwd.heldout_batch and iwd.warmup_steps must be >= 1")
    uses_heldout = (cfg.weighting == "iwd" and spec.influence == "validation") or \
        ((cfg.weighting == "static" or spec.init != "random") and spec.warmup_influence == "validation")
    need(not uses_heldout or spec.heldout_fraction > 0,
         "the validation target needs a held-out split: set iwd.heldout_fraction > 0")
