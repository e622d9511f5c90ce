"""``iwd-fast demo``: paired distillation runs with and without IWD on a label-noised dataset.

For every seed, two runs share noise, split and evaluation networks: unweighted (random real images to
start, uniform weights) and IWD (the recipe the measurements recommend under label noise,
``presets.noisy_label_recipe``: for DC ``auto``, the cross-fitted trust weights with initial images drawn
among the trusted). The data is a
class-stratified Fashion-MNIST subset when its files are found (Debian's dataset-fashion-mnist, a
``--data-root`` folder or the cache), else scikit-learn's digits, which ships inside scikit-learn. The
runs are the cells of a small benchmark suite (two at a time, one thread each), so a second call
reuses what the first finished. The budget is the "demo" preset: a reduced CPU budget, not the field's
protocol.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..data import load_dataset
from .bench import run_cells
from .bench_spec import expand_cells
from .presets import describe_preset, noisy_label_recipe
from .report import markdown_table, paired

__all__ = ["run_demo", "pick_dataset", "demo_spec"]

SUBSETS = {"fashion-mnist": (3000, 2000), "digits": (0, 0)}  # train / test sizes (0: all)
GET_FASHION_MNIST = ("Fashion-MNIST was not found, so the demo used scikit-learn's digits (8x8). For Fashion-MNIST: "
                     "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four idx files in a "
                     "folder and pass --data-root, or pass --download once.")


def pick_dataset(prefer: str = "auto", data_root: Optional[str] = None) -> tuple:
    """("fashion-mnist" | "digits", note): Fashion-MNIST when its files are found, else digits."""
    if prefer in ("auto", "fashion-mnist"):
        try:
            load_dataset("fashion-mnist", root=data_root)
            return "fashion-mnist", ""
        except FileNotFoundError:
            if prefer == "fashion-mnist":
                raise
            return "digits", GET_FASHION_MNIST
    return "digits", ""


def demo_spec(dataset: str, method: str, seeds: Sequence[int], noise: float, preset: str,
              data_root: Optional[str] = None) -> Dict[str, Any]:
    """The demo as a suite spec: two variants (unweighted, iwd) x seeds on one noisy dataset."""
    train, test = SUBSETS[dataset]
    config: Dict[str, Any] = {"train_size": train, "test_size": test}
    if data_root:
        config["data_root"] = data_root
    weighting, init = noisy_label_recipe(method)
    return {"name": "demo", "preset": preset, "methods": [method], "datasets": [dataset], "ipc": [10],
            "seeds": list(seeds), "noise": [[noise, "symmetric"]], "config": config,
            "variants": {"unweighted": {"weighting": "none", "iwd": {"init": "random"}},
                         "iwd": {"weighting": weighting, "iwd": {"init": init}}}}


def _row(r: Dict[str, Any]) -> Dict[str, Any]:
    seconds = sum(v for k, v in (r.get("timing_seconds") or {}).items())
    return {"seed": r["seed"], "weighting": "none" if r["variant"] == "unweighted" else
            f"iwd ({r['weighting']}, init {r['init_mode']})", "init_accuracy": r["init_accuracy"],
            "accuracy": r["accuracy"], "accuracy_std_nets": r["accuracy_std_nets"],
            "weight_on_flipped": r.get("weight_on_flipped"), "flipped_share": r.get("flipped_share"),
            "auroc_flipped": r.get("auroc_flipped"), "init_flipped_share": r.get("init_flipped_share"),
            "seconds": seconds, "run": r["cell"]}


def format_table(rows: List[Dict[str, Any]]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v):
        return "-" if v is None else f"{v:.2f}"

    body = [[r["seed"], r["weighting"], pct(r["init_accuracy"]), f"{pct(r['accuracy'])} ± {pct(r['accuracy_std_nets'])}",
             f"{100 * (r['accuracy'] - r['init_accuracy']):+.1f}", num(r["init_flipped_share"]),
             num(r["weight_on_flipped"]), num(r["auroc_flipped"]), f"{r['seconds']:.0f}"] for r in rows]
    return markdown_table(["seed", "weighting", "initial images acc %", "test acc % (± over eval nets)",
                           "gain over initial images (pp)", "flipped share of initial images",
                           "weight on flipped", "AUROC flipped", "seconds"], body)


def run_demo(out: str = "runs/demo", method: str = "dc", seeds: Sequence[int] = (0, 1), noise: float = 0.3,
             prefer: str = "auto", data_root: Optional[str] = None, preset: str = "demo", jobs: int = 2,
             progress: bool = True) -> Dict[str, Any]:
    """Run (or finish) the paired demo; returns {"dataset", "rows", "table", "note", "paired"}; writes
    demo.json, demo_table.md and demo_accuracy.png into ``out``."""
    dataset, missing = pick_dataset(prefer, data_root)
    spec = demo_spec(dataset, method, seeds, noise, preset, data_root)
    cells = expand_cells(spec)
    res = run_cells(cells, out, json.dumps(spec, sort_keys=True), jobs=jobs, threads=1, progress=progress)
    if res["failed"]:
        raise RuntimeError(f"demo runs failed: {[f['error'] for f in res['failed']]}")
    rows = sorted((_row(r) for r in res["rows"]), key=lambda r: (r["seed"], r["weighting"] != "none"))
    base = {r["seed"]: r["accuracy"] for r in rows if r["weighting"] == "none"}
    iwd = {r["seed"]: r["accuracy"] for r in rows if r["weighting"] != "none"}
    common = sorted(set(base) & set(iwd))
    diff = paired([iwd[s] for s in common], [base[s] for s in common])
    per_seed = ", ".join(f"seed {s}: {100 * (iwd[s] - base[s]):+.1f}" for s in common)
    verdict = (f"IWD minus unweighted, paired by seed: {100 * diff['mean']:+.1f} points ({per_seed})"
               + ("" if diff["mean"] >= 0 else "; on this data and budget IWD is behind: this is the measured result")
               + _initial_images_note(rows))
    note = (f"dataset: {dataset} ({SUBSETS[dataset][0] or 'all'} train / {SUBSETS[dataset][1] or 'all'} test images), "
            f"{noise:.0%} symmetric label noise, IPC 10, method {method}, seeds {list(seeds)}; budget: "
            f"{describe_preset(preset)}" + (f"\n{missing}" if missing else ""))
    table = format_table(rows)
    folder = Path(out)
    (folder / "demo.json").write_text(json.dumps(rows, indent=2))
    (folder / "demo_table.md").write_text(f"{note}\n\n{table}\n\n{verdict}\n")
    _plot(folder, rows)
    return {"dataset": dataset, "rows": rows, "table": table, "note": note, "paired": diff, "verdict": verdict}


# Below this mean gain over their own initial images (points), the IWD runs' distillation is said to add little.
SMALL_GAIN_PP = 1.0


def _initial_images_note(rows: List[Dict[str, Any]]) -> str:
    """A sentence when the IWD runs' distilled sets barely beat their own initial images: their lead over
    unweighted then comes from the initial images they start from, and the demo says so."""
    def mean_gain(runs):
        return 100 * sum(r["accuracy"] - r["init_accuracy"] for r in runs) / len(runs)

    iwd = [r for r in rows if r["weighting"] != "none"]
    base = [r for r in rows if r["weighting"] == "none"]
    if not iwd or not base or mean_gain(iwd) >= SMALL_GAIN_PP:
        return ""
    return (f"\nIWD's distilled sets gain {mean_gain(iwd):+.1f} points over their own initial images (unweighted: "
            f"{mean_gain(base):+.1f}): at this budget IWD's result is that of the trusted initial images it starts "
            f"from, not of the distillation")


def _plot(folder: Path, rows: List[Dict[str, Any]]) -> None:
    from .plots import plot_accuracy_curves

    histories = {}
    for r in rows:
        log = folder / "cells" / r["run"] / "metrics.jsonl"
        summary = json.loads((folder / "cells" / r["run"] / "summary.json").read_text())
        points = [{"iteration": 0, "acc_mean": summary["init_accuracy"]["mean"]}]
        points += [json.loads(line) for line in log.read_text().splitlines() if '"acc_mean"' in line]
        points.append({"iteration": summary["config"]["iterations"], "acc_mean": summary["accuracy"]["mean"]})
        histories[f"seed {r['seed']}: {r['weighting']}"] = points
    plot_accuracy_curves(histories, folder / "demo_accuracy.png",
                         title="demo: paired runs, test accuracy over the distillation (0 = initial images)")

