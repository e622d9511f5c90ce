"""Compiled CPU ops (iwd_fast._C) against the eager reference formulas, side by side.

For each layer shape both paths run interleaved in the same process (eager, C++, C++, eager, ...)
and the table reports the best time of each path and their ratio eager / C++ (> 1: the C++ op is
faster), plus the ratio of medians. On a shared 2-core machine a run is either uncontended or loses a
core to another process (times then double); the best of N interleaved runs is the uncontended time,
the median shows how much the load moved it. Ratios of paths timed side by side are the result;
absolute times are not.

Shapes: ConvNet-3 (width 128, 32x32 input) at B=256 and the ResNet-18 CIFAR layers at B=64, K=1
direction unless stated, plus a K=4 conv, the linear heads, a GroupNorm affine and the head's norms.

    python benchmarks/bench_ext_cpu.py                 # full run (1-3 minutes on 2 cores, depending on load)
    python benchmarks/bench_ext_cpu.py --quick         # tiny shapes, proves the script works

Writes one JSON line per shape to benchmarks/results/ext_cpu.jsonl (git sha, versions, device).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import harness  # benchmarks/harness.py, next to this script
from iwd_fast.scoring.backends import compiled_ext as _ext, compiled_ops as _ops
from iwd_fast.scoring import reference as ref

CPU = torch.device("cpu")
RESULTS = harness.results_path("ext_cpu")


def conv_case(name, b, cin, cout, hw, k=3, stride=1, k_dirs=1):
    pad = k // 2
    ho = (hw + 2 * pad - k) // stride + 1
    shapes = dict(x=(b, cin, hw, hw), v=(k_dirs, cout, cin, k, k), delta=(b, cout, ho, ho))
    extra = ([stride] * 2, [pad] * 2, [1, 1], 1)
    return name, "conv_dot", shapes, extra


def linear_case(name, b, t, d, p, k_dirs=1):
    return name, "linear_dot", dict(a=(b, t, d), v=(k_dirs, p, d), delta=(b, t, p)), ()


def cases(quick: bool):
    if quick:
        return [conv_case("tiny conv 8->8 8x8", 4, 8, 8, 8), linear_case("tiny linear", 4, 3, 16, 5),
                ("tiny affine", "affine_dot", dict(delta=(4, 8, 16), v_bias=(1, 8), xhat=(4, 8, 16), v_weight=(1, 8)),
                 ()),
                ("tiny norm", "linear_grad_norm_sq", dict(a=(4, 3, 16), delta=(4, 3, 5)), ("ghost",))]
    return [
        conv_case("ConvNet-3 conv1 3->128 32x32", 256, 3, 128, 32),
        conv_case("ConvNet-3 128->128 32x32", 256, 128, 128, 32),
        conv_case("ConvNet-3 conv2 128->128 16x16", 256, 128, 128, 16),
        conv_case("ConvNet-3 conv3 128->128 8x8", 256, 128, 128, 8),
        conv_case("ConvNet-3 conv3 128->128 8x8, K=4", 256, 128, 128, 8, k_dirs=4),
        linear_case("ConvNet-3 head 2048->10", 256, 1, 2048, 10),
        ("ConvNet-3 GroupNorm(128) 32x32 affine", "affine_dot",
         dict(delta=(256, 128, 1024), v_bias=(1, 128), xhat=(256, 128, 1024), v_weight=(1, 128)), ()),
        conv_case("ResNet-18 conv1 3->64 32x32", 64, 3, 64, 32),
        conv_case("ResNet-18 layer1 64->64 32x32", 64, 64, 64, 32),
        conv_case("ResNet-18 layer2 64->128 s2 32->16", 64, 64, 128, 32, stride=2),
        conv_case("ResNet-18 layer2 128->128 16x16", 64, 128, 128, 16),
        conv_case("ResNet-18 layer2 shortcut 1x1 64->128 s2", 64, 64, 128, 32, k=1, stride=2),
        conv_case("ResNet-18 layer3 128->256 s2 16->8", 64, 128, 256, 16, stride=2),
        conv_case("ResNet-18 layer3 256->256 8x8", 64, 256, 256, 8),
        conv_case("ResNet-18 layer4 256->512 s2 8->4", 64, 256, 512, 8, stride=2),
        conv_case("ResNet-18 layer4 512->512 4x4", 64, 512, 512, 4),
        linear_case("ResNet-18 fc 512->10", 64, 1, 512, 10),
        ("ResNet-18 fc 512->10 grad norm (ghost)", "linear_grad_norm_sq", dict(a=(64, 1, 512), delta=(64, 1, 10)),
         ("ghost",)),
        ("token linear T=64 256->256 grad norm (materialize)", "linear_grad_norm_sq",
         dict(a=(64, 64, 256), delta=(64, 64, 256)), ("materialize",)),
    ]


def run_case(name, op, shapes, extra, repeats, gen):
    args = [torch.randn(*s, generator=gen) for s in shapes.values()] + list(extra)
    eager, ext = getattr(ref, op), getattr(_ops, op)
    want, got = eager(*args), ext(*args)
    rel = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    # warmup=1: oneDNN primitive creation and allocator growth stay out of the timings.
    t = harness.time_interleaved({"eager": lambda: eager(*args), "ext": lambda: ext(*args)},
                                 {"eager": repeats, "ext": repeats}, CPU, warmup=1)
    te, tc = t["eager"]["times_ms"], t["ext"]["times_ms"]
    be, bc, me, mc = min(te), min(tc), statistics.median(te), statistics.median(tc)
    return dict(bench="ext_cpu", case=name, op=op, shapes={k: list(v) for k, v in shapes.items()}, repeats=repeats,
                eager_ms=round(be, 3), ext_ms=round(bc, 3), ratio=round(be / bc, 3),
                eager_median_ms=round(me, 3), ext_median_ms=round(mc, 3), ratio_median=round(me / mc, 3),
                eager_times_ms=[round(x, 3) for x in te], ext_times_ms=[round(x, 3) for x in tc],
                max_rel_diff=rel)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per path")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if _ext.load() is None:
        sys.exit(f"bench_ext_cpu: {_ext.status()['cpu'][1]}")
    repeats = 2 if args.quick else args.repeats
    env = harness.environment(CPU)
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        from tqdm import tqdm
        todo = tqdm(cases(args.quick), desc="bench_ext_cpu", file=sys.stderr)
    except ImportError:
        todo = cases(args.quick)
    for name, op, shapes, extra in todo:
        rows.append({**run_case(name, op, shapes, extra, repeats, gen), "quick": args.quick, **env})
    harness.append_jsonl(args.out, rows)
    print(f"\n{env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, git {env['git_sha'][:10]}"
          f"{' (dirty)' if env['git_dirty'] else ''}, load {env['load_avg_1min']:.1f}; "
          f"best and median of {repeats} interleaved runs\n")
    print(harness.markdown_table(
        ["case", "op", "eager ms (best)", "C++ ms (best)", "eager / C++ (best)", "eager / C++ (median)", "max rel diff"],
        [[r["case"], r["op"], f"{r['eager_ms']:.2f}", f"{r['ext_ms']:.2f}", f"{r['ratio']:.2f}",
          f"{r['ratio_median']:.2f}", f"{r['max_rel_diff']:.1e}"] for r in rows]))
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
