"""Dataset scoring throughput: images/s of every scoring path over Fashion-MNIST, side by side with a
plain forward+backward pass over the same images (the unit), with peak memory; K = 8 directions in one
pass against one; and (``--torchrun``) 2 processes against 1.

    python benchmarks/bench_score.py --threads 1                      # ConvNet-3 w128 (60,000) + ResNet-18 (2,048)
    python benchmarks/bench_score.py --models convnet --images 10240 --slow-images 2560
    python benchmarks/bench_score.py --torchrun --torchrun-images 4096
    python benchmarks/bench_score.py --quick                          # seconds: a smoke run (CI)

Rounds: the images are cut into segments (``--segment``, whole batches); every path scores every segment
(slow anchors only the first ``--slow-images``), in alternating order (A B C, C B A, ...), so load on a
shared machine hits all paths alike. images/s = images / seconds summed over segments; the spread is the
min and median of the per-segment rates. Peak memory (after timing, one extra call on two batches):
harness.measure_peak (CPU: peak RSS growth + resident tensors; CUDA: max_memory_allocated).
Results: JSON lines in benchmarks/results/score.jsonl, a markdown table on stdout (``--md FILE`` too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path as FsPath

import torch

import harness
import score_paths
from iwd_fast.data import load_dataset, stratified_split
from iwd_fast.networks import build_network

MODELS = {"convnet": dict(name="convnet", width=128, norm="instancenorm", batch=256, label="ConvNet-3 w128 (GroupNorm(C, C))"),
          "resnet18": dict(name="resnet18", width=64, norm="groupnorm", batch=64, label="ResNet-18 (GroupNorm, CIFAR stem)")}


def load_images(n: int, quick: bool):
    if quick:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "random 28x28 (quick)"
    train = load_dataset("fashion-mnist").train
    return train.images[:n].contiguous(), train.labels[:n].contiguous(), "Fashion-MNIST train"


def segments(x, y, seg: int):
    out = []
    for s in range(0, x.shape[0], seg):
        xs, ys = x[s:s + seg], y[s:s + seg]
        _, held = stratified_split(ys, 0.1, seed=0)
        out.append(score_paths.Segment(xs, ys, held))
    return out


def run_model(key: str, args, env) -> list:
    spec = MODELS[key]
    torch.manual_seed(0)
    width = (8 if key == "resnet18" else 16) if args.quick else spec["width"]
    batch = 16 if args.quick else spec["batch"]
    n = args.images.get(key)
    x, y, source = load_images(n, args.quick)
    net = build_network(spec["name"], 1, 10, (28, 28), width=width, norm=spec["norm"]).eval()
    reasons = harness.impl_reasons(torch.device("cpu"))
    impls = [i for i in ("cpu", "torch") if reasons.get(i) is None]
    seg = max(batch, (args.segment[key] // batch) * batch)
    slow = min(n, max(seg, (args.slow_images.get(key) // seg) * seg))
    paths = score_paths.build_paths(net, impls, batch, args.k, slow, tuple(x.shape[1:]))
    for p in paths:
        score_paths.check(p, net, x[:8], y[:8])
        print(f"  gate {p.name}: {p.status} {p.reason or ''}", flush=True)
    segs = segments(x, y, seg)
    live = [p for p in paths if p.status == "ok"]
    for r, s in enumerate(segs):
        order = live if r % 2 == 0 else live[::-1]
        for p in order:
            if p.max_images is not None and p.images >= p.max_images:
                continue
            t0 = time.perf_counter()
            p.run(s)
            p.times.append(time.perf_counter() - t0)
            p.images += s.x.shape[0]
        print(f"  round {r + 1}/{len(segs)} done (load {os.getloadavg()[0]:.1f})", flush=True)
    peaks = {}
    mem = score_paths.Segment(x[:2 * batch], y[:2 * batch], stratified_split(y[:2 * batch], 0.1, seed=0)[1])
    resident = harness.tensor_bytes(net, mem.x, mem.y)
    for p in live:
        peaks[p.name] = harness.measure_peak(lambda p=p: p.run(mem), torch.device("cpu"), resident)
    return records(key, spec, width, batch, source, n, seg, paths, peaks, env)


def records(key, spec, width, batch, source, n, seg, paths, peaks, env) -> list:
    plain = next(p for p in paths if p.kind == "plain")
    unit = plain.images / sum(plain.times)
    base_peak = peaks.get(plain.name, {}).get("peak_bytes")
    out = []
    for p in paths:
        rec = {**env, "kind": "path", "model": key, "network": spec["label"], "width": width, "batch": batch,
               "data": source, "segment": seg, "path": p.name, "target": p.kind, "impl": p.impl, "k": p.k,
               "status": p.status, "reason": p.reason, "images": p.images, "seconds": sum(p.times)}
        if p.times:
            sizes = [seg] * len(p.times)
            rates = [s / t for s, t in zip(sizes, p.times)]
            rec.update(images_per_s=p.images / sum(p.times), rate_min=min(rates), rate_median=statistics.median(rates),
                       speed_vs_plain=(p.images / sum(p.times)) / unit, cost_vs_plain=unit / (p.images / sum(p.times)))
        pk = peaks.get(p.name)
        if pk and pk.get("peak_bytes"):
            rec.update(peak_mb=pk["peak_bytes"] / harness.MB, memory_method=pk["method"])
            if base_peak:
                rec["peak_vs_plain"] = pk["peak_bytes"] / base_peak
        out.append(rec)
    return out


def targets(recs: list) -> list:
    out = []
    by = {(r["model"], r["path"]): r for r in recs if r["kind"] == "path"}
    for model in sorted({r["model"] for r in recs if r["kind"] == "path"}):
        rows = [r for r in recs if r.get("model") == model and r["kind"] == "path" and "images_per_s" in r]
        val = [r for r in rows if r["target"] == "validation" and r["impl"] not in ("jvp", "reference", "opacus",
                                                                                     "backpack")]
        best = max(val, key=lambda r: r["images_per_s"]) if val else None
        get = lambda name: by.get((model, name), {}).get("images_per_s")  # noqa: E731
        checks = []
        if best:
            checks += [("validation >= 0.7x plain images/s", best["speed_vs_plain"], 0.7, ">="),
                       ("validation peak <= 1.2x plain", best.get("peak_vs_plain"), 1.2, "<=")]
            if get("opacus validation"):
                checks.append(("validation >= 3x opacus", best["images_per_s"] / get("opacus validation"), 3.0, ">="))
            if get("validation reference"):
                checks.append(("validation >= 2x vmap(grad)", best["images_per_s"] / get("validation reference"), 2.0,
                               ">="))
        selfs = [r for r in rows if r["target"] == "self" and r["impl"] in ("cpu", "torch")]
        if selfs:
            s = max(selfs, key=lambda r: r["images_per_s"])
            checks += [("self cost <= 1.45x plain", s["cost_vs_plain"], 1.45, "<="),
                       ("self extra peak <= 20%", None if s.get("peak_vs_plain") is None else
                        100 * (s["peak_vs_plain"] - 1), 20.0, "<=")]
        k1 = [r for r in rows if r["target"] == "direction" and r["k"] == 1]
        kk = [r for r in rows if r["target"] == "direction" and r["k"] > 1]
        if k1 and kk:
            checks.append((f"K={kk[0]['k']} one pass <= 2x one direction", k1[0]["images_per_s"] / kk[0]["images_per_s"],
                           2.0, "<="))
        for name, value, threshold, op in checks:
            ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
            out.append({"kind": "target", "model": model, "target_name": name, "value": value, "threshold": threshold,
                        "verdict": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                        "impl": best["impl"] if best and "validation" in name else None})
    return out


def table(recs: list) -> str:
    lines = []
    for model in sorted({r["model"] for r in recs if r["kind"] == "path"}):
        rows = [r for r in recs if r.get("model") == model and r["kind"] == "path"]
        head = rows[0]
        lines.append(f"\n{head['network']}, batch {head['batch']}, {head['data']}, {head['torch_threads']} thread(s), "
                     f"{head['device_name']} (CPU; shared machine, load {head['load_avg_1min']:.1f} at start)\n")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(harness.markdown_table(
            ["path", "images", "images/s", "x plain images/s", "cost vs plain", "seg rate min / median",
             "peak MB", "peak vs plain", "status"],
            [[r["path"], r["images"], fmt(r.get("images_per_s"), ".1f"), fmt(r.get("speed_vs_plain"), ".2f"),
              fmt(r.get("cost_vs_plain"), ".2f"),
              "-" if "rate_min" not in r else f"{r['rate_min']:.1f} / {r['rate_median']:.1f}",
              fmt(r.get("peak_mb"), ".0f"), fmt(r.get("peak_vs_plain"), ".2f"),
              r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"] for r in rows]))
    tg = [r for r in recs if r["kind"] == "target"]
    if tg:
        lines.append("\nTargets (reported, never asserted):\n")
        lines.append(harness.markdown_table(["model", "target", "value", "threshold", "verdict"],
                                            [[r["model"], r["target_name"] + (f" ({r['impl']})" if r.get("impl") else ""),
                                              "-" if r["value"] is None else f"{r['value']:.2f}", r["threshold"],
                                              r["verdict"]] for r in tg]))
    return "\n".join(lines)


def torchrun_compare(args, env) -> list:
    """`iwd-fast score` on N images with 1 process (1 thread) and with torchrun 2 processes (1 thread each)."""
    x, y, source = load_images(args.torchrun_images, args.quick)
    width = 16 if args.quick else 128
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, (28, 28), width=width)
    with tempfile.TemporaryDirectory() as d:
        torch.save({"images": x, "labels": y}, f"{d}/data.pt")
        torch.save(net.state_dict(), f"{d}/ck.pt")
        common = ["score", "--dataset", f"{d}/data.pt", "--normalize", "none", "--model", "convnet", "--width",
                  str(width), "--checkpoint", f"{d}/ck.pt", "--target", "validation", "--quiet"]
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(harness.REPO_ROOT))
        out = []
        for procs in (1, 2):
            cmd = ([sys.executable, "-m", "iwd_fast"] if procs == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
                    "iwd_fast"]) + common + ["--threads", "1", "--out", f"{d}/p{procs}"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=e)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            man = json.loads(FsPath(f"{d}/p{procs}/manifest.json").read_text())["last_call"]
            out.append({**env, "kind": "torchrun", "processes": procs, "threads_per_process": 1,
                        "images": args.torchrun_images, "data": source, "network": f"ConvNet-3 w{width}",
                        "scoring_images_per_s": man["images_per_second"], "command_wall_s": wall,
                        "scores_sha256": __import__("hashlib").sha256(
                            FsPath(f"{d}/p{procs}/scores.pt").read_bytes()).hexdigest()})
    out[1]["speedup_vs_1"] = out[1]["scoring_images_per_s"] / out[0]["scoring_images_per_s"]
    out[1]["bitwise_equal_to_1"] = out[1]["scores_sha256"] == out[0]["scores_sha256"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--images", nargs="+", default=["convnet=60000", "resnet18=2048"], help="images per model")
    ap.add_argument("--slow-images", nargs="+", default=["convnet=5120", "resnet18=512"],
                    help="images for the slow anchors (vmap, jvp, opacus, backpack)")
    ap.add_argument("--segment", nargs="+", default=["convnet=2560", "resnet18=512"], help="images per interleaved round")
    ap.add_argument("--k", type=int, default=8, help="directions in the one-pass comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torchrun", action="store_true", help="only the 1 vs 2 process comparison")
    ap.add_argument("--torchrun-images", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="tiny widths, random images, seconds")
    ap.add_argument("--out", default=str(harness.results_path("score")))
    ap.add_argument("--md", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.slow_images, args.segment, args.torchrun_images = ["convnet=64", "resnet18=32"], \
            ["convnet=32", "resnet18=32"], ["convnet=32", "resnet18=32"], 64
    args.images = {k: int(v) for k, v in (s.split("=") for s in args.images)}
    args.slow_images = {k: int(v) for k, v in (s.split("=") for s in args.slow_images)}
    args.segment = {k: int(v) for k, v in (s.split("=") for s in args.segment)}
    env = {**harness.environment(torch.device("cpu")), "run_id": uuid.uuid4().hex[:12], "bench": "score",
           "quick": args.quick}
    if args.torchrun:
        recs = torchrun_compare(args, env)
        text = harness.markdown_table(["processes", "threads each", "images", "scoring images/s", "speedup",
                                       "bitwise equal", "command wall s"],
                                      [[r["processes"], 1, r["images"], f"{r['scoring_images_per_s']:.1f}",
                                        f"{r.get('speedup_vs_1', 1.0):.2f}", r.get("bitwise_equal_to_1", "-"),
                                        f"{r['command_wall_s']:.1f}"] for r in recs])
    else:
        recs = []
        for key in args.models:
            print(f"{key}: {args.images[key]} images", flush=True)
            recs += run_model(key, args, env)
        recs += targets(recs)
        text = table(recs)
    harness.append_jsonl(args.out, recs)
    print(text)
    if args.md:
        FsPath(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
