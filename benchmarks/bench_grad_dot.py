"""Per-sample gradient dot products s_i = <grad loss_i, v> against plain forward+backward: the correctness
gate, peak memory, and the report joining them with the pytest-benchmark timings.

Timing is pytest-benchmark's job (test_bench_grad_dot.py, one group per model); this script measures
what pytest-benchmark cannot, with the same paths (grad_dot_paths.py):

  plain fwd+bwd            mean cross entropy, torch.autograd.grad over the parameters (the baseline)
  capture+X                the same forward+backward inside iwd_fast.capture(net), then
                           cap.grad_dot(v, impl=X), for every usable hook impl X (the drop-in path;
                           its ratio to the baseline is the headline)
  capture norm_sq+X        the same, then cap.grad_norm_sq(impl=X) (self-influence)
  grad_dot X               functional iwd_fast.grad_dot(net, x, y, v, impl=X) for reference, jvp and
                           every usable hook impl
  opacus / backpack        anchors when installed: per-sample gradients, then the dot

Every path's output is checked against impl="reference" in float32; samples off by more than --tol are
recomputed in float64 (a ReLU-kink flip between batched and per-sample float32 forwards is legitimate,
a wrong kernel is not); a path that stays off is reported WRONG. Then peak memory per path
(harness.measure_peak). With --timings, the pytest-benchmark JSON of the same models is joined in:
ratios of medians (and of minima) to the plain forward+backward of the same run. Results: a markdown
table per model on stdout, one JSON line per path appended to --out. Targets are reported with
PASS/MISS, never asserted.

    pytest benchmarks/test_bench_grad_dot.py --benchmark-only --bench-threads 1 \
        --benchmark-json=benchmarks/results/pytest_grad_dot.json
    python benchmarks/bench_grad_dot.py --threads 1 --timings benchmarks/results/pytest_grad_dot.json
    python benchmarks/bench_grad_dot.py --quick         # tiny widths and batches, for CI
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, replace
from typing import Dict, List

import torch

import harness
from grad_dot_paths import FULL, QUICK, Inputs, ModelSpec, Path, build_paths, check_paths, impl_reasons, make_inputs

# (description, path or "best-functional", metric, family -> threshold, comparison)
TARGETS = (
    ("capture torch: ratio <= 1.45 (ConvNet-3) / <= 1.5 (ResNet-18)", "capture+torch", "ratio",
     {"convnet": 1.45, "resnet18": 1.5}, "<="),
    ("cpu backend <= 1.4 (ConvNet-3) / <= 1.45 (ResNet-18)", "capture+cpu", "ratio",
     {"convnet": 1.4, "resnet18": 1.45}, "<="),
    ("speedup vs reference >= 2.6x (ResNet-18)", "best-functional", "speedup", {"resnet18": 2.6}, ">="),
    ("extra peak memory <= 20% (capture+torch)", "capture+torch", "extra_pct", {"convnet": 20.0, "resnet18": 20.0}, "<="),
    ("extra peak memory <= 20% (capture+cpu)", "capture+cpu", "extra_pct", {"convnet": 20.0, "resnet18": 20.0}, "<="),
    ("capture streamed torch: ratio <= 1.45 / 1.5", "capture streamed+torch", "ratio",
     {"convnet": 1.45, "resnet18": 1.5}, "<="),
    ("capture streamed cpu: ratio <= 1.4 / 1.45", "capture streamed+cpu", "ratio",
     {"convnet": 1.4, "resnet18": 1.45}, "<="),
    ("extra peak memory <= 20% (capture streamed+torch)", "capture streamed+torch", "extra_pct",
     {"convnet": 20.0, "resnet18": 20.0}, "<="),
    ("extra peak memory <= 20% (capture streamed+cpu)", "capture streamed+cpu", "extra_pct",
     {"convnet": 20.0, "resnet18": 20.0}, "<="),
)


@dataclass
class Case:
    spec: ModelSpec
    device: torch.device
    inputs: Inputs
    paths: List[Path]
    resident_bytes: int = 0


def build_case(spec: ModelSpec, k: int, seed: int, device: torch.device, anchors: bool) -> Case:
    inp = make_inputs(spec, k, seed, device)
    paths = build_paths(inp, impl_reasons(device), anchors)
    return Case(spec, device, inp, paths, harness.tensor_bytes(inp.net, inp.x, inp.y, inp.v_stack))


# ----------------------------------------------------------------------------------------- phases

def check(case: Case, tol: float, reasons, anchors: bool) -> None:
    """One call per path (also its warmup), compared with impl='reference' (see grad_dot_paths.check_paths)."""
    check_paths(case.paths, case.inputs, tol, rebuild=lambda inp: build_paths(inp, reasons, anchors))
    for p in case.paths:
        if p.compare is not None and p.err is not None:
            extra = (f"  {p.n_outliers} sample(s) > tol, float64 recheck {_fmt(p.err64, '.1e', 'not run')}"
                     if p.n_outliers else "")
            print(f"  check {case.spec.key:18s} {p.name:24s} max rel err vs reference {p.err:.2e}{extra}"
                  + ("  WRONG" if p.status == "wrong" else ""), flush=True)
        elif p.status == "error":
            print(f"  check {case.spec.key:18s} {p.name:24s} ERROR {p.reason}", flush=True)


def load_timings(case: Case, pytest_json: str) -> str:
    """Attach the pytest-benchmark rounds of this model's paths; returns the sha the timings were taken at."""
    doc = json.loads(open(pytest_json).read())
    shas = set()
    by = {p.name: p for p in case.paths}
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("model") != case.spec.key or info.get("path") not in by:
            continue
        if info.get("batch") != case.spec.batch or info.get("k") != case.inputs.k:
            raise SystemExit(f"{pytest_json}: {case.spec.key} was timed at batch {info.get('batch')}, K {info.get('k')}; "
                             f"this run measures batch {case.spec.batch}, K {case.inputs.k}")
        shas.add(info.get("git_sha"))
        rounds = [1000.0 * t for t in bench["stats"]["data"]]
        by[info["path"]].timing = {"median_ms": 1000.0 * bench["stats"]["median"], "min_ms": 1000.0 * bench["stats"]["min"],
                                   "times_ms": rounds, "timer": "pytest-benchmark (time.perf_counter)"}
    return ",".join(sorted(s for s in shas if s)) or "unknown"


def measure_memory(case: Case) -> None:
    for p in case.paths:
        if p.status == "ok":
            p.memory = harness.measure_peak(p.fn, case.device, case.resident_bytes + p.own_bytes)


# ----------------------------------------------------------------------------------------- report

def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def derived(case: Case) -> Dict[str, dict]:
    """{path name: {ratio, speedup, peak_mb, growth_mb, extra_pct}} relative to this run's baseline."""
    by = {p.name: p for p in case.paths}
    med = lambda name: (by[name].timing or {}).get("median_ms") if name in by else None  # noqa: E731
    low = lambda name: (by[name].timing or {}).get("min_ms") if name in by else None  # noqa: E731
    peak = lambda name: (by[name].memory or {}).get("peak_bytes") if name in by else None  # noqa: E731
    t0, tmin0, tref, m0 = med("plain fwd+bwd"), low("plain fwd+bwd"), med("grad_dot reference"), peak("plain fwd+bwd")
    out = {}
    for p in case.paths:
        t, tmin, m = med(p.name), low(p.name), peak(p.name)
        growth = (p.memory or {}).get("growth_bytes")
        out[p.name] = {
            "ratio": t / t0 if t is not None and t0 else None,
            "ratio_min": tmin / tmin0 if tmin is not None and tmin0 else None,
            "speedup": tref / t if t is not None and tref else None,
            "peak_mb": m / harness.MB if m is not None else None,
            "growth_mb": growth / harness.MB if growth is not None else None,
            "extra_pct": 100.0 * (m - m0) / m0 if m is not None and m0 else None,
        }
    return out


def targets(case: Case, d: Dict[str, dict]) -> List[dict]:
    by = {p.name: p for p in case.paths}
    best = next((f"grad_dot {i}" for i in ("cuda", "triton", "cpu", "torch")
                 if f"grad_dot {i}" in by and by[f"grad_dot {i}"].status == "ok"), "grad_dot torch")
    rows = []
    for text, path, metric, thresholds, op in TARGETS:
        path = best if path == "best-functional" else path
        threshold = thresholds.get(case.spec.family)
        value = d.get(path, {}).get(metric)
        if path not in by or by[path].status != "ok":
            verdict = f"n/a ({path}: {by[path].reason if path in by else 'not run'})"
        elif value is None:
            verdict = "n/a (not measured)"
        elif threshold is None:
            verdict = "info (no target for this model)"
        else:
            verdict = "PASS" if (value <= threshold if op == "<=" else value >= threshold) else "MISS"
        rows.append({"target": text, "path": path, "metric": metric, "value": value, "threshold": threshold,
                     "verdict": verdict})
    return rows


def report(case: Case, env: dict, run_id: str, out_path, quick: bool, timing_sha: str) -> None:
    s = case.spec
    d = derived(case)
    print(f"\n### {s.key}: {s.network} width {s.width}, norm {s.norm}, B={s.batch}, "
          f"input {s.channels}x{s.im_size}x{s.im_size}, K={case.inputs.k}, float32, {case.device.type}"
          + (" (quick: tiny sizes, targets not meaningful)" if quick else "") + "\n")
    rows = []
    for p in case.paths:
        t, dd = p.timing or {}, d[p.name]
        times = t.get("times_ms") or []
        rows.append([p.name, _fmt(t.get("median_ms"), ".1f"), _fmt(min(times) if times else None, ".1f"),
                     len(times) or "-", _fmt(dd["ratio"], ".2f"), _fmt(dd["ratio_min"], ".2f"), _fmt(dd["speedup"], ".2f"),
                     _fmt(dd["peak_mb"], ".1f"), _fmt(dd["growth_mb"], ".1f"), _fmt(dd["extra_pct"], "+.1f"),
                     _fmt(p.err, ".1e"), p.status])
    print(harness.markdown_table(["path", "ms (median)", "ms (min)", "n", "ratio vs plain (median)",
                                  "ratio vs plain (min)", "speedup vs ref",
                                  "peak MB", "call growth MB", "extra peak %", "max rel err", "status"], rows))
    print()
    for p in case.paths:
        if p.status != "ok" or p.reason:
            print(f"- {p.name}: {p.status}: {p.reason}")
    tgt = targets(case, d)
    for t in tgt:
        value = "-" if t["value"] is None else (f"{t['value']:.2f}" + ("x" if t["metric"] == "speedup" else
                                                                     "%" if t["metric"] == "extra_pct" else ""))
        print(f"- {t['target']}: {t['path']} = {value} -> {t['verdict']}")
    base = {"bench": "grad_dot", "run_id": run_id, **env, "model": s.key, "network": s.network, "width": s.width,
            "depth": s.depth if s.family == "convnet" else None, "norm": s.norm, "batch": s.batch,
            "input_shape": list(case.inputs.x.shape), "num_classes": s.num_classes, "k": case.inputs.k, "dtype": "float32",
            "quick": quick, "resident_mb": case.resident_bytes / harness.MB, "timings_git_sha": timing_sha}
    records = []
    for p in case.paths:
        t, m = p.timing or {}, p.memory or {}
        records.append({**base, "path": p.name, "kind": p.kind, "impl": p.impl, "status": p.status, "reason": p.reason,
                        "max_rel_err": p.err, "n_outliers_fp32": p.n_outliers,
                        "max_rel_err_fp64_recheck": p.err64, "median_ms": t.get("median_ms"), "times_ms": t.get("times_ms"),
                        "repeats": len(t.get("times_ms") or []), "timer": t.get("timer"),
                        "ratio_vs_plain": d[p.name]["ratio"], "ratio_vs_plain_min": d[p.name]["ratio_min"],
                        "speedup_vs_reference": d[p.name]["speedup"],
                        "peak_mb": d[p.name]["peak_mb"], "growth_mb": d[p.name]["growth_mb"],
                        "extra_peak_pct": d[p.name]["extra_pct"], "memory_method": m.get("method")})
    records += [{**base, "path": t["path"], "kind": "target", **t} for t in tgt]
    harness.append_jsonl(out_path, records)


# ----------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Check and measure the peak memory of per-sample gradient dot products (iwd_fast.capture / "
                    "grad_dot, every usable impl, Opacus and BackPACK anchors) beside plain forward+backward, and "
                    "join the pytest-benchmark timings of test_bench_grad_dot.py (--timings).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["all"],
                    help="model keys or prefixes: convnet3-32x32x3 convnet3-28x28x1 resnet18-32x32x3, 'convnet', "
                         "'resnet18' or 'all'")
    ap.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model, "
                    "256 for ConvNet-3 and 64 for ResNet-18; 16 / 4 with --quick)")
    ap.add_argument("--timings", default=None,
                    help="pytest-benchmark JSON of test_bench_grad_dot.py for the same models (joined into the table)")
    ap.add_argument("--k", type=int, default=1, help="number of directions K")
    ap.add_argument("--quick", action="store_true", help="tiny widths and batches: a ~1 minute round for CI")
    ap.add_argument("--tol", type=float, default=1e-3,
                    help="max relative error vs impl='reference' (max |s - s_ref| / max |s_ref|) to accept a path")
    ap.add_argument("--no-anchors", action="store_true", help="skip Opacus and BackPACK")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(harness.results_path("grad_dot")), help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    if args.k < 1 or (args.batch is not None and args.batch < 1):
        ap.error("--k and --batch must be >= 1")
    return args


def select(args) -> List[ModelSpec]:
    table = QUICK if args.quick else FULL
    chosen = [s for s in table if "all" in args.models or any(s.key.startswith(m) for m in args.models)]
    if not chosen:
        raise SystemExit(f"--models {args.models} matches none of {[s.key for s in table]}")
    return [replace(s, batch=args.batch or s.batch) for s in chosen]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = harness.environment(device)
    run_id = f"{env['timestamp']}-{uuid.uuid4().hex[:8]}"
    specs = select(args)
    reasons = impl_reasons(device)
    print(f"# grad_dot benchmark  run {run_id}\n")
    print(f"git {env['git_sha']} (dirty: {env['git_dirty']}), torch {env['torch']}, numpy {env['numpy']}, "
          f"triton {env['triton']}, device {env['device_name']}, {env['cpu_count']} CPUs, "
          f"{env['torch_threads']} threads, load avg {env['load_avg_1min']}")
    if env["load_avg_1min"] and env["load_avg_1min"] > (env["cpu_affinity"] or 1):
        print(f"WARNING: load average {env['load_avg_1min']:.1f} exceeds {env['cpu_affinity']} cores: other processes "
              "compete for the CPUs; times and even ratios are unreliable (rerun idle, or try --threads 1)")
    print("impls: " + "; ".join(f"{i}: {'usable' if r is None else 'SKIPPED - ' + r}" for i, r in reasons.items()))
    print(f"memory: {harness.cpu_memory_method() if device.type == 'cpu' else 'torch.cuda.max_memory_allocated'}\n")
    cases = []
    for spec in specs:
        case = build_case(spec, args.k, args.seed, device, anchors=not args.no_anchors)
        for p in case.paths:
            if p.kind == "anchor" and p.status != "ok":
                print(f"  anchor {p.name} skipped: {p.reason}")
        check(case, args.tol, reasons, not args.no_anchors)
        cases.append(case)
    timing_sha = {c.spec.key: load_timings(c, args.timings) if args.timings else "not timed" for c in cases}
    if not args.no_memory:
        for case in cases:
            measure_memory(case)
    for case in cases:
        report(case, env, run_id, args.out, args.quick, timing_sha[case.spec.key])
    print(f"\nappended JSON lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
