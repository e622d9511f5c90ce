"""GPU check, stage 3: timings (fused conv-dot against cuDNN, model paths against a plain
forward+backward) and peak memory; never fails the check."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

import harness
from iwd_fast.scoring import eager_ops
from iwd_fast.scoring.backends import compiled_ops as _ops

from gpu_check_common import _err_text, _sync, Report, set_tf32


def _time(rep: Report, section: str, name: str, fn: Optional[Callable], unavailable: Optional[str] = None,
          **extra) -> dict:
    """Warm-up call (Triton compiles here; an exception is recorded), then harness.time_call; one entry."""
    dev = rep.plan.device
    entry = dict(section=section, name=name, **extra)
    rep.timings.append(entry)
    if unavailable is not None:
        entry.update(status=f"unavailable: {unavailable}")
    elif rep.over_budget():
        entry.update(status="skipped: time budget")
    else:
        try:
            fn()
            _sync(dev)
            t = harness.time_call(fn, dev, warmup=0, repeats=1 if rep.plan.mode == "cpu-smoke" else 5)
            entry.update(status="ok", ms=t["median_ms"], times_ms=t["times_ms"], timer=t["timer"])
        except Exception as exc:  # noqa: BLE001 - timings never fail the script
            entry.update(status="error", error=_err_text(exc))
    ms = entry.get("ms")
    print(f"  {name:62s} {'%.3f ms' % ms if ms is not None else entry['status'][:100]}", flush=True)
    return entry


def _memory(rep: Report, entry: dict, fn: Callable) -> None:
    """Peak memory of one more call (harness.measure_peak), after all timings of the section."""
    if entry.get("status") != "ok":
        return
    if rep.over_budget():
        entry["memory_status"] = "skipped: time budget"
        return
    try:
        entry["peak_bytes"] = harness.measure_peak(fn, rep.plan.device)["peak_bytes"]
    except Exception as exc:  # noqa: BLE001
        entry["memory_status"] = f"error: {_err_text(exc)}"


def time_conv_micro(rep: Report, tf32_pass: bool) -> None:
    plan, dev = rep.plan, rep.plan.device
    c, b, hw = plan.conv_micro["c"], plan.conv_micro["b"], plan.conv_micro["hw"]
    shape = f"B={b} {c}->{c} {hw}x{hw} 3x3 pad 1 K=1 float32"
    rep.header(f"timing: fused conv-dot vs {'cuDNN' if dev.type == 'cuda' else 'torch'} ({shape})"
               + (" - TF32 on for cuDNN" if tf32_pass else ""))
    torch.manual_seed(0)
    x = torch.randn(b, c, hw, hw, device=dev)
    v = torch.randn(1, c, c, 3, 3, device=dev)
    delta = torch.randn(b, c, hw, hw, device=dev)
    conv = "cudnn" if dev.type == "cuda" else "torch"
    tf = " (TF32 on)" if tf32_pass else ""
    rows = {}
    if not tf32_pass:
        reasons = harness.impl_reasons(dev)
        compiled = "cuda" if dev.type == "cuda" else "cpu"
        kern = None
        if reasons["triton"] is None:
            from iwd_fast import kernels as kern
        rows["triton"] = _time(rep, "conv_micro", "triton fused conv-dot (iwd_fast.kernels.conv_dot)",
                               lambda: kern.conv_dot(x, v, delta, 1, 1, 1, 1), reasons["triton"], shape=shape,
                               tf32=False)
        rows["compiled"] = _time(rep, "conv_micro", f"{compiled} fused conv-dot (torch.ops.iwd_fast.conv_dot)",
                                 lambda: _ops.conv_dot(x, v, delta, 1, 1, 1, 1), reasons[compiled], shape=shape,
                                 tf32=False)
    set_tf32(tf32_pass)
    try:
        rows["alone"] = _time(rep, "conv_micro", f"{conv} conv2d(x, V) alone{tf}",
                              lambda: F.conv2d(x, v[0], None, 1, 1), shape=shape, tf32=tf32_pass)
        rows["unfused"] = _time(rep, "conv_micro", f"{conv} conv2d + mul + sum, unfused (eager_ops.conv_dot){tf}",
                                lambda: eager_ops.conv_dot(x, v, delta, (1, 1), (1, 1), (1, 1), 1), shape=shape,
                                tf32=tf32_pass)
    finally:
        set_tf32(False)
    ms = {k: r.get("ms") for k, r in rows.items()}
    if tf32_pass:
        fused = {k: r.get("ms") for k, r in rep.micro_rows.items()}
        for key, label in (("triton", "triton"), ("compiled", "cuda" if dev.type == "cuda" else "cpu")):
            value = None if fused.get(key) is None or ms.get("alone") is None else fused[key] / ms["alone"]
            rep.target(f"conv-dot: {label} fused / cuDNN conv2d alone with TF32 on", value, section="conv_micro")
        return
    rep.micro_rows = rows
    ratio = lambda a, b: None if ms.get(a) is None or ms.get(b) is None else ms[a] / ms[b]  # noqa: E731
    rep.target("conv-dot: triton fused / conv2d alone", ratio("triton", "alone"), 1.15, "<=", section="conv_micro")
    rep.target("conv-dot: unfused / triton fused", ratio("unfused", "triton"), 1.5, ">=", section="conv_micro")
    compiled = "cuda" if dev.type == "cuda" else "cpu"
    rep.target(f"conv-dot: {compiled} fused / conv2d alone", ratio("compiled", "alone"), section="conv_micro")
    rep.target(f"conv-dot: unfused / {compiled} fused", ratio("unfused", "compiled"), section="conv_micro")


def time_model(rep: Report, key: str, spec: dict, quick: bool) -> None:
    import grad_dot_paths as gp  # the paths of bench_grad_dot.py: plain, capture+X, grad_dot X, anchors

    plan, dev = rep.plan, rep.plan.device
    family = "convnet" if spec["net"] == "convnet" else "resnet18"
    mspec = gp.ModelSpec(key, spec["net"], family, 3, spec["im"], spec["batch"], spec["width"],
                         3 if family == "convnet" else 0, spec["norm"], repeats=2)
    rep.header(f"timing: {key} (B={spec['batch']}, width {spec['width']}, float32, K={plan.k}, TF32 off)")
    inp = gp.make_inputs(mspec, plan.k, 0, dev)
    reasons = dict(harness.impl_reasons(dev))
    reasons.update({i: why for i, why in plan.skip.get("timing", {}).items() if reasons.get(i) is None})
    paths = [p for p in gp.build_paths(inp, reasons, anchors=True) if not (quick and p.kind == "capture_norm")]
    rows = {p.name: _time(rep, "model", p.name, p.fn, None if p.status == "ok" else (p.reason or p.status),
                          model=key, batch=spec["batch"], kind=p.kind, impl=p.impl, tf32=False) for p in paths}
    for p in paths:  # after all timing (harness.measure_peak); CUDA: torch.cuda.max_memory_allocated
        _memory(rep, rows[p.name], p.fn)
    base, vmap = rows.get("plain fwd+bwd", {}), rows.get("grad_dot reference", {})
    for r in rows.values():
        if r.get("ms") is not None and base.get("ms"):
            r["ratio_to_plain"] = r["ms"] / base["ms"]
        if r.get("peak_bytes") and base.get("peak_bytes"):
            r["mem_ratio_to_plain"] = r["peak_bytes"] / base["peak_bytes"]
        if r.get("ms") and vmap.get("ms"):
            r["speedup_vs_vmap_grad"] = vmap["ms"] / r["ms"]
    for p in paths:  # capture+X and, where the package has it, capture streamed+X
        if p.kind != "capture" or p.impl in plan.skip.get("timing", {}) or p.status != "ok":
            continue
        r = rows[p.name]
        rep.target(f"{key}: {p.name} time / plain fwd+bwd", r.get("ratio_to_plain"), 1.4, "<=", section="model",
                   model=key)
        rep.target(f"{key}: {p.name} peak memory / plain fwd+bwd", r.get("mem_ratio_to_plain"), 1.2, "<=",
                   section="model", model=key)
        rep.target(f"{key}: {p.name} speedup vs vmap(grad)", r.get("speedup_vs_vmap_grad"), section="model",
                   model=key)
    if not quick and dev.type == "cuda":
        set_tf32(True)
        try:
            plain = rows["plain fwd+bwd"]
            r = _time(rep, "model", "plain fwd+bwd (TF32 on)", next(p.fn for p in paths if p.name == "plain fwd+bwd"),
                      model=key, batch=spec["batch"],
                      kind="baseline", impl=None, tf32=True)
            if r.get("ms") and plain.get("ms"):
                r["ratio_to_plain"] = r["ms"] / plain["ms"]
        finally:
            set_tf32(False)
    del inp, paths
    if dev.type == "cuda":
        torch.cuda.empty_cache()
