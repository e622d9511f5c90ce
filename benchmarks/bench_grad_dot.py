"""Benchmark per-sample gradient dot products s_i = <grad loss_i, v> against plain forward+backward.

For each model, in one run and side by side (timed round-robin, see harness.time_interleaved):

  plain fwd+bwd            mean cross entropy, torch.autograd.grad over the parameters (the baseline)
  capture+X                the same forward+backward inside iwd_fast.capture(net), then
                           cap.grad_dot(v, impl=X), for every usable hook impl X (the drop-in path;
                           its ratio to the baseline is the headline)
  capture norm_sq+X        the same, then cap.grad_norm_sq(impl=X) (self-influence)
  grad_dot X               functional iwd_fast.grad_dot(net, x, y, v, impl=X) for reference, jvp and
                           every usable hook impl
  opacus / backpack        anchors when installed: per-sample gradients, then the dot

Before timing, every path's output is checked once against impl="reference" in float32; a path whose
max relative error exceeds --tol is reported WRONG and not timed. Peak memory is measured after all
timing (harness.measure_peak). Results: a markdown table per model on stdout, one JSON line per path
appended to --out. Targets are reported with PASS/MISS, never asserted.

    python benchmarks/bench_grad_dot.py                 # full round (~10 min on 2 idle CPU cores)
    python benchmarks/bench_grad_dot.py --quick         # tiny widths and batches (~1 min), for CI
"""
from __future__ import annotations

import argparse
import copy
import sys
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import harness
import iwd_fast
from iwd_fast import _dispatch
from iwd_fast.networks import build_network

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a dependency of iwd_fast; keep the benchmark usable without it
    tqdm = None

warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    network: str          # build_network name
    family: str           # "convnet" or "resnet18": selects the targets
    channels: int
    im_size: int
    batch: int
    width: int
    depth: int
    norm: str
    repeats: int
    num_classes: int = 10


FULL = (
    ModelSpec("convnet3-32x32x3", "convnet", "convnet", 3, 32, 256, 128, 3, "instancenorm", repeats=3),
    ModelSpec("convnet3-28x28x1", "convnet", "convnet", 1, 28, 256, 128, 3, "instancenorm", repeats=3),
    ModelSpec("resnet18-32x32x3", "resnet18", "resnet18", 3, 32, 64, 64, 0, "groupnorm", repeats=2),
)
QUICK = (
    ModelSpec("convnet3-32x32x3", "convnet", "convnet", 3, 32, 16, 16, 3, "instancenorm", repeats=2),
    ModelSpec("convnet3-28x28x1", "convnet", "convnet", 1, 28, 16, 16, 3, "instancenorm", repeats=2),
    ModelSpec("resnet18-32x32x3", "resnet18", "resnet18", 3, 32, 4, 8, 0, "groupnorm", repeats=2),
)

# (description, path or "best-functional", metric, family -> threshold or None, comparison)
TARGETS = (
    ("capture torch: ratio <= 1.45 (ConvNet-3) / <= 1.5 (ResNet-18)", "capture+torch", "ratio",
     {"convnet": 1.45, "resnet18": 1.5}, "<="),
    ("cpu backend <= 1.4 (ConvNet-3) / <= 1.45 (ResNet-18)", "capture+cpu", "ratio",
     {"convnet": 1.4, "resnet18": 1.45}, "<="),
    ("speedup vs reference >= 2.6x (ResNet-18)", "best-functional", "speedup", {"resnet18": 2.6}, ">="),
    ("extra peak memory <= 20% (capture+torch)", "capture+torch", "extra_pct", {"convnet": 20.0, "resnet18": 20.0}, "<="),
    ("extra peak memory <= 20% (capture+cpu)", "capture+cpu", "extra_pct", {"convnet": 20.0, "resnet18": 20.0}, "<="),
)


@dataclass
class Path:
    name: str
    kind: str                       # baseline | capture | capture_norm | functional | anchor
    impl: Optional[str]
    fn: Optional[Callable[[], Optional[torch.Tensor]]]
    compare: Optional[str] = None   # "dot" | "norm" | None (baseline)
    slow: bool = False
    status: str = "ok"              # ok | unavailable | error | wrong
    reason: str = ""
    err: Optional[float] = None
    timing: Optional[dict] = None
    memory: Optional[dict] = None
    own_bytes: int = 0              # tensors the path holds besides the case's (an anchor's model copy)


@dataclass
class Case:
    spec: ModelSpec
    device: torch.device
    k: int
    net: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    v: dict                         # what the API gets: shaped like the parameters (K=1) or [K, *shape]
    v_stack: dict                   # always [K, *shape]
    paths: List[Path]
    resident_bytes: int = 0


# ----------------------------------------------------------------------------------------- paths

def _impl_reasons(device: torch.device) -> Dict[str, Optional[str]]:
    """availability(device), with an import failure of a backend reported as that backend's reason."""
    out = {}
    for impl in _dispatch.IMPLS:
        if impl == "auto":
            continue
        try:
            out[impl] = _dispatch.why_not(impl, device)
        except Exception as err:  # noqa: BLE001 - a backend being built right now may not import yet
            out[impl] = f"{type(err).__name__}: {err}"
    return out


def _anchor_dot(grads: Dict[str, torch.Tensor], v_stack: dict, batch: int, k: int) -> torch.Tensor:
    s = None
    for name, g in grads.items():
        term = g.reshape(batch, -1) @ v_stack[name].reshape(k, -1).T
        s = term if s is None else s + term
    return s[:, 0] if k == 1 else s


def _opacus_path(case: Case) -> Path:
    try:
        from opacus import GradSampleModule
    except ImportError as err:
        return Path("opacus", "anchor", None, None, status="unavailable", reason=f"opacus not installed ({err})")
    b, k = case.x.shape[0], case.k
    try:
        model = GradSampleModule(copy.deepcopy(case.net), batch_first=True, loss_reduction="mean")
    except Exception as err:  # noqa: BLE001 - an anchor that cannot wrap the model is reported, not fatal
        return Path("opacus", "anchor", None, None, status="unavailable", reason=f"GradSampleModule: {err}")
    named = [(n, p) for n, p in model._module.named_parameters() if p.requires_grad]
    own = harness.tensor_bytes(model)

    def run() -> torch.Tensor:
        F.cross_entropy(model(case.x), case.y).backward()
        s = _anchor_dot({n: p.grad_sample for n, p in named}, case.v_stack, b, k)
        model.zero_grad(set_to_none=True)  # drops grad_sample and grad: nothing carries into the next call
        return s

    return Path("opacus", "anchor", "GradSampleModule", run, compare="dot", slow=True, own_bytes=own)


def _backpack_path(case: Case) -> Path:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError as err:
        return Path("backpack", "anchor", None, None, status="unavailable",
                    reason=f"backpack-for-pytorch not installed ({err})")
    b, k = case.x.shape[0], case.k
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    reasons = []
    for use_converter in (False, True):
        try:
            model = extend(copy.deepcopy(case.net), use_converter=use_converter)
        except Exception as err:  # noqa: BLE001
            reasons.append(f"extend(use_converter={use_converter}): {type(err).__name__}: {str(err)[:120]}")
            continue
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def run(model=model, named=named, n=b) -> torch.Tensor:
            with backpack(BatchGrad()):
                loss_fn(model(case.x[:n]), case.y[:n]).backward()
            grads = {name: p.grad_batch * n for name, p in named}  # grad_batch of a mean loss carries 1/B
            for _, p in named:
                del p.grad_batch
                p.grad = None
            return _anchor_dot(grads, case.v_stack, n, k)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run(n=min(2, b))  # probe on two samples: does BatchGrad cover every parameter?
                return Path("backpack", "anchor", "BatchGrad", run, compare="dot", slow=True,
                            own_bytes=harness.tensor_bytes(model))
            except Exception as err:  # noqa: BLE001
                missing = sorted({str(w.message).split("Module <class '")[-1].split("'>")[0]
                                  for w in caught if "does not have an extension" in str(w.message)})
                why = f"no BatchGrad extension for {', '.join(missing)}" if missing else f"{type(err).__name__}: {err}"
                reasons.append(f"use_converter={use_converter}: {why[:160]}")
    return Path("backpack", "anchor", None, None, status="unavailable", reason="; ".join(reasons))


def build_case(spec: ModelSpec, k: int, seed: int, device: torch.device, anchors: bool) -> Case:
    torch.manual_seed(seed)
    net = build_network(spec.network, spec.channels, spec.num_classes, spec.im_size, width=spec.width,
                        depth=spec.depth or 3, norm=spec.norm).to(device)
    x = torch.randn(spec.batch, spec.channels, spec.im_size, spec.im_size, device=device)
    y = torch.randint(0, spec.num_classes, (spec.batch,), device=device)
    params = [p for p in net.parameters() if p.requires_grad]
    v_stack = {n: torch.randn(k, *p.shape, device=device) for n, p in net.named_parameters() if p.requires_grad}
    v = {n: t[0] for n, t in v_stack.items()} if k == 1 else v_stack
    case = Case(spec, device, k, net, x, y, v, v_stack, [])

    def plain() -> None:
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        del grads

    def capture(impl: str, norm: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with iwd_fast.capture(net) as cap:
                grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)  # kept alive, as in a DC step
            out = cap.grad_norm_sq(impl=impl) if norm else cap.grad_dot(v, impl=impl)
            del grads
            return out
        return run

    def functional(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: iwd_fast.grad_dot(net, x, y, v, impl=impl)

    reasons = _impl_reasons(device)
    hook = [i for i in _dispatch.HOOK_IMPLS if reasons[i] is None]
    paths = [Path("plain fwd+bwd", "baseline", None, plain)]
    paths += [Path(f"capture+{i}", "capture", i, capture(i, False), compare="dot") for i in hook]
    paths += [Path(f"capture norm_sq+{i}", "capture_norm", i, capture(i, True), compare="norm") for i in hook]
    paths += [Path(f"grad_dot {i}", "functional", i, functional(i), compare="dot", slow=(i == "reference"))
              for i in ("reference", "jvp", *hook) if reasons[i] is None]
    paths += [Path(f"capture+{i}", "capture", i, None, status="unavailable", reason=reasons[i])
              for i in _dispatch.HOOK_IMPLS if reasons[i] is not None]  # one row per impl not usable here
    if anchors:
        paths += [_opacus_path(case), _backpack_path(case)]
    case.paths = paths
    case.resident_bytes = harness.tensor_bytes(net, x, y, v_stack)
    return case


# ----------------------------------------------------------------------------------------- phases

def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def check(case: Case, tol: float) -> None:
    """One call per path (also the warmup); compare with impl='reference'; mark errors and wrong paths."""
    ready = [p for p in case.paths if p.status == "ok"]
    ref = next(p for p in ready if p.name == "grad_dot reference")
    ref_dot = ref.fn()
    ref.err = 0.0
    ref_norm = None
    if any(p.compare == "norm" for p in ready):
        ref_norm = iwd_fast.grad_norm_sq(case.net, case.x, case.y, impl="reference")
    for p in ready:
        if p is ref:
            continue
        try:
            out = p.fn()
        except Exception as err:  # noqa: BLE001 - report and go on with the other paths
            p.status, p.reason = "error", f"{type(err).__name__}: {str(err)[:200]}"
            continue
        if p.compare is None:
            continue
        p.err = _rel_err(out, ref_dot if p.compare == "dot" else ref_norm)
        if not p.err <= tol:
            p.status, p.reason = "wrong", f"max rel err {p.err:.2e} > tol {tol:.0e}: not timed"
    for p in case.paths:
        if p.compare is not None and p.status in ("ok", "wrong"):
            print(f"  check {case.spec.key:18s} {p.name:26s} max rel err vs reference {p.err:.2e}"
                  + ("  WRONG" if p.status == "wrong" else ""), flush=True)
        elif p.status == "error":
            print(f"  check {case.spec.key:18s} {p.name:26s} ERROR {p.reason}", flush=True)


def time_case(case: Case, repeats: int, slow_repeats: int) -> None:
    ready = [p for p in case.paths if p.status == "ok"]
    counts = {p.name: min(repeats, slow_repeats) if p.slow else repeats for p in ready}
    bar = tqdm(total=sum(counts.values()), desc=f"time {case.spec.key}", leave=False, file=sys.stderr) if tqdm else None
    res = harness.time_interleaved({p.name: p.fn for p in ready}, counts, case.device, warmup=0,
                                   progress=bar.update if bar else None)
    if bar:
        bar.close()
    for p in ready:
        p.timing = res[p.name]


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
    peak = lambda name: (by[name].memory or {}).get("peak_bytes") if name in by else None  # noqa: E731
    t0, tref, m0 = med("plain fwd+bwd"), med("grad_dot reference"), peak("plain fwd+bwd")
    out = {}
    for p in case.paths:
        t, m = med(p.name), peak(p.name)
        growth = (p.memory or {}).get("growth_bytes")
        out[p.name] = {
            "ratio": t / t0 if t is not None and t0 else None,
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


def report(case: Case, env: dict, run_id: str, out_path, quick: bool) -> None:
    s = case.spec
    d = derived(case)
    print(f"\n### {s.key}: {s.network} width {s.width}, norm {s.norm}, B={s.batch}, "
          f"input {s.channels}x{s.im_size}x{s.im_size}, K={case.k}, float32, {case.device.type}"
          + (" (quick: tiny sizes, targets not meaningful)" if quick else "") + "\n")
    rows = []
    for p in case.paths:
        t, dd = p.timing or {}, d[p.name]
        times = t.get("times_ms") or []
        rows.append([p.name, _fmt(t.get("median_ms"), ".1f"), _fmt(min(times) if times else None, ".1f"),
                     len(times) or "-", _fmt(dd["ratio"], ".2f"), _fmt(dd["speedup"], ".2f"),
                     _fmt(dd["peak_mb"], ".1f"), _fmt(dd["growth_mb"], ".1f"), _fmt(dd["extra_pct"], "+.1f"),
                     _fmt(p.err, ".1e"), p.status])
    print(harness.markdown_table(["path", "ms (median)", "ms (min)", "n", "ratio vs plain", "speedup vs ref",
                                  "peak MB", "call growth MB", "extra peak %", "max rel err", "status"], rows))
    print()
    for p in case.paths:
        if p.status != "ok":
            print(f"- {p.name}: {p.status}: {p.reason}")
    tgt = targets(case, d)
    for t in tgt:
        value = "-" if t["value"] is None else (f"{t['value']:.2f}" + ("x" if t["metric"] == "speedup" else
                                                                     "%" if t["metric"] == "extra_pct" else ""))
        print(f"- {t['target']}: {t['path']} = {value} -> {t['verdict']}")
    base = {"bench": "grad_dot", "run_id": run_id, **env, "model": s.key, "network": s.network, "width": s.width,
            "depth": s.depth if s.family == "convnet" else None, "norm": s.norm, "batch": s.batch,
            "input_shape": list(case.x.shape), "num_classes": s.num_classes, "k": case.k, "dtype": "float32",
            "quick": quick, "resident_mb": case.resident_bytes / harness.MB}
    records = []
    for p in case.paths:
        t, m = p.timing or {}, p.memory or {}
        records.append({**base, "path": p.name, "kind": p.kind, "impl": p.impl, "status": p.status, "reason": p.reason,
                        "max_rel_err": p.err, "median_ms": t.get("median_ms"), "times_ms": t.get("times_ms"),
                        "repeats": len(t.get("times_ms") or []), "timer": t.get("timer"),
                        "ratio_vs_plain": d[p.name]["ratio"], "speedup_vs_reference": d[p.name]["speedup"],
                        "peak_mb": d[p.name]["peak_mb"], "growth_mb": d[p.name]["growth_mb"],
                        "extra_peak_pct": d[p.name]["extra_pct"], "memory_method": m.get("method")})
    records += [{**base, "path": t["path"], "kind": "target", **t} for t in tgt]
    harness.append_jsonl(out_path, records)


# ----------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time and measure per-sample gradient dot products (iwd_fast.capture / grad_dot, every usable "
                    "impl, Opacus and BackPACK anchors) side by side with plain forward+backward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["all"],
                    help="model keys or prefixes: convnet3-32x32x3 convnet3-28x28x1 resnet18-32x32x3, 'convnet', "
                         "'resnet18' or 'all'")
    ap.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model, "
                    "256 for ConvNet-3 and 64 for ResNet-18; 16 / 4 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per path (default: 3 ConvNet, 2 ResNet; 2 with --quick)")
    ap.add_argument("--slow-repeats", type=int, default=None,
                    help="cap on timed calls of the slow paths (reference, Opacus, BackPACK); default 2, 1 with --quick")
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
    if args.k < 1 or (args.batch is not None and args.batch < 1) or (args.repeats is not None and args.repeats < 1):
        ap.error("--k, --batch and --repeats must be >= 1")
    return args


def select(args) -> List[ModelSpec]:
    table = QUICK if args.quick else FULL
    chosen = [s for s in table if "all" in args.models or any(s.key.startswith(m) for m in args.models)]
    if not chosen:
        raise SystemExit(f"--models {args.models} matches none of {[s.key for s in table]}")
    return [replace(s, batch=args.batch or s.batch, repeats=args.repeats or s.repeats) for s in chosen]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = harness.environment(device)
    run_id = f"{env['timestamp']}-{uuid.uuid4().hex[:8]}"
    specs = select(args)
    slow_repeats = args.slow_repeats or (1 if args.quick else 2)
    reasons = _impl_reasons(device)
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
        check(case, args.tol)
        time_case(case, spec.repeats, slow_repeats)
        cases.append(case)
    if not args.no_memory:  # after every timing: the memory mode slows large allocations down
        for case in cases:
            measure_memory(case)
    for case in cases:
        report(case, env, run_id, args.out, args.quick)
    print(f"\nappended JSON lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
