"""How well each influence score flags mislabelled instances along the field's inner loop.

A network of the distillation loop is trained on the synthetic set between matching steps (50 inner
epochs per outer step at IPC 10 in the field's loops). This benchmark trains one such network on a
synthetic set of real images drawn from the noisy classes (IPC 10, as at initialisation) and, after
0 / 10 / 50 / 150 / 450 epochs, scores a sample of the real pool with every candidate target, then
reports the AUROC of the scores for flagging flipped labels (1.0: every flipped instance looks worse
than every clean one; 0.5: chance; below 0.5: the score prefers the mislabelled):

  validation        lr <g_i, grad L_V>, L_V = the mean loss of a held-out split with the same noisy labels
  validation-trusted  the same with a trusted held-out split (clean labels: a user who has one)
  validation-agree  L_V over the held-out instances whose label the network predicts (misfit ones dropped)
  validation-trim   L_V over the 70% of held-out instances with the lowest loss
  validation-tracin the running sum over checkpoints of the validation score (TracIn)
  self              ||g_i||^2 at the loop network (small = trusted)
  self-warmup       ||g_i||^2 at a network warmed up for --warmup-steps SGD steps on the noisy pool
                    (constant along the loop: the static weights' score)

    python benchmarks/bench_targets_along_loop.py --seeds 0 1 --threads 1
    python benchmarks/bench_targets_along_loop.py --quick      # digits, tiny, seconds

Writes JSON lines to benchmarks/results/targets_along_loop.jsonl and prints a table (mean over seeds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_jsonl, environment, markdown_table, results_path  # noqa: E402

from iwd_fast.data import add_label_noise, load_dataset, stratified_split, stratified_subset  # noqa: E402
from iwd_fast.evaluate import EvalSpec, build_eval_network, train_network  # noqa: E402
from iwd_fast.networks import NetSpec  # noqa: E402
from iwd_fast.runtime import mix_seed  # noqa: E402
from iwd_fast.weighting import auroc, select_initial  # noqa: E402
from iwd_fast.weighting.targets import instance_scores, validation_directions  # noqa: E402

TARGETS = ("validation", "validation-trusted", "validation-agree", "validation-trim", "validation-tracin",
           "self", "self-warmup")
LR_NET = 0.01


def held_out_direction(net, x, y, variant: str) -> Dict[str, torch.Tensor]:
    """The direction of one validation variant at ``net`` (x, y: the held-out split's images and labels)."""
    if variant in ("validation-agree", "validation-trim"):
        with torch.no_grad():
            logits = net(x)
        if variant == "validation-agree":
            keep = logits.argmax(1) == y
        else:
            loss = F.cross_entropy(logits, y, reduction="none")
            keep = loss <= torch.quantile(loss, 0.7)
        if int(keep.sum()) == 0:
            keep = torch.ones_like(y, dtype=torch.bool)
        x, y = x[keep], y[keep]
    return validation_directions(net, x, y, scale=LR_NET)


def run_seed(args, seed: int) -> List[dict]:
    splits = load_dataset(args.dataset)
    train = stratified_subset(splits.train, args.train_size, seed=seed) if args.train_size else splits.train
    noisy, flipped = add_label_noise(train.labels, args.noise, "symmetric", train.num_classes, seed=mix_seed(seed, 1))
    keep, held = stratified_split(noisy, 0.1, seed=mix_seed(seed, 2))
    pool_x, pool_y, pool_flip = train.images[keep], noisy[keep], flipped[keep]
    held_x, held_y, held_clean = train.images[held], noisy[held], train.labels[held]
    gen = torch.Generator().manual_seed(mix_seed(seed, 3))
    sample = torch.randperm(len(keep), generator=gen)[:args.scored]
    xs, ys, fs = pool_x[sample], pool_y[sample], pool_flip[sample]
    spec = NetSpec(width=args.width, depth=args.depth)
    shape = (train.channels, train.num_classes, train.im_size)

    warm = build_eval_network(spec, *shape, seed=mix_seed(seed, 4))
    train_network(warm, pool_x, pool_y, EvalSpec(num_nets=1, lr=LR_NET, dsa=False), mix_seed(seed, 5), None,
                  steps=args.warmup_steps)
    warm.eval()
    warm_auc = auroc(instance_scores(warm, xs, ys, "self"), fs)

    init = select_initial(pool_y, None, train.num_classes, args.ipc, "random", seed=mix_seed(seed, 6))
    syn_x, syn_y = pool_x[init], pool_y[init]
    net = build_eval_network(spec, *shape, seed=mix_seed(seed, 7))
    rows, done, tracin = [], 0, None
    for epochs in args.epochs:
        if epochs > done:
            train_network(net, syn_x, syn_y, EvalSpec(num_nets=1, lr=LR_NET, momentum=0.0, weight_decay=0.0,
                                                      batch_size=256, dsa=False), mix_seed(seed, 8, epochs),
                          None, epochs=epochs - done)
            done = epochs
        net.train()  # the loop scores in train mode (instance norm: the same as eval)
        aucs = {"self-warmup": warm_auc}
        for variant in ("validation", "validation-agree", "validation-trim"):
            s = instance_scores(net, xs, ys, "validation", held_out_direction(net, held_x, held_y, variant))
            aucs[variant] = auroc(-s, fs)  # a high benefit means clean: -benefit flags
            if variant == "validation":
                tracin = s if tracin is None else tracin + s
        trusted = instance_scores(net, xs, ys, "validation", held_out_direction(net, held_x, held_clean, "validation"))
        aucs["validation-trusted"] = auroc(-trusted, fs)
        aucs["validation-tracin"] = auroc(-tracin, fs)
        aucs["self"] = auroc(instance_scores(net, xs, ys, "self"), fs)
        print(f"seed {seed} epochs {epochs:4d}: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()), flush=True)
        rows += [{"seed": seed, "epochs": epochs, "target": t, "auroc_flipped": aucs[t]} for t in TARGETS]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--train-size", type=int, default=10000, help="stratified training subset (0: all)")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--scored", type=int, default=3000, help="pool instances scored at every checkpoint")
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 10, 50, 150, 450])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="digits, width 8, depth 2, 300 scored, epochs 0 10")
    ap.add_argument("--out", default=str(results_path("targets_along_loop")))
    args = ap.parse_args(argv)
    if args.quick:
        args.dataset, args.train_size, args.width, args.depth, args.scored = "digits", 0, 8, 2, 300
        args.epochs, args.warmup_steps = [0, 10], 10
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = [r for seed in args.seeds for r in run_seed(args, seed)]
    meta = {"bench": "targets_along_loop", **env, "dataset": args.dataset, "train_size": args.train_size,
            "noise": args.noise, "ipc": args.ipc, "width": args.width, "depth": args.depth, "scored": args.scored,
            "warmup_steps": args.warmup_steps, "quick": args.quick}
    append_jsonl(args.out, [{**meta, **r} for r in rows])
    table = []
    for t in TARGETS:
        cells = []
        for e in args.epochs:
            vals = [r["auroc_flipped"] for r in rows if r["target"] == t and r["epochs"] == e]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        table.append([t] + cells)
    print(f"\nAUROC for flagging flipped labels ({args.dataset}, {args.noise:.0%} symmetric noise, seeds {args.seeds}, "
          f"ConvNet-{args.depth} width {args.width}; network trained on IPC-{args.ipc} noisy real images for E epochs)\n")
    print(markdown_table(["target"] + [f"E = {e}" for e in args.epochs], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
