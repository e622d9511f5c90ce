"""``iwd-fast demo``: paired distillation runs with and without IWD on a label-noised dataset.

Fashion-MNIST (a class-stratified subset) when the Debian package dataset-fashion-mnist or a local copy
is present, else scikit-learn's digits (shipped inside scikit-learn). The budget is the "demo" preset:
a reduced CPU budget, not the field's protocol.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..distill.config import DistillConfig
from ..data import DatasetSplits, load_dataset, stratified_subset
from .distill_job import run_distillation
from .presets import describe_preset, preset_config

__all__ = ["run_demo", "pick_demo_data", "format_table"]

FMNIST_TRAIN_PER_CLASS = 300
FMNIST_TEST = 2000


def pick_demo_data(prefer: str = "auto", data_root: Optional[str] = None) -> DatasetSplits:
    """Fashion-MNIST subset when its files are found (``prefer`` "auto" or "fashion-mnist"), else digits."""
    if prefer in ("auto", "fashion-mnist"):
        try:
            full = load_dataset("fashion-mnist", root=data_root)
        except FileNotFoundError:
            if prefer == "fashion-mnist":
                raise
        else:
            return DatasetSplits(train=stratified_subset(full.train, FMNIST_TRAIN_PER_CLASS * full.train.num_classes),
                                 test=stratified_subset(full.test, FMNIST_TEST))
    return load_dataset("digits")


def demo_configs(dataset: str, method: str, seed: int, noise: float, influence: str,
                 preset: str = "demo") -> List[DistillConfig]:
    """The paired configs: unweighted and IWD, same seed, same noise, same held-out split."""
    base = preset_config(preset, method, dataset, 10)
    base = base.replace(noise=noise, seed=seed)
    iwd = dataclasses.replace(base.iwd, influence=influence, init="weighted")
    return [base.replace(weighting="none", iwd=iwd), base.replace(weighting="iwd", iwd=iwd)]


def run_demo(out: str = "runs/demo", method: str = "dc", seeds=(0,), noise: float = 0.3,
             influence: str = "validation", prefer: str = "auto", data_root: Optional[str] = None,
             preset: str = "demo", progress: bool = True) -> Dict[str, Any]:
    """Run the paired demo; returns {"dataset", "rows": [...], "table": markdown}; writes run folders."""
    splits = pick_demo_data(prefer, data_root)
    dataset = splits.train.name
    rows = []
    for seed in seeds:
        for cfg in demo_configs(dataset, method, seed, noise, influence, preset):
            name = f"{method}_{cfg.weighting}_seed{seed}"
            summary = run_distillation(cfg, splits, out_dir=str(Path(out) / name), progress=progress)
            rows.append(_row(name, cfg, summary))
    table = format_table(rows, noise)
    note = (f"dataset: {dataset} ({len(splits.train)} train / {len(splits.test)} test), {noise:.0%} symmetric label "
            f"noise, IPC 10, method {method}; budget: {describe_preset(preset)}")
    (Path(out) / "demo_table.md").write_text(note + "\n\n" + table + "\n")
    return {"dataset": dataset, "rows": rows, "table": table, "note": note}


def _row(name: str, cfg: DistillConfig, s: Dict[str, Any]) -> Dict[str, Any]:
    timing = s["timing_seconds"]
    return {
        "run": name, "weighting": cfg.weighting if cfg.weighting == "none" else f"iwd ({cfg.iwd.influence})",
        "acc_mean": s["accuracy"]["mean"], "acc_std": s["accuracy"]["std"],
        "init_flipped_share": s["init_flipped_share"],
        "weight_on_flipped": s.get("weight_on_flipped"), "auroc_flipped": s.get("auroc_flipped"),
        "scoring_share": s["scoring_share_of_loop"], "seconds": sum(timing.values()),
    }


def format_table(rows: List[Dict[str, Any]], noise: float) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| run | weighting | test acc (mean ± std over eval nets) | flipped share of init images | "
             f"weight on flipped (noise rate {noise:.2f}) | AUROC flipped | scoring share of loop time | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['weighting']} | {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} | "
                     f"{r['init_flipped_share']:.2f} | {f(r['weight_on_flipped'], '.3f')} | "
                     f"{f(r['auroc_flipped'], '.3f')} | {f(r['scoring_share'], '.1%')} | {r['seconds']:.0f} |")
    return "\n".join(lines)
