"""Budget scans: does a preset, changed by a few overrides, distil? One run per call, its initial images
evaluated in the same run with the same evaluation networks.

    python benchmarks/bench_budget.py dc fashion-mnist --tag dc_i100 --set iterations=100
    python benchmarks/bench_budget.py dm digits --tag dm_e1000 --set iterations=1000 eval.epochs=1000
    python benchmarks/bench_budget.py --table            # the markdown table of every stored scan
    python benchmarks/bench_budget.py pdd --table        # ... of one method's scans
    python benchmarks/bench_budget.py pdd fashion-mnist --base idc --tag pdd_idc   # PDD on its base method

Each call appends one JSON line to benchmarks/results/budget_scans.jsonl: the preset, the overrides, the
accuracy of the initial images and of the distilled set (mean over the evaluation networks), the gain,
the phase timings and the environment (git sha, load). A scan is one seed: it picks a budget; the paired,
multi-seed claims come from ``iwd-fast bench``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, apply_overrides, environment, markdown_table, read_jsonl, results_path  # noqa: E402

from iwd_fast.app.distill_job import run_distillation  # noqa: E402
from iwd_fast.app.presets import preset_config  # noqa: E402
from iwd_fast.distill.config import DistillConfig  # noqa: E402

RESULTS = "budget_scans"


def scan(args) -> Dict[str, Any]:
    cfg = preset_config(args.preset, args.method, args.dataset, args.ipc, base=args.base).to_dict()
    cfg.update(seed=args.seed)
    apply_overrides(cfg, args.set)
    config = DistillConfig.from_dict(cfg)
    env = environment(torch.device("cpu"))  # before the run: the commit that runs it, not one made meanwhile
    started = time.perf_counter()
    s = run_distillation(config, out_dir=str(Path(args.out) / args.tag), progress=False)
    row = {"tag": args.tag, "preset": args.preset, "method": args.method, "dataset": args.dataset, "ipc": args.ipc,
           "seed": args.seed, "overrides": args.set, "init_accuracy": s["init_accuracy"]["mean"],
           "accuracy": s["accuracy"]["mean"], "accs": s["accuracy"]["accs"], "gain_over_init": s["gain_over_init"],
           "num_nets": config.eval.num_nets, "wall_seconds": time.perf_counter() - started,
           "timing_seconds": s["timing_seconds"], "load_avg_1min": os.getloadavg()[0]}
    if s["accuracy"].get("stages"):  # PDD: the cumulative accuracy after each stage
        row["stage_accuracy"] = [st["mean"] for st in s["accuracy"]["stages"]]
        row["init_stage_accuracy"] = [st["mean"] for st in s["init_accuracy"]["stages"]]
    if "accuracy_learned_lr" in s:  # MTT/DATM with tm.eval_learned_lr: the reference's evaluation
        row["accuracy_learned_lr"] = s["accuracy_learned_lr"]["mean"]
        row["learned_syn_lr"] = s["method"]["learned_syn_lr"]
    return {**row, "config": config.to_dict(), "env": env}


def table(rows: List[Dict[str, Any]]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"
    body = [[r["method"] + (f" ({r['config']['pdd']['base']})" if r["method"] == "pdd" else ""), r["dataset"], r["tag"], r["seed"], ", ".join(r["overrides"]) or "-", r["num_nets"],
             pct(r["init_accuracy"]), pct(r["accuracy"]), f"{100 * r['gain_over_init']:+.1f}",
             pct(r.get("accuracy_learned_lr")), f"{r['wall_seconds']:.0f}", r["env"]["git_sha"][:7]] for r in rows]
    return markdown_table(["method", "dataset", "scan", "seed", "overrides of the preset", "eval nets", "initial images %",
                           "distilled %", "gain (pp)", "with learned lr %", "seconds", "git"], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", nargs="?")
    p.add_argument("dataset", nargs="?", default="fashion-mnist")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--base", default=None, help="pdd: the base method (mtt or idc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", help="name of the scan (and of its run folder)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotted keys, JSON values)")
    p.add_argument("--out", default="runs/budget_scans", help="run folders (a finished scan is not rerun)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the table of the stored scans and exit")
    args = p.parse_args()
    path = results_path(RESULTS)
    if args.table:  # every stored scan, or those of one method
        print(table([r for r in read_jsonl(path) if args.method in (None, r["method"])]))
        return
    if not args.method or not args.tag:
        p.error("a method and --tag are required (or --table)")
    torch.set_num_threads(args.threads)
    row = scan(args)
    append_jsonl(path, [row])
    print(table([row]))


if __name__ == "__main__":
    main()
