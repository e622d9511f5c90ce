"""What in-loop scoring at refresh 1 costs, against its floor, per method.

Issue target: scoring every matching step (``iwd.refresh = 1``) should cost at most 1.3x its floor, the
work no scoring scheme can avoid: per scored step, one forward of the scored real batches (the
per-sample dots need their activations) plus one forward+backward of the held-out batch (the validation
direction). Measured in one process, side by side:

- the loop (distilling + scoring phases, evaluation off) of an unweighted run and of an in-loop run at
  refresh 1 (validation target, random init, same seed: same networks, real batches and augmentations),
  in alternating order over ``--rounds`` rounds; overhead per scored step = (loop_iwd - loop_unweighted)
  / scored steps;
- the floor on the same network architecture and batch sizes: a no-grad forward of num_classes real
  batches of ``batch_real`` images plus a forward+backward of ``iwd.heldout_batch`` held-out images
  (``--floor-repeats`` interleaved repeats).

The ratio overhead / floor is the result (min and median over rounds, each round's overhead against the
median floor), with the loop overhead as a share of the unweighted loop beside it. A CPU budget (the
``cpu`` preset's networks and batches, few iterations), not the field's protocol.

    python benchmarks/bench_scoring_cost.py --threads 1                      # dc dsa idc dm, Fashion-MNIST
    python benchmarks/bench_scoring_cost.py --methods dm:prototype --noise 0.4   # DM's own target (METHOD.target)
    python benchmarks/bench_scoring_cost.py --methods dc --rounds 5
    python benchmarks/bench_scoring_cost.py --quick                          # seconds: digits, smoke preset
    python benchmarks/bench_scoring_cost.py --table                          # the table of the stored rows

Rows: benchmarks/results/scoring_cost.jsonl (``--out``); a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, environment, markdown_table, read_jsonl, results_path, time_interleaved  # noqa: E402

from iwd_fast.app.distill_job import LOOP_PHASES, load_splits, run_distillation  # noqa: E402
from iwd_fast.app.presets import preset_config  # noqa: E402
from iwd_fast.distill.base import PLAIN_REAL_SIDE, SCORED_REAL_SIDE  # noqa: E402
from iwd_fast.evaluate import build_eval_network  # noqa: E402

DEFAULT_ITERATIONS = {"dc": 4, "dsa": 4, "idc": 2, "dm": 20}


def scored_steps(cfg) -> int:
    """Matching steps a refresh-1 run scores: every outer step (DC/DSA), every inner step (IDC), every
    iteration (DM)."""
    per_iteration = {"dc": cfg.outer_loop, "dsa": cfg.outer_loop, "idc": cfg.idc.inner_loop, "dm": 1}
    return cfg.iterations * per_iteration[cfg.method]


def run_pair(cfg, splits, classes: int, rounds: int, influence: str = "validation") -> Dict[str, list]:
    """The phase seconds of the unweighted and the refresh-1 run (evaluation off), ``rounds`` times each
    after a warm-up round, alternating order; "auroc" holds the refresh-1 runs' AUROC for the flipped labels
    (None without noise)."""
    variants = {"unweighted": cfg.replace(weighting="none"),
                "refresh 1": cfg.replace(weighting="iwd", iwd=dataclasses.replace(cfg.iwd, refresh=1, init="random",
                                                                                       influence=influence))}
    out: Dict[str, list] = {k: [] for k in variants}
    out["auroc"] = []
    order = list(variants.items())
    for r in range(rounds + 1):  # round 0 warms up (first calls, allocator) and is not kept
        for name, c in (order if r % 2 == 0 else order[::-1]):
            s = run_distillation(c, splits=splits, progress=False, evaluate=False)
            if name == "refresh 1":
                _check_scored_steps(c, s, classes)
            if r:
                out[name].append(dict(s["timing_seconds"]))
                if name == "refresh 1":
                    out["auroc"].append(s.get("auroc_flipped"))
    return out


def loop_seconds(timing: Dict[str, float]) -> float:
    return sum(timing.get(k, 0.0) for k in LOOP_PHASES)


def breakdown_ms(unweighted: Dict[str, float], scored: Dict[str, float], steps: int) -> Dict[str, float]:
    """Where one scored step's overhead goes (ms): the captured real side beyond the plain one (one backward
    of the per-sample losses giving the weighted gradient and the streamed dots), the "scoring" phase (the
    held-out direction, folding the scores in), and the rest of the loop."""
    captured = scored.get(SCORED_REAL_SIDE, 0.0) - unweighted.get(PLAIN_REAL_SIDE, 0.0)
    scoring = scored.get("scoring", 0.0)
    rest = loop_seconds(scored) - loop_seconds(unweighted) - captured - scoring
    return {"captured_real_side_ms": 1e3 * captured / steps, "scoring_phase_ms": 1e3 * scoring / steps,
            "rest_ms": 1e3 * rest / steps}


def _check_scored_steps(cfg, summary, classes: int) -> None:
    """The validation target computes one held-out direction per scored step and scores num_classes real
    batches: the "scoring" phase is entered (num_classes + 1) times per step; DM's prototype target scores
    every class's batch at once: once per step. Refuse a count that disagrees."""
    calls = summary["timing_calls"].get("scoring", 0)
    per_step = 1 if cfg.iwd.influence == "prototype" else classes + 1
    if calls != scored_steps(cfg) * per_step:
        raise RuntimeError(f"{cfg.method}: {calls} scoring calls, expected {scored_steps(cfg)} steps x "
                           f"{per_step}: the scored-step count of this benchmark is out of date")


def floor_ms(cfg, splits, classes: int, repeats: int) -> Dict[str, float]:
    """Median and min ms of the floor of one scored step on a fresh network of ``cfg.net``."""
    images, labels = splits.train.images.float(), splits.train.labels
    net = build_eval_network(cfg.net, images.shape[1], classes, tuple(images.shape[2:]), seed=0)
    batch_real = cfg.batch_real
    per_class = [images[(labels == c).nonzero().flatten()[:batch_real]] for c in range(classes)]
    heldout = images[:cfg.iwd.heldout_batch], labels[:cfg.iwd.heldout_batch]
    params = list(net.parameters())

    def forward_real():
        with torch.no_grad():
            for x in per_class:
                net(x)

    def heldout_fwd_bwd():
        torch.autograd.grad(F.cross_entropy(net(heldout[0]), heldout[1]), params)

    t = time_interleaved({"forward real": forward_real, "held-out fwd+bwd": heldout_fwd_bwd},
                         {"forward real": repeats, "held-out fwd+bwd": repeats}, torch.device("cpu"), warmup=1)
    fwd, ho = t["forward real"]["times_ms"], t["held-out fwd+bwd"]["times_ms"]
    totals = [a + b for a, b in zip(fwd, ho)]
    return {"median_ms": statistics.median(totals), "min_ms": min(totals),
            "forward_real_ms": statistics.median(fwd), "heldout_ms": statistics.median(ho)}


def measure(entry: str, args) -> Dict[str, object]:
    """One row: ``entry`` is METHOD (validation target) or METHOD:TARGET."""
    method, _, influence = entry.partition(":")
    influence = influence or "validation"
    cfg = preset_config(args.preset, method, args.dataset, args.ipc)
    cfg = cfg.replace(iterations=args.iterations or DEFAULT_ITERATIONS[method], seed=args.seed, eval_every=0,
                      noise=args.noise)
    splits = load_splits(cfg)
    classes = int(splits.train.labels.max()) + 1
    loops = run_pair(cfg, splits, classes, args.rounds, influence)
    floor = floor_ms(cfg, splits, classes, args.floor_repeats)
    steps = scored_steps(cfg)
    pairs = list(zip(loops["unweighted"], loops["refresh 1"]))
    per_step = [1e3 * (loop_seconds(w) - loop_seconds(u)) / steps for u, w in pairs]
    ratios = [p / floor["median_ms"] for p in per_step]
    shares = [(loop_seconds(w) - loop_seconds(u)) / loop_seconds(u) for u, w in pairs]
    parts = [breakdown_ms(u, w, steps) for u, w in pairs]
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return {"method": method, "influence": influence, "noise": args.noise, "auroc_flipped": loops["auroc"],
            "dataset": args.dataset, "preset": args.preset, "ipc": args.ipc,
            "iterations": cfg.iterations, "scored_steps": steps, "batch_real": cfg.batch_real,
            "heldout_batch": cfg.iwd.heldout_batch, "net": dataclasses.asdict(cfg.net),
            "phase_seconds": loops, "overhead_ms_per_step": per_step, "floor": floor,
            "overhead_breakdown_ms_per_step": breakdown,
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "share_min": min(shares), "share_median": statistics.median(shares), "rounds": args.rounds,
            "threads": args.threads}


def table(rows: List[Dict[str, object]]) -> str:
    body = [[r["method"], r.get("influence", "validation"), r["dataset"], r["scored_steps"], f"{statistics.median(r['overhead_ms_per_step']):.1f}",
             f"{r['floor']['median_ms']:.1f} ({r['floor']['forward_real_ms']:.1f} + {r['floor']['heldout_ms']:.1f})",
             "{captured_real_side_ms:.1f} / {scoring_phase_ms:.1f} / {rest_ms:.1f}".format(**r["overhead_breakdown_ms_per_step"]),
             f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f}", f"{100 * r['share_min']:.0f} / {100 * r['share_median']:.0f}",
             _auroc(r), r["rounds"]] for r in rows]
    return markdown_table(["method", "target", "dataset", "scored steps", "overhead ms / step (median)",
                           "floor ms (real forward + held-out fwd+bwd)",
                           "overhead ms: captured real side / scoring phase / rest", "overhead / floor (min / median)",
                           "overhead % of unweighted loop (min / median)", "AUROC flipped (noise)", "rounds"], body)


def _auroc(row) -> str:
    values = [a for a in row.get("auroc_flipped") or [] if a is not None]
    return f"{statistics.median(values):.2f} ({row['noise']:.0%})" if values else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["dc", "dsa", "idc", "dm", "dm:prototype"],
                   help="METHOD (validation target) or METHOD:TARGET")
    p.add_argument("--noise", type=float, default=0.0, help="label noise (symmetric) of the runs; > 0 reports AUROC")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="per run (default: per method, a few)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--floor-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="digits, smoke preset, 1 round (a smoke run)")
    p.add_argument("--out", default=None, help="JSONL to append to (default benchmarks/results/scoring_cost.jsonl)")
    p.add_argument("--table", action="store_true", help="print the table of the stored rows (--out) and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(read_jsonl(args.out or results_path("scoring_cost"))))
        return 0
    if args.quick:
        args.dataset, args.preset, args.rounds, args.floor_repeats = "digits", "smoke", 1, 2
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = [{**measure(m, args), "env": env} for m in args.methods]
    append_jsonl(args.out or results_path("scoring_cost"), rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
