"""Run configuration: every knob of a distillation run, seeds included, in one serialisable record."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..data.user_data import UserDataSpec
from ..evaluate import EvalSpec
from ..networks import NetSpec
from ..weighting.in_loop import IN_LOOP_DEFAULTS, check_in_loop_options
from ..weighting.trust import CROSSFIT_DEFAULTS
from ..weighting.weighter import WEIGHTER_DEFAULTS

__all__ = ["NetSpec", "EvalSpec", "IWDSpec", "TrajectorySpec", "IDCSpec", "PDDSpec", "DistillConfig"]


@dataclass
class IWDSpec:
    """Influence weighting (METHOD.md sections 2 and 4).

    ``DistillConfig.weighting`` says where weights come from: "none" (uniform), "iwd" (scores of the
    ``influence`` target refreshed inside the loop), "static" (the warm-up network's scores of the
    whole pool, held fixed) or "auto" (METHOD.md 4b: out-of-sample predictions of cross-fitted warm-up
    networks estimate each class's noise rate; the estimated share of suspects gets weight 0, the rest
    weight 1, so a class judged clean keeps uniform weights; ``auto_refresh`` adds in-loop scores of the
    ``influence`` target on top). ``init`` picks the real images that start the synthetic set: "auto"
    ("trusted" for weighting "auto", "random" otherwise), "random", "trusted" (uniform among the
    instances with positive warm-up weight), "weighted" (the highest warm-up weights of each class) or
    "proportional" (drawn in proportion to them). ``pool_cleaning`` runs a baseline before distilling:
    "prune" drops the ``prune_fraction`` of each class with the lowest warm-up weight, "relabel" gives the
    suspects of the cross-fitted estimate the class it is confident of. The defaults and the
    measurements behind them are in benchmarks/RESULTS.md; the weighter's defaults are
    ``iwd_fast.weighting.WEIGHTER_DEFAULTS`` (one set for the class, the loops and the README).
    """

    influence: str = "validation"   # in-loop target: explicit | implicit | validation | self | prototype (DM)
    sign: str = "auto"              # auto | informative | consistent (distillation targets only)
    temperature: float = WEIGHTER_DEFAULTS["temperature"]
    transform: str = WEIGHTER_DEFAULTS["transform"]      # rank (bounded) | zscore (unbounded)
    ema: float = WEIGHTER_DEFAULTS["ema"]
    floor: float = WEIGHTER_DEFAULTS["floor"]
    standardize: bool = WEIGHTER_DEFAULTS["standardize"]  # z-score each refresh's scores per class before the EMA
    # In-loop rescoring (IN_LOOP_DEFAULTS, shared with iwd_fast.InLoopWeights): every `refresh` outer steps
    # (DC/DSA) or iterations (DM); the validation target holds out a stratified `heldout_fraction` of the
    # training set and draws `heldout_batch` of it per refresh, whose lowest-loss `heldout_keep` share
    # defines the direction.
    refresh: int = IN_LOOP_DEFAULTS["refresh"]
    heldout_fraction: float = IN_LOOP_DEFAULTS["heldout_fraction"]
    heldout_batch: int = IN_LOOP_DEFAULTS["heldout_batch"]
    heldout_keep: float = IN_LOOP_DEFAULTS["heldout_keep"]
    heldout_clean: bool = False     # simulate a trusted held-out set (its clean labels; for benchmarks)
    warmup_steps: int = 50          # SGD steps of the warm-up network on the pool
    warmup_influence: str = "self"  # warm-up score (initial images, static weights, pruning): self | validation |
                                    # crossfit (out-of-sample margin; always the score of weighting "auto")
    crossfit_folds: int = CROSSFIT_DEFAULTS["folds"]  # cross-fitted warm-up: folds (each predicted by a network
                                                      # trained on the others)
    crossfit_steps: int = CROSSFIT_DEFAULTS["steps"]  # ... SGD steps of each fold's network (batch 256, momentum 0.9)
    crossfit_lr: float = CROSSFIT_DEFAULTS["lr"]
    auto_refresh: bool = False      # weighting "auto": also rescore in the loop (target ``influence``) on top
    init: str = "auto"              # auto | random | trusted | weighted | proportional
    pool_cleaning: str = "none"     # none | prune | relabel (the baselines users try instead of weighting)
    prune_fraction: float = 0.3     # pool_cleaning "prune": share of each class dropped


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
class PDDSpec:
    """PDD, progressive dataset distillation (Chen et al., ICLR 2024; docs/TRAJECTORY.md): ``stages`` subsets
    distilled one after the other by the ``base`` method, each conditioned on the earlier stages' images
    (frozen), the student training on the union of the stages so far. The run's ``ipc`` is the total
    (``ipc / stages`` new images per class and stage) and its ``iterations`` the total (``iterations /
    stages`` per stage)."""

    base: str = "mtt"                   # mtt | idc
    stages: int = 5
    condition_epochs: int = 300         # epochs on the union of each earlier stage before a stage's network
                                        # (MTT: expert start; IDC: every network) continues; the evaluation's recipe
    condition_learned_lr: bool = False  # MTT: condition on stage j's union at stage j's learned synthetic lr
    stage_expert_epochs: int = 0        # MTT: real-data epochs of the conditioned experts (0: tm.train_epochs)


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
    tm: TrajectorySpec = field(default_factory=TrajectorySpec)
    idc: IDCSpec = field(default_factory=IDCSpec)
    data: UserDataSpec = field(default_factory=UserDataSpec)  # a dataset of one's own (dataset = a folder or file)
    pdd: PDDSpec = field(default_factory=PDDSpec)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain values; ``data`` only when it differs from its defaults (so the config files
        of runs on the built-in datasets stay as they were)."""
        d = dataclasses.asdict(self)
        if d["data"] == dataclasses.asdict(UserDataSpec()):
            del d["data"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        from .config_types import check_config_types

        check_config_types(cls, d)  # every key known and of its field's type, nested tables included
        d = dict(d)
        for key, sub in (("iwd", IWDSpec), ("net", NetSpec), ("tm", TrajectorySpec), ("idc", IDCSpec),
                         ("data", UserDataSpec), ("pdd", PDDSpec)):
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


WEIGHTINGS = ("none", "iwd", "static", "auto")
INIT_MODES = ("auto", "random", "trusted", "weighted", "proportional")
WARMUP_INFLUENCES = ("self", "validation", "crossfit")
POOL_CLEANINGS = ("none", "prune", "relabel")


def init_mode(cfg: "DistillConfig") -> str:
    """The initialisation a run uses: ``iwd.init`` with "auto" resolved ("trusted" for weighting "auto")."""
    if cfg.iwd.init != "auto":
        return cfg.iwd.init
    return "trusted" if cfg.weighting == "auto" else "random"


def warmup_target(cfg: "DistillConfig") -> str:
    """The warm-up's score: "crossfit" for weighting "auto" and relabelling, else ``iwd.warmup_influence``."""
    if cfg.weighting == "auto" or cfg.iwd.pool_cleaning == "relabel":
        return "crossfit"
    return cfg.iwd.warmup_influence


def needs_warmup(cfg: "DistillConfig") -> bool:
    """Whether the run scores its pool with a warm-up network before distilling."""
    return cfg.weighting in ("static", "auto") or init_mode(cfg) != "random" or cfg.iwd.pool_cleaning != "none"


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
    method_check = getattr(METHODS[cfg.method], "check_config", None)  # a method's own options (IDC, MTT, DATM)
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
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0: only at the end), got {cfg.eval_every}")
    cfg.data.check()
    spec = cfg.iwd
    check_target(spec.influence)
    sign_for(spec.influence, spec.sign)
    need(spec.init in INIT_MODES, f"iwd.init must be one of {INIT_MODES}, got {spec.init!r}")
    need(spec.warmup_influence in WARMUP_INFLUENCES,
         f"iwd.warmup_influence must be one of {WARMUP_INFLUENCES}, got {spec.warmup_influence!r}")
    need(spec.transform in TRANSFORMS, f"iwd.transform must be one of {TRANSFORMS}, got {spec.transform!r}")
    need(float(spec.temperature) > 0, f"iwd.temperature must be > 0, got {spec.temperature}")
    need(0.0 <= spec.ema <= 1.0 and 0.0 <= spec.floor <= 1.0, "iwd.ema and iwd.floor must lie in [0, 1]")
    check_in_loop_options(spec.refresh, spec.heldout_batch, spec.heldout_keep, "iwd.")
    need(0.0 <= spec.heldout_fraction < 1.0, f"iwd.heldout_fraction must lie in [0, 1), got {spec.heldout_fraction}")
    need(spec.warmup_steps >= 1, f"iwd.warmup_steps must be >= 1, got {spec.warmup_steps}")
    need(spec.pool_cleaning in POOL_CLEANINGS, f"iwd.pool_cleaning must be one of {POOL_CLEANINGS}, "
                                               f"got {spec.pool_cleaning!r}")
    need(spec.pool_cleaning == "none" or (cfg.weighting == "none" and init_mode(cfg) == "random"),
         f"iwd.pool_cleaning={spec.pool_cleaning!r} is a baseline that distils the cleaned pool unweighted from random "
         f"initial images: it needs weighting 'none' and init 'random' (got {cfg.weighting!r}, {spec.init!r})")
    need(0.0 < spec.prune_fraction < 1.0, f"iwd.prune_fraction must lie in (0, 1), got {spec.prune_fraction}")
    need(spec.crossfit_folds >= 2 and spec.crossfit_steps >= 1 and spec.crossfit_lr > 0,
         f"need iwd.crossfit_folds >= 2, crossfit_steps >= 1, crossfit_lr > 0; got {spec.crossfit_folds}, "
         f"{spec.crossfit_steps}, {spec.crossfit_lr}")
    in_loop = cfg.weighting == "iwd" or (cfg.weighting == "auto" and spec.auto_refresh)
    need(not (in_loop and spec.influence == "prototype") or cfg.method == "dm",
         f"iwd.influence='prototype' is DM's embedding score (the embeddings of its real batches): method dm "
         f"only, got {cfg.method!r}")
    uses_heldout = (in_loop and spec.influence == "validation") or \
        (needs_warmup(cfg) and warmup_target(cfg) == "validation")
    need(not uses_heldout or spec.heldout_fraction > 0,
         "the validation target needs a held-out split: set iwd.heldout_fraction > 0")
    if method_check is not None:
        method_check(cfg)
