"""Named run budgets in one readable place: the field's full protocol and smaller CPU budgets.

A preset is a set of partial :class:`~iwd_fast.config.DistillConfig` overrides: ``"all"`` applies to
every method, ``"dc"``/``"dsa"``/``"dm"`` on top of it, and ``"loops"`` maps IPC -> (outer_loop,
inner_loop) for the gradient-matching methods. Nested dataclasses (``net``, ``eval``, ``iwd``) are
given as dicts of the fields that change. ``preset_config(name, method, dataset, ipc)`` builds the
config. Only ``"paper"`` is the field's protocol (METHOD.md section 5); the others say "reduced".

Evaluation follows the reference repositories: DC is evaluated without augmentation (300 epochs),
DSA and DM with DSA augmentation (1000 epochs). At IPC 10 an epoch over the synthetic set is ONE SGD
step, so the reduced budgets keep hundreds of epochs: measured on 2 CPU cores with 10 real images per
class (ConvNet-3 width 32, one net), digits reached 48% / 65% / 74% test accuracy after 50 / 100 / 300
epochs without DSA and 16% / 25% / 62% with DSA; Fashion-MNIST 74.6% / 75.3% after 100 / 300 epochs
without DSA and 69.1% after 500 with DSA. Fewer epochs would measure under-training, not the set.
Callers pass the resolved DSA strategy to :func:`iwd_fast.evaluate.evaluate_synthetic` whenever
``cfg.eval.dsa`` is true, whatever the method.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ..distill import METHODS as _METHOD_CLASSES
from ..distill.config import DistillConfig, PDDSpec
from ..distill.pdd import PDD_BASES

__all__ = ["default_weighting", "noisy_label_recipe", "PRESETS", "FIELD_LOOPS", "METHODS", "preset_config", "list_presets", "describe_preset",
           "loops_for_ipc"]

METHODS = tuple(_METHOD_CLASSES)

# IPC -> (outer_loop, inner_loop): the DC/DSA reference repositories' table.
FIELD_LOOPS: Dict[int, Tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20),
                                           40: (40, 15), 50: (50, 10)}

_FIELD_NET = {"name": "convnet", "width": 128, "depth": 3, "norm": "instancenorm"}
_FIELD_EVAL = {"num_nets": 5, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256}

# MTT per IPC (CIFAR-10), from the MTT paper's hyper-parameter table (the repository shows it only as an
# image, so these were transcribed by hand: check them before a publication run).
_MTT_PAPER_BY_IPC = {
    1: {"lr_img": 1000, "tm": {"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 2, "lr_lr": 1e-7}},
    10: {"lr_img": 100000, "tm": {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-5}},
    50: {"lr_img": 100, "tm": {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_lr": 1e-5, "zca": False}},
}
# DATM per IPC: the repository's configs/CIFAR-10/ConvIN/IPC{1,10,50}.yaml.
_DATM_PAPER_BY_IPC = {
    1: {"lr_img": 100, "tm": {"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 4, "lr_lr": 1e-7,
                              "datm_sequential": False, "datm_lr_labels": 5.0, "datm_threshold": 1.1}},
    10: {"lr_img": 100, "tm": {"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-5,
                               "datm_initial_max_start": 10, "datm_expansion_end": 1000, "datm_lr_labels": 2.0}},
    50: {"lr_img": 1000, "tm": {"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 40, "lr_lr": 1e-5,
                                "datm_initial_max_start": 20, "datm_expansion_end": 2000, "datm_lr_labels": 2.0}},
}
# PDD on MTT per IPC (CIFAR-10): the PDD repository's README commands (P = 5 stages of IPC / 5 images per class);
# the conditioned experts train max_start_epoch + expert_epochs + 1 epochs on real data (its distill_mtt.py).
# At IPC 1 (one stage) PDD is MTT.
_PDD_MTT_PAPER_BY_IPC = {
    1: {"iterations": 5000, "eval": {"epochs": 1000}},
    10: {"lr_img": 1000, "tm": {"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 5, "lr_lr": 1e-7, "zca": True},
         "pdd": {"stage_expert_epochs": 5 + 2 + 1}},
    50: {"lr_img": 1000, "tm": {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 15, "lr_lr": 1e-5, "zca": True},
         "pdd": {"stage_expert_epochs": 15 + 2 + 1}},
}


def _idc_lr(ipc_per_stage: int) -> float:
    """IDC's image lr for CIFAR in our normalised pixels: 5e-3 in [0, 1] pixels scaled by IPC / 10 (its
    argument.py ``tune_lr_img``), divided by CIFAR-10's per-channel variance (std about 0.25, std^2 0.0625)."""
    return 5e-3 * ipc_per_stage / 10 / 0.0625


# The reduced CPU evaluation every CPU budget shares: 5 networks x 300 epochs, batch 256, no DSA (DSA and DM
# switch DSA on).
_CPU_EVAL = {"num_nets": 5, "epochs": 300, "batch_size": 256, "dsa": False}
# Reduced CPU budgets for trajectory matching and IDC (docs/TRAJECTORY.md, Fashion-MNIST IPC 10). MTT without DSA
# (students and experts; with DSA it gained +1.5 pp at most), lr_img 300 (100: +3.8, 1000: +2.6 at 400 iterations on
# a 3,000-image subset), on the 10,000-image subset the DC/DSA/DM presets use and 20 unrolled student steps
# (benchmarks/results/budget_scans.jsonl, clean labels: +5.8 / +3.6 / +6.7 pp over the initial images on seeds 0 / 1
# / 2; the earlier 3,000 images and 10 steps +2.9 to +3.2, 10,000 images with 10 steps +4.6 at 400 and +4.9 at 800
# iterations). DATM keeps the budget it was measured at (3,000 images, 10 steps; with DSA as its reference: +6.8 pp
# over its soft-labelled initial images at 400 iterations; without DSA +3.6); IDC the reference's image lr (5e-3 in
# [0, 1] pixels, here divided by Fashion-MNIST's std^2: 0.04; 1e-3 gained +1.0, 0.04 +8.9).
_TM_CPU_EXPERTS = {"num_experts": 5, "train_epochs": 15, "expert_lr": 0.01, "expert_epochs": 2, "max_start_epoch": 10,
                   "lr_lr": 1e-5, "score_experts": 1}
_TM_CPU = {"iterations": 400, "lr_img": 300.0, "momentum_img": 0.5, "train_size": 10000, "dsa_strategy": "none",
           "eval": dict(_CPU_EVAL), "tm": {**_TM_CPU_EXPERTS, "syn_steps": 20, "expert_dsa": False}}
_DATM_CPU = {"iterations": 400, "lr_img": 100.0, "momentum_img": 0.5, "train_size": 3000, "dsa_strategy": "auto",
             "eval": dict(_CPU_EVAL), "tm": {**_TM_CPU_EXPERTS, "syn_steps": 10, "expert_dsa": True,
                                                "datm_initial_max_start": 5, "datm_expansion_end": 100}}
_IDC_CPU = {"iterations": 20, "lr_img": 0.04, "momentum_img": 0.5, "batch_real": 64, "train_size": 3000,
            "eval": dict(_CPU_EVAL),
            "idc": {"factor": 2, "inner_loop": 20, "net_images": 256, "metric": "l1"}}
_TM_SMOKE = {"num_experts": 2, "train_epochs": 3, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2,
             "expert_batch": 256, "score_experts": 1}

# The reduced CPU budget shared by the "cpu" and "demo" presets. The cpu preset runs DC/DSA 5x longer
# (benchmarks/results/budget_scans.jsonl, clean Fashion-MNIST, seed 0: 20 iterations gained +3.0 pp over the
# initial images, 100 iterations +4.4; 200 at lr_img 1.0 +4.0, width 32 +4.5, the field's 10 x 50 loops for 12
# iterations +3.4); the demo keeps 20 iterations to stay under 5 minutes. DM stays at 150 iterations (1000: +3.5
# against +3.1). DC's network trains at lr_net 0.05 between matching steps (5x the shared 0.01): the images are
# then matched at networks further along their training: +4.9 +- 1.1 pp over the initial images on clean labels
# (seeds 0-4: +5.2 / +3.9 / +5.9 / +3.3 / +6.0) against +3.5 at 0.01, paired +1.3 (p = 0.005), at the same cost;
# DSA gained nothing from it (+2.7 / +2.1 on seeds 0 / 1).
_CPU_GM_ITERATIONS = 100
_CPU_DC_LR_NET = 0.05
_REDUCED_CPU = {
    "strict_ipc": False,
    "loops": {1: (1, 1), 10: (5, 10), 50: (5, 2)},
    "all": {"iterations": 20, "lr_img": 0.3, "lr_net": 0.01, "momentum_img": 0.5, "batch_real": 64,
            "batch_train_net": 256, "net": {"name": "convnet", "width": 16, "depth": 3, "norm": "instancenorm"},
            "eval": dict(_CPU_EVAL), "iwd": {"warmup_steps": 50}},
    "dsa": {"eval": {"dsa": True}},
    "dm": {"iterations": 150, "lr_img": 10.0, "eval": {"dsa": True}},
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {
        "description": "the field's full protocol (METHOD.md section 5): ConvNet-3 width 128 instancenorm; "
                       "DC/DSA 1000 iterations, lr_img 0.1, batch_real 256, loops by IPC; DM 20000 iterations, "
                       "lr_img 1.0; eval 5 nets, 1000 epochs with DSA (DSA, DM) / 300 without (DC)",
        "strict_ipc": True,   # the field defines loops only for the IPC values of FIELD_LOOPS
        "loops": FIELD_LOOPS,
        "all": {"iterations": 1000, "lr_img": 0.1, "lr_net": 0.01, "momentum_img": 0.5, "batch_real": 256,
                "batch_train_net": 256, "net": dict(_FIELD_NET), "eval": dict(_FIELD_EVAL)},
        "dc": {"eval": {"dsa": False, "epochs": 300, "num_nets": 20}},
        "dsa": {"eval": {"dsa": True, "epochs": 1000, "num_nets": 20}},
        "dm": {"iterations": 20000, "lr_img": 1.0, "eval": {"dsa": True, "epochs": 1000}},
        # Trajectory matching and IDC (docs/TRAJECTORY.md): the authors' repositories' settings.
        "mtt": {"iterations": 5000, "lr_img": 1000, "momentum_img": 0.5, "eval": {"dsa": True, "epochs": 1000},
                "tm": {"num_experts": 100, "train_epochs": 50, "expert_lr": 0.01, "syn_steps": 20, "expert_epochs": 3,
                       "max_start_epoch": 20, "lr_lr": 1e-5, "zca": True, "eval_learned_lr": True}},
        "mtt_by_ipc": _MTT_PAPER_BY_IPC,
        "datm": {"iterations": 10000, "lr_img": 100, "momentum_img": 0.5,
                 "eval": {"dsa": True, "epochs": 1000, "batch_size": 128},
                 "tm": {"num_experts": 100, "train_epochs": 100, "expert_lr": 0.01, "syn_steps": 80, "expert_epochs": 2,
                        "min_start_epoch": 0, "max_start_epoch": 20, "lr_lr": 1e-5, "zca": True,
                        "eval_learned_lr": True, "datm_sequential": True, "datm_initial_max_start": 10,
                        "datm_expansion_end": 1000, "datm_lr_labels": 2.0, "datm_momentum_labels": 0.9,
                        "datm_threshold": 1.0, "datm_init_correct": True}},
        "datm_by_ipc": _DATM_PAPER_BY_IPC,
        "idc": {"iterations": 2000, "lr_img": _idc_lr(10), "momentum_img": 0.5, "batch_real": 64,
                "eval": {"dsa": True, "epochs": 1000, "batch_size": 64},
                "idc": {"factor": 2, "inner_loop": 100, "net_images": 2000, "metric": "mse",
                        "aug": "color_crop_cutout", "batch_syn_max": 128, "init": "mix"}},
        "idc_by_ipc": {ipc: {"lr_img": _idc_lr(ipc)} for ipc in (1, 10, 50)},
        # PDD (docs/PAPER_PROTOCOL.md): 5 stages at IPC 10 and 50 (none at IPC 1: one stage is the base method).
        "pdd": {"pdd": {"stages": 5}},
        "pdd_by_ipc": {1: {"pdd": {"stages": 1}}, 10: {}, 50: {}},
        "pdd_mtt": {"iterations": 5 * 5000, "eval": {"epochs": 500},
                    "pdd": {"condition_epochs": 1000, "condition_learned_lr": True}},
        "pdd_mtt_by_ipc": _PDD_MTT_PAPER_BY_IPC,
        "pdd_idc": {"iterations": 5 * 2000, "pdd": {"condition_epochs": 200}},
        "pdd_idc_by_ipc": {1: {"iterations": 2000}, 10: {"lr_img": _idc_lr(2)}, 50: {"lr_img": _idc_lr(10)}},
    },
    "cpu": {
        "description": "reduced CPU budget (not the field's protocol; measured in benchmarks/RESULTS.md): a 10,000-image "
                       "Fashion-MNIST training subset (2,000 test), ConvNet-3 width 16 (depth 2 on 8x8 digits), 100 "
                       "iterations of 5 outer x 10 inner loops, batch_real 64, lr_img 0.3, lr_net 0.01 (DC: 0.05; DM: 150 "
                       "iterations, lr_img 10); eval 5 nets x 300 epochs, batch 256, DSA for DSA and DM; about 3-4 CPU-minutes "
                       "per run",
        **_REDUCED_CPU,
        "datasets": {"fashion-mnist": {"train_size": 10000, "test_size": 2000}, "digits": {"net": {"depth": 2}}},
        "dc": {"iterations": _CPU_GM_ITERATIONS, "lr_net": _CPU_DC_LR_NET},
        "dsa": {**_REDUCED_CPU["dsa"], "iterations": _CPU_GM_ITERATIONS},
        "mtt": dict(_TM_CPU),
        "datm": dict(_DATM_CPU),
        "idc": dict(_IDC_CPU),
        # PDD: 2 stages of IPC / 2 images per class; IDC's budget, 5 iterations a stage, on the cpu preset's 10,000
        # images (benchmarks/RESULTS.md section 9); on MTT its budget split in two (not measured).
        "pdd": {"pdd": {"stages": 2, "condition_epochs": 50}},
        "pdd_by_ipc": {1: {"pdd": {"stages": 1}}, 10: {}},
        "pdd_idc": {"train_size": 10000, "iterations": 2 * 5},
        "pdd_mtt": {"iterations": 2 * 200},
    },
    "demo": {
        "description": "demo budget (not the field's protocol): the cpu preset's loops on the demo's data (a 3,000-image "
                       "Fashion-MNIST subset or digits): ConvNet-3 width 16 (depth 2 on digits), 20 iterations of 5 x 10 "
                       "loops, batch_real 64, lr_img 0.3 (DM: 150 iterations, lr_img 10); eval 5 nets x 300 epochs",
        **_REDUCED_CPU,
        "datasets": {"digits": {"net": {"depth": 2}}},
    },
    "smoke": {
        "description": "smoke test (seconds, meaningless accuracy): 2 iterations, outer 1, inner 1, batch_real 16, "
                       "ConvNet-3 width 8, eval 1 net x 2 epochs",
        "strict_ipc": False,
        "loops": {1: (1, 1)},
        "all": {"iterations": 2, "batch_real": 16, "batch_train_net": 16, "eval_every": 0,
                "net": {"name": "convnet", "width": 8, "depth": 3, "norm": "instancenorm"},
                "eval": {"num_nets": 1, "epochs": 2, "batch_size": 64}, "iwd": {"warmup_steps": 2, "crossfit_steps": 4}},
        "dm": {"lr_img": 1.0},
        "mtt": {"lr_img": 100.0, "tm": dict(_TM_SMOKE)},
        "datm": {"lr_img": 100.0, "tm": {**_TM_SMOKE, "datm_initial_max_start": 1, "datm_expansion_end": 2}},
        "idc": {"lr_img": 1e-3, "idc": {"inner_loop": 1, "net_images": 16, "batch_syn_max": 8}},
        "pdd": {"pdd": {"stages": 2, "condition_epochs": 2}},
        "pdd_by_ipc": {1: {"pdd": {"stages": 1}}, 2: {"pdd": {"stages": 2}}},
    },
}


# The weighting ``iwd-fast distill`` uses when none is given: "none" for every method (benchmarks/RESULTS.md).
# At the cpu preset's 100 DC iterations (section 1c, 5 paired seeds) in-loop weights cost 2.2 points (paired) on clean
# labels; DSA runs the same loop and was not measured apart. No variant helped DM (section 1); the two-pass
# scheme cost MTT 2.6 and DATM 3.1 points under 30% noise (section 4). A method listed here would be weighted
# by default.
DEFAULT_WEIGHTING: Dict[str, str] = {}

# What the measurements recommend under label noise, per method: (weighting, initialisation). DC: "auto", the
# cross-fitted trust weights with initial images drawn among the trusted (benchmarks/RESULTS.md 1e, 4 paired seeds
# at the cpu preset: +7.4 points over unweighted at 40% symmetric noise against +4.6 for in-loop weights from
# weighted initial images in 1c, +0.8 on clean labels; the demo on digits +3.4 paired where that recipe lost
# 3.3). DSA and IDC keep the recipe measured for them (in-loop weights from weighted initial images: DC's loop,
# and IDC +2.8 under 30% noise in section 4); "auto" was not measured there. Methods not listed: unweighted, weighted initial images (DM: in-loop
# weights changed nothing; MTT/DATM: weighted experts cost accuracy). ``iwd-fast demo`` runs it.
NOISY_LABEL_RECIPE: Dict[str, Tuple[str, str]] = {"dc": ("auto", "auto"), "dsa": ("iwd", "weighted"),
                                                  "idc": ("iwd", "weighted")}


def default_weighting(method: str) -> str:
    """The measured default weighting of ``method`` ("none" for a method without a measured default)."""
    return DEFAULT_WEIGHTING.get(method, "none")


def noisy_label_recipe(method: str) -> Tuple[str, str]:
    """(weighting, init) the measurements recommend for ``method`` when labels are noisy."""
    return NOISY_LABEL_RECIPE.get(method, ("none", "weighted"))


def list_presets() -> List[str]:
    """Names of the presets, in the order of :data:`PRESETS`."""
    return list(PRESETS)


def _get(name: str) -> Dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def describe_preset(name: str) -> str:
    """The one-line description of preset ``name`` (says whether it is the field's protocol)."""
    return _get(name)["description"]


def loops_for_ipc(name: str, ipc: int) -> Tuple[int, int]:
    """(outer_loop, inner_loop) of preset ``name`` at ``ipc``.

    Strict presets (``paper``) only accept the IPC values of their table; the others take the entry of
    the nearest tabulated IPC (ties go to the smaller one).
    """
    preset = _get(name)
    table: Dict[int, Tuple[int, int]] = preset["loops"]
    if ipc in table:
        return table[ipc]
    if preset["strict_ipc"]:
        raise ValueError(f"preset {name!r} defines outer/inner loops only for IPC {sorted(table)}, got {ipc}; "
                         f"set outer_loop/inner_loop yourself or use another preset")
    nearest = min(table, key=lambda k: (abs(k - ipc), k))
    return table[nearest]


def _merge(target: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """Recursively merge ``overrides`` into ``target`` (dicts merge key by key, values replace)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def preset_config(name: str, method: str, dataset: str, ipc: int, base: Optional[str] = None) -> DistillConfig:
    """A :class:`DistillConfig` for ``method`` on ``dataset`` at ``ipc`` under preset ``name``.

    Starts from the config defaults, applies the preset's ``"all"`` overrides, then its ``"datasets"``
    overrides for ``dataset``, then its method overrides (a method's own settings win over the dataset's)
    with their per-IPC table ``"<method>_by_ipc"``, then the outer/inner loops for ``ipc``; ``cfg.preset``
    records the name. PDD (``method="pdd"``) runs on ``base`` (default ``PDDSpec.base``): the base method's
    blocks apply first, then ``"pdd"`` and ``"pdd_<base>"`` (with their per-IPC tables). Unknown names,
    methods or a non-positive IPC raise ValueError.
    """
    preset = _get(name)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if base is not None and method != "pdd":
        raise ValueError(f"a base method is a PDD setting; method {method!r} takes none")
    base = (base or PDDSpec().base) if method == "pdd" else None
    if base is not None and base not in PDD_BASES:
        raise ValueError(f"PDD runs on {' or '.join(PDD_BASES)}, got base {base!r}")
    outer, inner = loops_for_ipc(name, ipc)
    d = DistillConfig(method=method, dataset=dataset, ipc=ipc).to_dict()
    _merge(d, preset.get("all", {}))
    _merge(d, preset.get("datasets", {}).get(dataset, {}))
    for block in ([method] if base is None else [base, "pdd", f"pdd_{base}"]):
        _merge(d, preset.get(block, {}))
        by_ipc = preset.get(f"{block}_by_ipc")  # per-IPC overrides of one method (trajectory matching, IDC, PDD)
        if by_ipc:
            if ipc not in by_ipc and preset["strict_ipc"]:
                raise ValueError(f"preset {name!r} defines {block} only for IPC {sorted(by_ipc)}, got {ipc}")
            _merge(d, by_ipc.get(ipc, by_ipc[min(by_ipc, key=lambda k: (abs(k - ipc), k))]))
    if base is not None:
        d["pdd"]["base"] = base
    d.update(outer_loop=outer, inner_loop=inner, preset=name)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(DistillConfig)})
    if unknown:
        raise ValueError(f"preset {name!r} sets unknown config keys {unknown}")
    return DistillConfig.from_dict(d)
