"""GPU check of iwd_fast: every GPU backend against float64 oracles, then timings. One JSON, tables.

    bash benchmarks/gpu_check.sh                  # on the GPU machine: build with CUDA, then this script
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json          # package already built
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --cpu-smoke --out /tmp/x.json  # plumbing, on CPU

Correctness (always runs in full; any FAIL or ERROR gives exit code 1; TF32 off, cudnn deterministic):

* Model level, ConvNet-3 (width 128, GroupNorm(C, C), B=64) and ResNet-18 (CIFAR, GroupNorm, B=16),
  32x32x3, K=1 direction, float32 on the GPU. Weights, inputs and directions are drawn in float32 on
  CPU, so their float64 copies are exact. Paths, per usable hook impl X (torch, cuda, triton):
  one ``iwd_fast.capture`` forward+backward queried by every X (cap.grad_dot, cap.grad_norm_sq: the
  kernels see identical inputs), the streamed capture (``capture(net, directions=v, impl=X)``, when
  the package has it), functional ``grad_dot`` / ``grad_norm_sq`` with impl=X, and ``grad_dot`` jvp.
  Budget (STYLE habit 6): max abs error vs the float64 reference <= 2 * (error of plain float32
  ``impl="reference"`` on the GPU) + 1e-6 * max|ref|.
  ReLU kinks: a pre-activation within rounding of 0 lands on the other side in float32 (measured on
  CPU: one sample in 64 on ConvNet-3, two in 16 on ResNet-18), changing that sample's score by
  percents: a different function, not an arithmetic error. So both references are taken on the
  function the float32 batched forward computes: its ReLU sign pattern is frozen (ReLU(z) = z * mask,
  the pattern packed into the input so that vmap maps over it) and ``grad_dot`` / ``grad_norm_sq``
  with impl="reference" run on that frozen twin of the network, in float64 (the reference; on CPU
  unless --ref-device cuda) and in float32 on the GPU (the plain baseline). Every path's own forwards
  are watched: samples whose sign pattern differs from the frozen one (none expected: the forward is
  deterministic) are left out of its error and counted. For information: the error of the unfrozen
  float32 reference (models.*.plain_err_unfrozen), and for each kernel impl on the shared capture its
  largest difference from the eager torch impl on the same tensors (max_abs_diff_vs_torch_impl).
* Layer level: conv_dot, linear_dot, affine_dot, linear_grad_norm_sq of the "cuda" (iwd_fast.scoring.backends.compiled_ops)
  and "triton" (iwd_fast.scoring.backends.triton_ops) backends on odd shapes (B=7, 33->65 and 34->66 channels, 17x19,
  stride 2, dilation 2, groups 1/2, 1x1, K=3, channels-last and strided inputs) in float32, float16,
  bfloat16 (and float64 for cuda), with the budget of tests/test_triton_kernels.py:
  |fast - ref64| <= 2 |torch32 - ref64| + 4 u32 mag (ref64: the reference formula on the exact float64
  copies of the rounded inputs; torch32: the same formula in float32 on them, on the GPU; mag: the op
  on absolute values); float64: gamma_n * mag.

Timings (CUDA: benchmarks/harness.py, i.e. triton.testing.do_bench; CPU smoke: perf_counter) never
fail the script; once --time-budget seconds have passed the rest is recorded "skipped: time budget":

* conv 128->128 3x3 pad 1, B=256, 32x32, K=1, float32: fused Triton conv-dot, fused CUDA conv-dot,
  cuDNN conv2d(x, V) alone, cuDNN conv2d + mul + sum (reference.conv_dot, unfused), TF32 off (the
  kernels compute in IEEE float32); then cuDNN with TF32 on, for information. Targets:
  triton / conv-alone <= 1.15, unfused / triton >= 1.5.
* ConvNet-3 (B=256) and ResNet-18 (B=64): the paths of benchmarks/grad_dot_paths.py (plain fwd+bwd,
  capture+X, capture streamed+X, capture norm_sq+X, grad_dot X, vmap(grad) reference, jvp, Opacus and
  BackPACK when installed): median time, peak memory (torch.cuda.max_memory_allocated), ratios to
  plain fwd+bwd and to vmap(grad). Targets: capture time <= 1.4x plain, peak memory <= 1.2x plain.

--quick: ResNet-18 correctness at B=8; no ResNet-18, norm-path or TF32-on timings.
--cpu-smoke: the same code on CPU with tiny shapes (width 8, B=4, 16x16, K=1; ResNet-18 at width 16),
impls torch, cpu and triton (the latter only under TRITON_INTERPRET=1, and only on ConvNet-3 and the
layer ops: the interpreter needs about a minute per ResNet-18 call).
Imports only torch, numpy (through torch), triton and iwd_fast's core modules (not tqdm, matplotlib,
scikit-learn, scipy, safetensors), so it runs where only the GPU stack is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if importlib.util.find_spec("iwd_fast") is None:  # not installed: run from the source tree
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import harness  # noqa: E402
from iwd_fast.scoring import dispatch as _dispatch  # noqa: E402
import iwd_fast  # noqa: E402

from gpu_check_common import ERROR, FAIL, PASS, Report, _err_text, _fmt, set_tf32, tf32_state  # noqa: E402
from gpu_check_layers import check_layers  # noqa: E402
from gpu_check_models import check_model  # noqa: E402
from gpu_check_timing import time_conv_micro, time_model  # noqa: E402


def _ensure_kernels_module() -> Optional[str]:
    """Make ``iwd_fast.kernels`` importable when the package was not pip-installed (source tree or a
    ``setup.py build_ext --inplace`` build): the kernels live in REPO/kernels (setup.py's package_dir)."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        if importlib.util.find_spec("iwd_fast.kernels") is not None:
            return None
        init = REPO / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location("iwd_fast.kernels", init,
                                                      submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["iwd_fast.kernels"] = module
        spec.loader.exec_module(module)
        iwd_fast.kernels = module
        return "iwd_fast.kernels loaded from the source tree (package not installed)"
    except Exception as exc:  # noqa: BLE001 - reported, the triton backend is then unavailable
        sys.modules.pop("iwd_fast.kernels", None)
        return f"iwd_fast.kernels failed to load: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    mode: str                       # "gpu" | "cpu-smoke"
    device: torch.device
    ref_device: torch.device
    models: Dict[str, dict]         # correctness models
    timing_models: Dict[str, dict]
    conv_micro: dict                # B, C, HW for the conv-dot micro-benchmark
    layer_dtypes: Dict[str, tuple]  # backend -> dtypes
    hook_impls: List[str]           # usable hook impls on the device
    skip: Dict[str, Dict[str, str]]  # "<model>:capture" / "<model>:functional" / "timing" -> {impl: why not run}
    k: int


def make_plan(args) -> Plan:
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    ref_device = torch.device(args.ref_device)
    skip: Dict[str, Dict[str, str]] = {}
    if smoke:
        # 16x16, not 8x8: at 8x8 ConvNet-3's last InstanceNorm sees 2x2 values and ResNet-18's last GroupNorm
        # 2 values per group, so two float32 computations differ by O(1) relative (measured): no oracle
        # check means anything there. ResNet-18 at width 16: at width 8 its last GroupNorms still see 8
        # values and plain float32 errors swing 5x between seeds.
        models = {"convnet3": dict(net="convnet", width=8, norm="instancenorm", batch=4, im=16),
                  "resnet18": dict(net="resnet18", width=16, norm="groupnorm", batch=4, im=16)}
        timing = {k: dict(m) for k, m in models.items()}
        slow = "skipped in --cpu-smoke: the Triton interpreter takes about a minute per call of this model"
        skip = {"resnet18:capture": {"triton": slow}, "resnet18:functional": {"triton": slow},
                "timing": {"triton": "skipped in --cpu-smoke: the Triton interpreter (timed in the conv "
                                     "micro-benchmark only)"}}
        micro = dict(b=4, c=8, hw=8)
        dtypes = {"cpu": (torch.float32, torch.float64), "triton": (torch.float32, torch.float16, torch.bfloat16)}
    else:
        models = {"convnet3": dict(net="convnet", width=128, norm="instancenorm", batch=64, im=32),
                  "resnet18": dict(net="resnet18", width=64, norm="groupnorm", batch=8 if args.quick else 16,
                                   im=32)}
        timing = {"convnet3": dict(models["convnet3"], batch=256)}
        if not args.quick:
            timing["resnet18"] = dict(models["resnet18"], batch=64)
        micro = dict(b=256, c=128, hw=32)
        dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                  "triton": (torch.float32, torch.float16, torch.bfloat16)}
    reasons = harness.impl_reasons(device)
    hooks = [i for i in _dispatch.HOOK_IMPLS if reasons[i] is None]
    return Plan("cpu-smoke" if smoke else "gpu", device, ref_device, models, timing, micro, dtypes, hooks, skip,
                args.k)


# ------------------------------------------------------------------------------------------ output

def print_tables(rep: Report) -> None:
    print("\n## correctness\n")
    rows = [(c["name"], c["status"], _fmt(c.get("err"), ".2e"), _fmt(c.get("allowed"), ".2e"),
             _fmt(c.get("plain_err"), ".2e"), c.get("excluded_samples", ""), (c.get("error") or "")[:80])
            for c in rep.checks]
    print(harness.markdown_table(["check", "status", "err", "allowed", "plain err", "excluded", "error"], rows))
    if rep.timings:
        print("\n## timings\n")
        rows = [(t.get("model", t["section"]), t["name"], _fmt(t.get("ms"), ".3f"),
                 _fmt(t.get("ratio_to_plain"), ".2f"),
                 _fmt(t.get("peak_bytes") / harness.MB if t.get("peak_bytes") else None, ".1f"),
                 _fmt(t.get("mem_ratio_to_plain"), ".2f"), _fmt(t.get("speedup_vs_vmap_grad"), ".2f"),
                 t["status"][:60]) for t in rep.timings]
        print(harness.markdown_table(["model", "path", "ms", "x plain", "peak MB", "mem x plain", "x faster than vmap",
                                      "status"], rows))
    if rep.targets:
        print("\n## targets\n")
        rows = [(t["name"], _fmt(t["value"], ".3f"), f"{t['op']} {t['threshold']}", t["status"]) for t in rep.targets]
        print(harness.markdown_table(["target", "value", "threshold", "status"], rows))


def environment(plan: Plan, kernels_note: Optional[str]) -> dict:
    from iwd_fast.scoring.backends import compiled_ext as _ext

    env = harness.environment(plan.device)
    env["mode"] = plan.mode
    env["availability"] = {str(d): {k: ("ok" if w is None else w) for k, w in harness.impl_reasons(d).items()}
                           for d in {plan.device, torch.device("cpu")}}
    env["extension"] = {k: list(v) for k, v in _ext.status().items()}
    env["kernels_module"] = kernels_note or "installed"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    env["build_seconds"] = os.environ.get("GPU_CHECK_BUILD_S")
    env["reference_device"] = str(plan.ref_device)
    env["tf32_during_checks"] = tf32_state()
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        env["cuda_capability"] = f"{props.major}.{props.minor}"
        env["cuda_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (head benchmarks/gpu_check.py) for what is checked.")
    ap.add_argument("--out", default=str(harness.RESULTS_DIR / "gpu_check.json"), help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="smaller ResNet-18 check, fewer timings")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on CPU (impls torch, cpu, and triton if TRITON_INTERPRET=1): proves the plumbing")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds after which remaining timings are skipped (correctness always runs); default 420")
    ap.add_argument("--ref-device", default="cpu",
                    help="device of the float64 references (default cpu: about 25 s on 16 cores; 'cuda' is faster)")
    ap.add_argument("--k", type=int, default=1, help="directions at model level (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; use --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        # Tiny shapes: one thread. Two OpenMP threads on a busy 2-core machine stall at every barrier
        # (measured: a ResNet-18 forward+backward took 2.3 s with 2 threads, 20 ms with 1).
        torch.set_num_threads(1)
    kernels_note = _ensure_kernels_module()
    set_tf32(False)
    plan = make_plan(args)
    rep = Report(plan, args.time_budget)
    env = environment(plan, kernels_note)
    print(f"# iwd_fast gpu_check ({plan.mode}) on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
          f"hook impls {plan.hook_impls}", flush=True)
    for impl, why in env["availability"][str(plan.device)].items():
        print(f"  {impl:10s} {why}")

    if plan.mode == "gpu":  # the point of the run: both GPU kernel backends must be there
        for impl in ("cuda", "triton"):
            why = env["availability"]["cuda"][impl]
            rep.check(dict(section="availability", name=f"backend {impl} usable on cuda", impl=impl,
                           status=PASS if why == "ok" else FAIL, error=None if why == "ok" else why))

    torch.backends.cudnn.deterministic = True
    for key, spec in plan.models.items():
        try:
            check_model(rep, key, spec, args.seed)
        except Exception as exc:  # noqa: BLE001
            rep.check(dict(section="model", name=f"{key} (setup)", status=ERROR, error=_err_text(exc)))
    try:
        check_layers(rep, args.seed)
    except Exception as exc:  # noqa: BLE001
        rep.check(dict(section="layer", name="layer ops (setup)", status=ERROR, error=_err_text(exc)))
    torch.backends.cudnn.deterministic = False
    correctness_s = rep.elapsed()

    sections = [("conv micro", lambda: time_conv_micro(rep, False))]
    sections += [(f"model {k}", lambda k=k, s=s: time_model(rep, k, s, args.quick))
                 for k, s in plan.timing_models.items()]
    for key in plan.models:
        if key not in plan.timing_models:
            rep.timings.append(dict(section="model", model=key, name=f"model {key}", status="skipped: --quick"))
    if not args.quick and plan.device.type == "cuda":
        sections.append(("conv micro TF32", lambda: time_conv_micro(rep, True)))
    save(rep, env, args, correctness_s, done=False)
    for label, run in sections:
        if rep.over_budget():
            rep.timings.append(dict(section=label, name=label, status="skipped: time budget"))
            rep.header(f"timing: {label}: skipped (time budget)")
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001
            rep.timings.append(dict(section=label, name=label, status="error", error=_err_text(exc)))
            print(f"  {label}: ERROR {_err_text(exc)[:300]}", flush=True)
        save(rep, env, args, correctness_s, done=False)

    print_tables(rep)
    summary = save(rep, env, args, correctness_s, done=True)
    print(f"\n# correctness {summary['correctness']}: {summary['checks'] - summary['failed']}/{summary['checks']} "
          f"checks pass; correctness {summary['correctness_s']} s, total {summary['elapsed_s']} s; wrote {args.out}")
    return 0 if summary["correctness"] == PASS else 1


def save(rep: Report, env: dict, args, correctness_s: float, done: bool) -> dict:
    """Write the JSON (also after every timing section, so a run cut short keeps what it measured)."""
    failed = [c for c in rep.checks if c["status"] != PASS]
    summary = dict(correctness=PASS if not failed and rep.checks else FAIL, checks=len(rep.checks), failed=len(failed),
                   failed_names=[c["name"] for c in failed], correctness_s=round(correctness_s, 1),
                   elapsed_s=round(rep.elapsed(), 1), time_budget_s=args.time_budget, complete=done,
                   impls_checked=sorted({c["impl"] for c in rep.checks if c.get("impl")}),
                   targets_missed=[t["name"] for t in rep.targets if t["status"] == "MISS"])
    result = dict(schema="iwd_fast.gpu_check/1", summary=summary, environment=env, checks=rep.checks,
                  timings=rep.timings, targets=rep.targets, models=rep.models)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)
    return summary


if __name__ == "__main__":
    sys.exit(main())
