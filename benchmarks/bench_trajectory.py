"""Trajectory matching (MTT, DATM) and IDC on CPU budgets: distilled accuracy beside the accuracy of the
run's own initial images, with and without IWD.

For every method x seed x weighting, two runs share config, seed, data, noise and evaluation networks:
``iterations=0`` (the initial synthetic set, evaluated as it is) and the full budget. Expert buffers are
shared through ``--buffer-dir`` (trained once, reused by every later run). Budgets are the presets'
(``cpu`` by default: reduced, not the field's protocol).

    python benchmarks/bench_trajectory.py --methods mtt datm idc --seeds 0 1
    python benchmarks/bench_trajectory.py --methods mtt --seeds 0 --set lr_img=1000 tm.syn_steps=20
    python benchmarks/bench_trajectory.py --quick      # smoke preset on digits (seconds)

Writes JSON lines to benchmarks/results/trajectory_<dataset>.jsonl and prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, apply_overrides, environment, markdown_table, results_path  # noqa: E402

from iwd_fast.app.distill_job import run_distillation  # noqa: E402
from iwd_fast.app.presets import preset_config  # noqa: E402
from iwd_fast.data import load_dataset  # noqa: E402
from iwd_fast.distill.config import DistillConfig  # noqa: E402


def config_for(args, method: str, weighting: str, seed: int) -> DistillConfig:
    cfg = preset_config(args.preset, method, args.dataset, args.ipc).to_dict()
    cfg.update(weighting=weighting, seed=seed, noise=args.noise)
    cfg["tm"]["buffer_dir"] = args.buffer_dir
    if weighting == "iwd":
        cfg["iwd"].update(influence=args.influence, init=args.init)
    apply_overrides(cfg, args.set)
    return DistillConfig.from_dict(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["mtt", "datm", "idc"])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--weightings", nargs="+", default=["none"], choices=("none", "iwd"))
    p.add_argument("--influence", default="validation", help="IWD target (trajectory matching: validation | self)")
    p.add_argument("--init", default="weighted", help="IWD real initialisation: random | weighted | proportional")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotted keys, JSON values)")
    p.add_argument("--buffer-dir", default="runs/buffers")
    p.add_argument("--out", default="runs/bench_trajectory", help="run folders (resumable)")
    p.add_argument("--no-init", action="store_true", help="skip the iterations=0 runs")
    p.add_argument("--tag", default="", help="label stored with the records")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke preset on digits")
    args = p.parse_args()
    if args.quick:
        args.preset, args.dataset, args.ipc = "smoke", "digits", 2
    torch.set_num_threads(args.threads)
    splits = load_dataset(args.dataset)
    env = environment(torch.device("cpu"))
    rows: List[list] = []
    records = []
    for method in args.methods:
        for weighting in args.weightings:
            for seed in args.seeds:
                cfg = config_for(args, method, weighting, seed)
                result: Dict[str, Any] = {"method": method, "weighting": weighting, "seed": seed, "tag": args.tag,
                                          "config": cfg.to_dict()}
                for label, iters in (("init", 0), ("distilled", cfg.iterations)):
                    if label == "init" and args.no_init:
                        continue
                    run_cfg = cfg.replace(iterations=iters)
                    folder = Path(args.out) / f"{method}_{weighting}_s{seed}_{label}{'_' + args.tag if args.tag else ''}"
                    started = time.perf_counter()
                    s = run_distillation(run_cfg, splits, out_dir=str(folder), progress=True)
                    result[label] = {"acc_mean": s["accuracy"]["mean"], "acc_std": s["accuracy"]["std"],
                                     "accs": s["accuracy"]["accs"], "variant": s["accuracy"]["protocol"]["variant"],
                                     "wall_seconds": time.perf_counter() - started,
                                     "timing": s["timing_seconds"], "method": s.get("method", {}),
                                     "init": s["init"], "weight_on_flipped": s.get("weight_on_flipped"),
                                     "init_flipped_share": s["init_flipped_share"]}
                    for extra in ("accuracy_learned_lr",):
                        if extra in s:
                            result[label][extra] = s[extra]["mean"]
                    print(f"{method} {weighting} seed {seed} {label}: {100 * s['accuracy']['mean']:.2f} "
                          f"± {100 * s['accuracy']['std']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
                records.append({**result, "env": env})
                init = result.get("init", {}).get("acc_mean")
                dist = result["distilled"]
                rows.append([method, weighting, seed, "-" if init is None else f"{100 * init:.2f}",
                             f"{100 * dist['acc_mean']:.2f} ± {100 * dist['acc_std']:.2f}",
                             "-" if init is None else f"{100 * (dist['acc_mean'] - init):+.2f}",
                             f"{dist['wall_seconds']:.0f}"])
    append_jsonl(results_path(f"trajectory_{args.dataset}"), records)
    print(markdown_table(["method", "weighting", "seed", "init acc %", "distilled acc %", "gain (pp)",
                          "seconds (distilled run)"], rows))
    if len(args.seeds) > 1:
        for method in args.methods:
            for weighting in args.weightings:
                sel = [r for r in records if r["method"] == method and r["weighting"] == weighting]
                gains = [r["distilled"]["acc_mean"] - r["init"]["acc_mean"] for r in sel if "init" in r]
                if gains:
                    print(f"{method} {weighting}: mean gain {100 * np.mean(gains):+.2f} pp over {len(gains)} seeds")


if __name__ == "__main__":
    main()
