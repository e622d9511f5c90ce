"""How well each warm-up score finds flipped labels, and how well the noise rate is estimated, on a run's pool.

    python benchmarks/bench_detectors.py --seeds 0 1 --threads 2
    python benchmarks/bench_detectors.py --table

For each noise setting and seed the pool of the ``cpu`` preset (DC, Fashion-MNIST, 10,000-image subset, the
held-out split removed) is built exactly as a run builds it, then scored by:

- ``self@50``: self-influence ||g_i||^2 at the classic warm-up network (50 SGD steps on the whole pool);
- ``crossfit@S``: the out-of-sample margin of 2-fold cross-fitted networks trained S steps each, with the
  confident-learning noise-rate estimate and its suspects (``iwd_fast.weighting.trust``).

Each row: AUROC for flagging the flipped labels; for crossfit also the estimated noise rate against the
true one, and the precision / recall of the suspects. Rows go to benchmarks/results/detectors.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, environment, markdown_table, read_jsonl, results_path  # noqa: E402

from iwd_fast.app.distill_job import load_splits  # noqa: E402
from iwd_fast.app.presets import preset_config  # noqa: E402
from iwd_fast.distill.pool import prepare_pool  # noqa: E402
from iwd_fast.distill.warmup import crossfit_estimate, warmup_weights  # noqa: E402
from iwd_fast.runtime import PhaseTimer  # noqa: E402
from iwd_fast.weighting import auroc  # noqa: E402

RESULTS = "detectors"
NOISE = [(0.0, "symmetric"), (0.2, "symmetric"), (0.4, "symmetric"), (0.2, "pairflip"), (0.4, "pairflip")]


def _auc(scores: torch.Tensor, flipped: torch.Tensor):
    return auroc(scores, flipped) if bool(flipped.any()) and not bool(flipped.all()) else None


def measure(seed: int, rate: float, kind: str, steps: List[int], env: Dict[str, Any]) -> List[Dict[str, Any]]:
    base = preset_config("cpu", "dc", "fashion-mnist", 10)
    rows = []
    for s in steps:
        cfg = base.replace(seed=seed, noise=rate, noise_kind=kind)
        cfg.iwd.crossfit_steps = s
        pool = prepare_pool(cfg, load_splits(cfg), torch.device("cpu"))
        flipped = pool.flipped.cpu()
        started = time.perf_counter()
        _, est = crossfit_estimate(cfg, pool, torch.device("cpu"))
        sec = time.perf_counter() - started
        hits = int((est.suspect & flipped).sum())
        rows.append({"detector": f"crossfit@{s}", "seed": seed, "noise": rate, "noise_kind": kind,
                     "true_rate": float(flipped.double().mean()), "estimated_rate": est.noise_rate,
                     "class_rates": est.rates.tolist(), "auroc": _auc(est.margin, flipped),
                     "precision": hits / max(int(est.suspect.sum()), 1),
                     "recall": hits / int(flipped.sum()) if bool(flipped.any()) else None,
                     "seconds": sec, "env": env})
    cfg = base.replace(seed=seed, noise=rate, noise_kind=kind)
    pool = prepare_pool(cfg, load_splits(cfg), torch.device("cpu"))
    started = time.perf_counter()
    warm = warmup_weights(cfg, pool, torch.device("cpu"), PhaseTimer())
    rows.append({"detector": f"self@{cfg.iwd.warmup_steps}", "seed": seed, "noise": rate, "noise_kind": kind,
                 "true_rate": float(pool.flipped.double().mean()), "auroc": warm.auroc_flipped,
                 "seconds": time.perf_counter() - started, "env": env})
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"
    body = [[r["detector"], f"{r['noise_kind']} {r['noise']:.0%}", r["seed"], f(r["true_rate"], 3),
             f(r.get("estimated_rate"), 3), f(r["auroc"], 3), f(r.get("precision")), f(r.get("recall")),
             f"{r['seconds']:.0f}", r["env"]["git_sha"][:7]] for r in rows]
    return markdown_table(["detector", "noise", "seed", "true noise rate", "estimated rate", "AUROC flipped",
                           "suspects' precision", "recall", "seconds", "git"], body)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[300])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the table of the stored rows and exit")
    args = ap.parse_args(argv)
    path = results_path(RESULTS)
    if args.table:
        print(table(read_jsonl(path)))
        return
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = []
    for seed in args.seeds:
        for rate, kind in NOISE:
            new = measure(seed, rate, kind, args.steps, env)
            append_jsonl(path, new)
            rows += new
            print(table(new), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
