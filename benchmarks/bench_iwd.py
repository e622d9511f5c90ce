"""IWD end to end: which influence target helps on label-noised data, and what scoring costs.

Paired runs (same seeds, same noise, same held-out split) of one distiller with every influence target
and without weighting, on a reduced CPU budget (labelled so; not the field's protocol). Reports test
accuracy (mean +- std over seeds, each seed's accuracy itself a mean over evaluation networks), weight
mass on flipped labels vs the noise rate, AUROC of the in-loop weights for flagging flipped labels,
the flipped share of the initial synthetic images, and the scoring overhead:
(time of an IWD run's loop - time of the paired unweighted loop) / unweighted loop time.

    python benchmarks/bench_iwd.py --method dc --dataset fashion-mnist --seeds 0 1
    python benchmarks/bench_iwd.py --quick          # tiny round on digits (CI-sized)

Writes JSON lines to benchmarks/results/iwd_<method>.jsonl and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, environment, markdown_table, read_jsonl, results_path  # noqa: E402

from iwd_fast.distill.config import DistillConfig, EvalSpec, NetSpec  # noqa: E402
from iwd_fast.data import DatasetSplits, load_dataset, stratified_subset  # noqa: E402
from iwd_fast.app.distill_job import run_distillation  # noqa: E402
from iwd_fast.app.presets import preset_config  # noqa: E402

# name -> (weighting, IWDSpec changes)
VARIANTS: Dict[str, tuple] = {
    "uniform": ("none", {}),
    "explicit-consistent": ("iwd", {"influence": "explicit", "sign": "consistent"}),
    "explicit-informative": ("iwd", {"influence": "explicit", "sign": "informative"}),
    "implicit-consistent": ("iwd", {"influence": "implicit", "sign": "consistent"}),
    "validation": ("iwd", {"influence": "validation"}),
    "self": ("iwd", {"influence": "self"}),
    "validation+weighted-init": ("iwd", {"influence": "validation", "init": "weighted"}),
    "self+weighted-init": ("iwd", {"influence": "self", "init": "weighted"}),
    "uniform+weighted-init": ("iwd", {"influence": "validation", "init": "weighted", "temperature": float("inf")}),
}


def config_for(args, variant: str, seed: int) -> DistillConfig:
    cfg = preset_config(args.preset, args.method, args.dataset, args.ipc)
    weighting, changes = VARIANTS[variant]
    iwd = dataclasses.replace(cfg.iwd, **{"init": "random", **changes})
    cfg = cfg.replace(weighting=weighting, iwd=iwd, noise=args.noise, seed=seed)
    if args.iterations:
        cfg = cfg.replace(iterations=args.iterations)
    if args.width:
        cfg = cfg.replace(net=dataclasses.replace(cfg.net, width=args.width))
    if args.loops:
        cfg = cfg.replace(outer_loop=args.loops[0], inner_loop=args.loops[1])
    if args.batch_real:
        cfg = cfg.replace(batch_real=args.batch_real)
    if args.refresh:
        cfg = cfg.replace(iwd=dataclasses.replace(cfg.iwd, refresh=args.refresh))
    if args.quick:
        cfg = cfg.replace(net=NetSpec(width=8), batch_real=16, eval=EvalSpec(num_nets=1, epochs=5))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="dc", choices=("dc", "dsa", "dm"))
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iterations", type=int, default=0, help="override the preset's iterations")
    p.add_argument("--width", type=int, default=0, help="override the network width")
    p.add_argument("--loops", type=int, nargs=2, default=None, metavar=("OUTER", "INNER"), help="override loops")
    p.add_argument("--batch-real", type=int, default=0, help="override real images per class per step")
    p.add_argument("--refresh", type=int, default=0, help="override iwd.refresh (rescore every N outer steps)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--train-per-class", type=int, default=0,
                   help="class-stratified subset of the training set (0: all); the test set keeps 2000 images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--summarize", default=None, help="only print the table of an existing JSON-lines file")
    p.add_argument("--quick", action="store_true", help="tiny round on digits (proves the script works)")
    p.add_argument("--out", default=None, help="JSON lines file (default benchmarks/results/iwd_<method>.jsonl)")
    args = p.parse_args()
    if args.summarize:
        records = read_jsonl(args.summarize)
        args.method, args.dataset, args.noise = records[0]["method"], records[0]["dataset"], records[0]["noise"]
        args.ipc, args.seeds = records[0]["ipc"], sorted({r["seed"] for r in records})
        args.variants = list(dict.fromkeys(r["variant"] for r in records))
        print(summarize(records, args))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.dataset, args.preset, args.seeds, args.iterations = "digits", "smoke", [0], 2
        args.variants = ["uniform", "explicit-consistent", "validation"]
    splits = load_dataset(args.dataset)
    if args.train_per_class:
        splits = DatasetSplits(train=stratified_subset(splits.train, args.train_per_class * splits.train.num_classes),
                               test=stratified_subset(splits.test, 2000))
    env = environment(torch.device("cpu"))
    out = Path(args.out) if args.out else results_path(f"iwd_{args.method}" + ("_quick" if args.quick else ""))
    records: List[dict] = []
    for seed in args.seeds:
        for variant in args.variants:
            cfg = config_for(args, variant, seed)
            started = time.perf_counter()
            s = run_distillation(cfg, splits, progress=False)
            t = s["timing_seconds"]
            label = variant if cfg.weighting == "none" or cfg.iwd.refresh == 1 else f"{variant}/refresh{cfg.iwd.refresh}"
            rec = {"bench": "iwd", "variant": label, "seed": seed, "method": args.method, "dataset": args.dataset,
                   "n_train": len(splits.train), "n_test": len(splits.test),
                   "ipc": args.ipc, "noise": args.noise, "preset": cfg.preset,
                   "budget": f"{cfg.iterations} it x {cfg.outer_loop}/{cfg.inner_loop} loops, batch_real "
                             f"{cfg.batch_real}, width {cfg.net.width}; eval {s['accuracy']['protocol']['variant']}",
                   "acc": s["accuracy"]["mean"], "acc_eval_std": s["accuracy"]["std"],
                   "init_flipped_share": s["init_flipped_share"], "init_auroc_flipped": s.get("init_auroc_flipped"),
                   "weight_on_flipped": s.get("weight_on_flipped"), "auroc_flipped": s.get("auroc_flipped"),
                   "flipped_share": s.get("flipped_share"), "loop_seconds": t.get("distilling", 0) + t.get("scoring", 0),
                   "scoring_seconds": t.get("scoring", 0.0),
                   "init_seconds": t.get("init", 0.0) + t.get("init scoring", 0.0), "refresh": cfg.iwd.refresh,
                   "wall_seconds": time.perf_counter() - started, **env}
            records.append(rec)
            append_jsonl(out, [rec])
            print(f"seed {seed} {label:26s} acc {100 * rec['acc']:.1f}  w_flip {rec['weight_on_flipped']}  "
                  f"auroc {rec['auroc_flipped']}  init_flip {rec['init_flipped_share']:.2f}  "
                  f"{rec['wall_seconds']:.0f}s", flush=True)
    print()
    args.variants = list(dict.fromkeys(r["variant"] for r in records))
    print(summarize(records, args))


def _fmt(values, pct=False, digits=3):
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    arr = np.asarray(vals, dtype=np.float64) * (100 if pct else 1)
    return f"{arr.mean():.{1 if pct else digits}f} ± {arr.std(ddof=0):.{1 if pct else digits}f}"


def summarize(records: List[dict], args) -> str:
    budgets = sorted({r["budget"] for r in records})
    base_loop = {r["seed"]: r["loop_seconds"] for r in records if r["variant"] == "uniform"}
    base_acc = {r["seed"]: r["acc"] for r in records if r["variant"] == "uniform"}
    rows = []
    for variant in args.variants:
        rs = [r for r in records if r["variant"] == variant]
        gains = [r["acc"] - base_acc[r["seed"]] for r in rs if r["seed"] in base_acc]
        overhead = [(r["loop_seconds"] - base_loop[r["seed"]]) / base_loop[r["seed"]] for r in rs
                    if r["seed"] in base_loop and base_loop[r["seed"]] > 0]
        rows.append([variant, _fmt([r["acc"] for r in rs], pct=True), _fmt(gains, pct=True),
                     _fmt([r["weight_on_flipped"] for r in rs]), _fmt([r["auroc_flipped"] for r in rs]),
                     _fmt([r["init_flipped_share"] for r in rs], digits=2),
                     _fmt([r["scoring_seconds"] / r["loop_seconds"] for r in rs if r["loop_seconds"]], pct=True),
                     _fmt(overhead, pct=True)])
    head = (f"{args.method.upper()} on {args.dataset}, IPC {args.ipc}, {args.noise:.0%} symmetric noise, seeds "
            f"{args.seeds}; budget: {'; '.join(budgets)} (reduced CPU budget, not the field's protocol)\n"
            "mean ± std over seeds; gain = paired difference to uniform with the same seed\n")
    return head + markdown_table(["variant", "test acc %", "gain vs uniform (pp)", "weight on flipped",
                                  "AUROC flipped (loop)", "flipped share of init", "scoring % of loop",
                                  "loop overhead vs uniform %"], rows)


if __name__ == "__main__":
    main()
