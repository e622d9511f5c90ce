"""Run configuration: every knob of a distillation run, seeds included, in one serialisable record."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..evaluate import EvalSpec
from ..networks import NetSpec

__all__ = ["NetSpec", "EvalSpec", "IWDSpec", "TrajectorySpec", "IDCSpec", "DistillConfig"]


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
class TrajectorySpec:
    """Trajectory matching (MTT, DATM; docs/TRAJECTORY.md): the experts, the inner unroll, DATM's extras.

    Defaults are the MTT reference's (100 experts x 50 epochs, SGD 0.01 without momentum, DSA on the real
    batches; syn_steps 20, expert_epochs 3, max_start_epoch 20, lr_lr 1e-5). Fields prefixed ``datm_``
    are read by DATM only; ``score_*`` by the two-pass IWD scheme (METHOD.md 2d) only.
    """

    num_experts: int = 100
    train_epochs: int = 50              # epochs of each expert (snapshots 0..train_epochs are stored)
    expert_lr: float = 0.01             # also the initial learnable synthetic learning rate
    expert_momentum: float = 0.0
    expert_weight_decay: float = 0.0
    expert_batch: int = 256
    expert_dsa: bool = True             # DSA on the experts' real batches (the run's strategy)
    expert_seed: int = 0                # seeds of the experts (independent of the run seed: buffers are shared)
    buffer_dir: str = "runs/buffers"    # expert buffers live in <buffer_dir>/<key>/ and are reused across runs
    syn_steps: int = 20
    expert_epochs: int = 3              # M: the student matches theta*_{t+M} from theta*_t
    min_start_epoch: int = 0
    max_start_epoch: int = 20           # start epochs t are drawn from [min_start_epoch, max_start_epoch)
    lr_lr: float = 1e-5                 # SGD (momentum 0.5) on the learnable synthetic learning rate
    syn_lr_init: float = 0.0            # initial synthetic learning rate; 0: expert_lr (the references' choice)
    batch_syn: int = 0                  # synthetic images per inner step; 0: all of them
    zca: bool = False                   # ZCA whitening (kornia) fitted on the pool; the test set goes through it too
    zca_eps: float = 0.1
    eval_learned_lr: bool = False       # also evaluate with the learned synthetic lr (reported beside the default)
    datm_sequential: bool = True        # DATM: the window's upper end grows from datm_initial_max_start ...
    datm_initial_max_start: int = 10
    datm_expansion_end: int = 1000      # ... to max_start_epoch at this iteration
    datm_lr_labels: float = 2.0         # SGD on the soft-label logits
    datm_momentum_labels: float = 0.9
    datm_threshold: float = 1.0         # skip the update when the matching loss exceeds it
    datm_label_epoch: int = -1          # expert epoch whose logits initialise the soft labels (-1: the last)
    datm_init_correct: bool = True      # initialise from real images the experts classify correctly
    score_experts: int = 1              # IWD: unweighted experts whose checkpoints are scored
    score_every: int = 1                # IWD: score every k-th expert epoch ...
    score_until: int = 0                # ... up to this epoch (0: max_start_epoch + expert_epochs)


@dataclass
class IDCSpec:
    """IDC (Kim et al. 2022; docs/TRAJECTORY.md): multi-formation, a network trained on real data, and
    IDC's gradient distance. Defaults are the reference's (factor 2, 100 inner steps, 500 real images per
    network update, l1 distance on the convolution weights, batch_real 64, augmentation color_crop_cutout)."""

    factor: int = 2                     # each stored image decodes to factor**2 images
    inner_loop: int = 100               # matching steps per network
    net_images: int = 500               # real images per network update (one pass, batch batch_real)
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    metric: str = "l1"                  # l1 | mse | cos
    match_bias: bool = False            # also match 1-D parameters (biases, norm affines)
    match_fc: bool = False              # also match the linear head
    aug: str = "color_crop_cutout"      # augmentation of the matched real and synthetic batch ("none": off)
    batch_syn_max: int = 128            # decoded synthetic images per class and step (subsampled above)
    init: str = "mix"                   # mix: factor**2 downscaled real images per stored image (IDC's choice
                                        # whenever factor > 1) | real: one real image per stored image
    clamp: bool = True                  # keep pixels inside the real data's per-channel range


@dataclass
class DistillConfig:
    method: str = "dc"              # dc | dsa | dm | mtt | datm | idc
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
    subset_per_class: int = 0       # 0: the whole training set; else a stratified subset (seed 0) of it
    tm: TrajectorySpec = field(default_factory=TrajectorySpec)
    idc: IDCSpec = field(default_factory=IDCSpec)

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
        for key, sub in (("iwd", IWDSpec), ("net", NetSpec), ("tm", TrajectorySpec), ("idc", IDCSpec)):
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
