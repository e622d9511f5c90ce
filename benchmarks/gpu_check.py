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
* Layer level: conv_dot, linear_dot, affine_dot, linear_grad_norm_sq of the "cuda" (iwd_fast._ops)
  and "triton" (iwd_fast._triton_ops) backends on odd shapes (B=7, 33->65 and 34->66 channels, 17x19,
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
import copy
import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if importlib.util.find_spec("iwd_fast") is None:  # not installed: run from the source tree
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import iwd_fast  # noqa: E402
from iwd_fast.scoring import dispatch as _dispatch, reference  # noqa: E402
from iwd_fast.scoring.backends import compiled_ops as _ops  # noqa: E402
from iwd_fast.networks import build_network  # noqa: E402

U32 = 2.0 ** -24
U64 = 2.0 ** -53
HALF = (torch.float16, torch.bfloat16)
PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}

warnings.filterwarnings("ignore", message="Full backward hook is firing")


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


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for cuDNN convolutions and CUDA matmuls: the legacy flags (honoured by torch 2.11),
    or the fp32_precision settings of newer torch if the legacy ones are refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.backends.cudnn.allow_tf32 = enabled
            torch.backends.cuda.matmul.allow_tf32 = enabled
        except Exception:  # noqa: BLE001 - torch that only takes the new API
            torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
            torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"


def tf32_state() -> Dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out: Dict[str, object] = {}
        for name, get in (("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                          ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                          ("cudnn.conv.fp32_precision", lambda: torch.backends.cudnn.conv.fp32_precision),
                          ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision)):
            try:
                out[name] = get()
            except Exception as exc:  # noqa: BLE001
                out[name] = f"unreadable: {type(exc).__name__}"
        return out


def _err_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}"[:600] + " | " + "".join(tb[-3:])[-900:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class Report:
    """Everything the run finds; written as one JSON object."""

    def __init__(self, plan: Plan, budget_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.plan = plan
        self.checks: List[dict] = []
        self.timings: List[dict] = []
        self.targets: List[dict] = []
        self.models: Dict[str, dict] = {}
        self.micro_rows: Dict[str, dict] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def header(self, text: str) -> None:
        print(f"\n## {text}   [t = {self.elapsed():.1f} s]", flush=True)

    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline

    def check(self, entry: dict) -> dict:
        self.checks.append(entry)
        tag = entry["status"]
        nums = "" if entry.get("err") is None else (f" err {entry['err']:.3e} <= allowed {entry['allowed']:.3e}"
                                                     if tag == PASS else f" err {entry['err']:.3e} > allowed "
                                                     f"{entry['allowed']:.3e}")
        why = f"  {(entry.get('error') or '')[:300]}" if tag != PASS else ""
        print(f"  [{tag}] {entry['name']}{nums}{why}", flush=True)
        return entry

    def target(self, name: str, value: Optional[float], threshold: Optional[float] = None, op: str = "",
               **extra) -> None:
        """A ratio with its target (PASS/MISS, or n/a when not measured); threshold None: "info"."""
        if threshold is None:
            status = "info"
        elif value is None:
            status = "n/a"
        else:
            status = PASS if (value <= threshold if op == "<=" else value >= threshold) else "MISS"
        self.targets.append(dict(name=name, value=value, threshold=threshold, op=op, status=status, **extra))


# ------------------------------------------------------------------------------------------ model correctness

class FrozenReLU(nn.Module):
    """ReLU with a fixed sign pattern: z * mask (``mask`` is set by FrozenTwin before each call)."""

    def __init__(self):
        super().__init__()
        self.mask: Optional[torch.Tensor] = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.mask


def relu_names(net: nn.Module) -> Dict[nn.Module, str]:
    return {m: n for n, m in net.named_modules() if isinstance(m, nn.ReLU)}


class FrozenTwin(nn.Module):
    """A copy of ``net`` whose ReLUs multiply by a given sign pattern, which travels with the input.

    ``forward(packed)``: packed [N, numel(image) + sum of numel(mask)] = [image | pattern of each ReLU],
    flattened per sample (``pack``). So torch.func vmap in impl="reference" maps over images and
    patterns together, and every sample runs the piecewise-linear branch its pattern names.
    Parameter names are those of ``net`` prefixed with "net.".
    """

    def __init__(self, net: nn.Module, image_shape, mask_shapes: Dict[str, torch.Size]):
        super().__init__()
        self.net = copy.deepcopy(net)
        self.image_shape = tuple(image_shape)
        self.slots: Dict[str, FrozenReLU] = {}
        for parent_name, parent in list(self.net.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    self.slots[name] = FrozenReLU()
                    setattr(parent, child_name, self.slots[name])
        missing = sorted(set(self.slots) ^ set(mask_shapes))
        if missing:
            raise RuntimeError(f"FrozenTwin: sign patterns and ReLUs disagree on {missing}")
        self.mask_shapes = [(n, tuple(mask_shapes[n])) for n in sorted(self.slots)]

    def pack(self, x: torch.Tensor, masks: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.flatten(1)] + [masks[n].flatten(1).to(x.dtype) for n, _ in self.mask_shapes], dim=1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        n, off = packed.shape[0], _numel(self.image_shape)
        x = packed[:, :off].reshape(n, *self.image_shape)
        for name, shape in self.mask_shapes:
            self.slots[name].mask = packed[:, off:off + _numel(shape)].reshape(n, *shape)
            off += _numel(shape)
        try:
            return self.net(x)
        finally:
            for slot in self.slots.values():
                slot.mask = None


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def frozen_reference(net: nn.Module, masks: Dict[str, torch.Tensor], x, y, v, device, dtype) -> tuple:
    """(grad_dot [B] or [B, K], grad_norm_sq [B]) by impl="reference" (torch.func vmap(grad), the package's
    oracle) on the FrozenTwin of ``net`` with the sign patterns ``masks``, in ``dtype`` on ``device``."""
    twin = FrozenTwin(net, x.shape[1:], {n: m.shape[1:] for n, m in masks.items()}).to(device=device, dtype=dtype)
    packed = twin.pack(x.to(device=device, dtype=dtype), {n: m.to(device) for n, m in masks.items()})
    y = y.to(device)
    v = {f"net.{n}": t.to(device=device, dtype=dtype) for n, t in v.items()}
    return (iwd_fast.grad_dot(twin, packed, y, v, impl="reference"),
            iwd_fast.grad_norm_sq(twin, packed, y, impl="reference"))


class SignWatch:
    """Forward hooks on every ReLU of ``net``: records the sign patterns of batched forwards.

    ``frozen=None``: keeps the masks of the forwards it sees (to freeze them). With ``frozen`` given:
    marks in ``self.bad`` [B] the samples whose pattern differs from it, and counts the forwards.
    """

    def __init__(self, net: nn.Module, batch: int, frozen: Optional[Dict[str, torch.Tensor]] = None):
        self.names, self.batch, self.frozen = relu_names(net), batch, frozen
        self.masks: Dict[str, torch.Tensor] = {}
        self.bad: Optional[torch.Tensor] = None
        self.calls = 0
        self._handles: list = []

    def __enter__(self) -> "SignWatch":
        self._handles = [m.register_forward_hook(self._hook) for m in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, module, inputs, output) -> None:
        z = inputs[0]
        if z.dim() == 0 or z.shape[0] != self.batch:  # probe forwards of one sample (target validation)
            return
        mask = (z > 0).detach()
        name = self.names[module]
        self.calls += 1
        if self.frozen is None:
            self.masks[name] = mask
            return
        diff = (mask != self.frozen[name]).reshape(self.batch, -1).any(dim=1).cpu()
        self.bad = diff if self.bad is None else self.bad | diff


def _judge(name: str, out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, excluded: torch.Tensor,
           want_dtype: torch.dtype, **extra) -> dict:
    b = ref64.shape[0]
    o = out.detach().double().cpu().reshape(b, -1)
    r = ref64.detach().double().cpu().reshape(b, -1)
    p = plain.detach().double().cpu().reshape(b, -1)
    keep = ~excluded
    entry = dict(name=name, dtype=DTYPE_NAMES.get(out.dtype, str(out.dtype)), samples=b,
                 excluded_samples=int(excluded.sum()), **extra)
    if o.shape != r.shape or out.dtype != want_dtype:
        entry.update(status=FAIL, error=f"shape {tuple(out.shape)} / dtype {out.dtype}, want {tuple(ref64.shape)} / "
                                        f"{want_dtype}")
        return entry
    if not keep.any():
        entry.update(status=FAIL, error="no sample left to compare (every sample's ReLU pattern differed)")
        return entry
    scale = float(r.abs().max())
    err = float((o - r)[keep].abs().max())
    plain_err = float((p - r)[keep].abs().max())
    allowed = 2.0 * plain_err + 1e-6 * scale
    entry.update(err=err, plain_err=plain_err, scale=scale, allowed=allowed,
                 status=PASS if err <= allowed else FAIL)
    return entry


def check_model(rep: Report, key: str, spec: dict, seed: int) -> None:
    plan = rep.plan
    dev, b, k = plan.device, spec["batch"], plan.k
    rep.header(f"correctness: {key} (B={b}, width {spec['width']}, {spec['im']}x{spec['im']}x3, K={k}) on {dev}")
    torch.manual_seed(seed)
    net = build_network(spec["net"], 3, 10, spec["im"], width=spec["width"], norm=spec["norm"])  # float32, CPU
    x = torch.randn(b, 3, spec["im"], spec["im"])
    y = torch.randint(0, 10, (b,))
    v = {n: torch.randn(k, *p.shape) for n, p in net.named_parameters()}
    if k == 1:
        v = {n: t[0] for n, t in v.items()}
    netd, xd, yd = copy.deepcopy(net).to(dev), x.to(dev), y.to(dev)
    vd = {n: t.to(dev) for n, t in v.items()}
    params = [p for p in netd.parameters() if p.requires_grad]

    t0 = time.monotonic()
    freezer = SignWatch(netd, b)
    with torch.no_grad(), freezer:
        netd(xd)
    frozen = freezer.masks
    net64 = copy.deepcopy(net).double()
    f64 = SignWatch(net64, b)
    with torch.no_grad(), f64:
        net64(x.double())
    kinks = torch.zeros(b, dtype=torch.long)
    for n in frozen:
        kinks += (frozen[n].cpu() != f64.masks[n]).reshape(b, -1).sum(dim=1)
    ref_dot, ref_norm = frozen_reference(net, frozen, x, y, v, plan.ref_device, torch.float64)
    plain_dot, plain_norm = frozen_reference(net, frozen, x, y, v, dev, torch.float32)
    unfrozen_err = None  # information: the float32 reference without frozen signs (kink flips included)
    if plan.mode == "gpu":
        unfrozen = iwd_fast.grad_dot(netd, xd, yd, vd, impl="reference")
        unfrozen_err = float((unfrozen.double().cpu() - ref_dot.cpu()).abs().max())
    impls = [i for i in plan.hook_impls if i not in plan.skip.get(f"{key}:capture", {})]
    functional = [i for i in plan.hook_impls if i not in plan.skip.get(f"{key}:functional", {})]
    rep.models[key] = dict(spec, k=k, capture_impls=impls, functional_impls=functional,
                           skipped={p: plan.skip[f"{key}:{p}"] for p in ("capture", "functional")
                                    if f"{key}:{p}" in plan.skip},
                           relu_units_flipped_fp32_vs_fp64=kinks.tolist(),
                           relu_sign_pattern="frozen from the float32 batched forward on the checked device",
                           reference_device=str(plan.ref_device), references_s=round(time.monotonic() - t0, 2),
                           plain_err_unfrozen=unfrozen_err)
    info = dict(model=key)
    print(f"  references in {rep.models[key]['references_s']} s; ReLU units whose float32 sign differs from float64, "
          f"per sample: {kinks.tolist()} (frozen); unfrozen float32 reference err {_fmt(unfrozen_err, '.3e')}",
          flush=True)
    ref_dot, ref_norm = ref_dot.cpu(), ref_norm.cpu()

    def run(name: str, quantity: str, impl: str, fn: Callable[[], torch.Tensor], path: str) -> None:
        watch = SignWatch(netd, b, frozen)
        try:
            with watch:
                out = fn()
            _sync(dev)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the others
            rep.check(dict(section="model", name=name, impl=impl, path=path, quantity=quantity, status=ERROR,
                           error=_err_text(exc), **info))
            return
        excluded = watch.bad if watch.bad is not None else torch.zeros(b, dtype=torch.bool)
        ref, plain = (ref_dot, plain_dot) if quantity == "grad_dot" else (ref_norm, plain_norm)
        entry = _judge(name, out, ref, plain, excluded, torch.float32, section="model", impl=impl, path=path,
                       quantity=quantity, forwards_watched=watch.calls, **info)
        if watch.calls == 0:
            entry["note"] = "no batched ReLU forward seen: sign patterns not verified"
        rep.check(entry)

    # One capture (one forward + backward), queried by every hook impl: the kernels see identical inputs.
    cap = None
    watch = SignWatch(netd, b, frozen)
    try:
        with watch, iwd_fast.capture(netd) as cap:
            loss = F.cross_entropy(netd(xd), yd)
            grads = torch.autograd.grad(loss, params)
        del grads
        cap_excluded = watch.bad if watch.bad is not None else torch.zeros(b, dtype=torch.bool)
    except Exception as exc:  # noqa: BLE001
        rep.check(dict(section="model", name=f"{key} capture forward+backward", impl=None, path="capture",
                       status=ERROR, error=_err_text(exc), **info))
        cap = None
    eager: Dict[str, torch.Tensor] = {}
    for impl in sorted(impls, key=lambda i: i != "torch"):  # torch first: the others are compared with it
        if cap is None:
            break
        for quantity, query in (("grad_dot", lambda i=impl: cap.grad_dot(vd, impl=i)),
                                ("grad_norm_sq", lambda i=impl: cap.grad_norm_sq(impl=i))):
            name = f"{key} capture {quantity} {impl}"
            try:
                out = query()
                _sync(dev)
            except Exception as exc:  # noqa: BLE001
                rep.check(dict(section="model", name=name, impl=impl, path="capture", quantity=quantity,
                               status=ERROR, error=_err_text(exc), **info))
                continue
            ref, plain = (ref_dot, plain_dot) if quantity == "grad_dot" else (ref_norm, plain_norm)
            entry = _judge(name, out, ref, plain, cap_excluded, torch.float32, section="model", impl=impl,
                           path="capture", quantity=quantity, **info)
            if impl == "torch":
                eager[quantity] = out.detach().double().cpu()
            elif quantity in eager:  # diagnosis: the kernel against eager PyTorch on the very same captured tensors
                entry["max_abs_diff_vs_torch_impl"] = float((out.detach().double().cpu() - eager[quantity]).abs().max())
            rep.check(entry)
    if _capture_streams():
        for impl in impls:
            run(f"{key} capture-streamed grad_dot {impl}", "grad_dot", impl,
                lambda i=impl: _streamed_dot(netd, xd, yd, vd, params, i), "capture-streamed")
    for impl in functional:
        run(f"{key} functional grad_dot {impl}", "grad_dot", impl,
            lambda i=impl: iwd_fast.grad_dot(netd, xd, yd, vd, impl=i), "functional")
        run(f"{key} functional grad_norm_sq {impl}", "grad_norm_sq", impl,
            lambda i=impl: iwd_fast.grad_norm_sq(netd, xd, yd, impl=i), "functional")
    run(f"{key} functional grad_dot jvp", "grad_dot", "jvp",
        lambda: iwd_fast.grad_dot(netd, xd, yd, vd, impl="jvp"), "functional")


def _capture_streams() -> bool:
    """Whether this iwd_fast's capture() takes directions (dots computed inside the backward)."""
    try:
        return "directions" in inspect.signature(iwd_fast.capture).parameters
    except (TypeError, ValueError):
        return False


def _streamed_dot(net, x, y, v, params, impl: str) -> torch.Tensor:
    with iwd_fast.capture(net, directions=v, impl=impl) as cap:
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    del grads
    return cap.grad_dot()


# ------------------------------------------------------------------------------------------ layer correctness

def _out_hw(hw, kernel, stride, padding, dilation):
    return [(s + 2 * p - d * (kk - 1) - 1) // st + 1 for s, kk, st, p, d in zip(hw, kernel, stride, padding, dilation)]


def layer_cases(smoke: bool) -> List[dict]:
    """Odd shapes: (op, label, fp64 args builder -> (args, n_terms), layout)."""
    if smoke:
        convs = [(2, 3, 5, (5, 6), (3, 3), (2, 2), (1, 1), (1, 1), 1, 1, "contiguous"),
                 (2, 4, 6, (5, 6), (3, 3), (1, 1), (1, 1), (2, 2), 2, 1, "channels_last")]
        linears = [(2, 1, 9, 5, 1, "contiguous"), (2, 17, 6, 5, 1, "strided")]
        affines = [(2, 5, 7, 1)]
        norms = [(2, 17, 6, 5, "ghost"), (2, 3, 9, 4, "materialize")]
    else:
        convs = [(7, 33, 65, (17, 19), (3, 3), (2, 2), (1, 1), (1, 1), 1, 3, "contiguous"),
                 (7, 34, 66, (17, 19), (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, "contiguous"),
                 (7, 34, 66, (17, 19), (3, 3), (2, 2), (2, 2), (2, 2), 2, 3, "channels_last"),
                 (7, 33, 65, (17, 19), (1, 1), (2, 2), (0, 0), (1, 1), 1, 3, "contiguous")]
        linears = [(7, 1, 513, 10, 3, "contiguous"), (7, 37, 65, 33, 3, "contiguous"), (7, 37, 65, 33, 3, "strided")]
        affines = [(7, 65, 323, 3)]
        norms = [(7, 37, 65, 33, "ghost"), (7, 37, 65, 33, "materialize"), (7, 1, 513, 10, "materialize")]
    cases = []
    for b, cin, cout, hw, ker, st, pad, dil, g, k, layout in convs:
        def build(b=b, cin=cin, cout=cout, hw=hw, ker=ker, st=st, pad=pad, dil=dil, g=g, k=k):
            ho = _out_hw(hw, ker, st, pad, dil)
            args = [torch.randn(b, cin, *hw), torch.randn(k, cout, cin // g, *ker), torch.randn(b, cout, *ho),
                    list(st), list(pad), list(dil), g]
            return args, (cin // g) * ker[0] * ker[1] * cout * ho[0] * ho[1]
        label = f"B={b} {cin}->{cout} {hw[0]}x{hw[1]} k{ker[0]} s{st[0]} p{pad[0]} d{dil[0]} g{g} K={k} {layout}"
        cases.append(dict(op="conv_dot", label=label, build=build, layout=layout))
    for b, t, d, p, k, layout in linears:
        def build(b=b, t=t, d=d, p=p, k=k):
            return [torch.randn(b, t, d), torch.randn(k, p, d), torch.randn(b, t, p)], t * d * p
        cases.append(dict(op="linear_dot", label=f"B={b} T={t} d={d} p={p} K={k} {layout}", build=build, layout=layout))
    for b, c, p, k in affines:
        def build(b=b, c=c, p=p, k=k):
            return [torch.randn(b, c, p), torch.randn(k, c), torch.randn(b, c, p), torch.randn(k, c)], 2 * c * p
        cases.append(dict(op="affine_dot", label=f"B={b} C={c} P={p} K={k} bias+weight", build=build,
                          layout="contiguous"))
    for b, t, d, p, method in norms:
        def build(b=b, t=t, d=d, p=p, method=method):
            return [torch.randn(b, t, d), torch.randn(b, t, p), method], t * t * (d + p) + t * d * p
        cases.append(dict(op="linear_grad_norm_sq", label=f"B={b} T={t} d={d} p={p} {method}", build=build,
                          layout="contiguous"))
    return cases


def _place(t, dtype, device, layout):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.to(dtype).to(device)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # the same values, every other element of a wider buffer
        buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
        buf[..., 0].copy_(t)
        return buf[..., 0]
    return t


def check_layers(rep: Report, seed: int) -> None:
    plan = rep.plan
    rep.header(f"correctness: layer ops on {plan.device}")
    backends = {}
    for impl in plan.layer_dtypes:
        try:
            backends[impl] = _dispatch.layer_ops(impl, plan.device)
        except Exception as exc:  # noqa: BLE001
            rep.check(dict(section="layer", name=f"layer ops {impl}: backend", impl=impl, status=ERROR,
                           error=_err_text(exc)))
    for i, case in enumerate(layer_cases(plan.mode == "cpu-smoke")):
        torch.manual_seed(seed + i)
        args64, n_terms = case["build"]()
        args64 = [a * 0.5 if isinstance(a, torch.Tensor) else a for a in args64]
        spec_op = getattr(reference, case["op"])
        for impl, ops in backends.items():
            for dtype in plan.layer_dtypes[impl]:
                name = f"layer {case['op']} {impl} {DTYPE_NAMES[dtype]} [{case['label']}]"
                base = dict(section="layer", name=name, impl=impl, op=case["op"], dtype=DTYPE_NAMES[dtype],
                            shape=case["label"])
                try:
                    args = [_place(a, dtype, plan.device, case["layout"]) for a in args64]
                    fast = getattr(ops, case["op"])(*args)
                    _sync(plan.device)
                    rep.check(_layer_judge(fast, spec_op, args, n_terms, dtype, plan.device, base))
                except Exception as exc:  # noqa: BLE001
                    rep.check(dict(base, status=ERROR, error=_err_text(exc)))


def _layer_judge(fast, op, args, n_terms, dtype, device, base) -> dict:
    """The budget of tests/test_triton_kernels.py (see the module docstring)."""
    cpu = [a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args]
    as64 = [a.double() if isinstance(a, torch.Tensor) else a for a in cpu]
    ref64 = op(*as64)
    mag = float(op(*[a.abs() if isinstance(a, torch.Tensor) else a for a in as64]).abs().max())
    want = torch.float32 if dtype in HALF else dtype
    if fast.dtype != want or tuple(fast.shape) != tuple(ref64.shape):
        return dict(base, status=FAIL, error=f"got {fast.dtype} {tuple(fast.shape)}, want {want} {tuple(ref64.shape)}")
    err = float((fast.detach().double().cpu() - ref64).abs().max())
    if dtype == torch.float64:
        n = n_terms + 2
        allowed, plain_err = n * U64 / (1 - n * U64) * mag, None
    else:
        plain = op(*[a.to(torch.float32) if isinstance(a, torch.Tensor) else a for a in args])  # on the device
        plain_err = float((plain.double().cpu() - ref64).abs().max())
        allowed = 2 * plain_err + 4 * U32 * mag
    return dict(base, err=err, plain_err=plain_err, scale=mag, allowed=allowed,
                status=PASS if err <= allowed else FAIL)


# ------------------------------------------------------------------------------------------ timing

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
        rows["unfused"] = _time(rep, "conv_micro", f"{conv} conv2d + mul + sum, unfused (reference.conv_dot){tf}",
                                lambda: reference.conv_dot(x, v, delta, (1, 1), (1, 1), (1, 1), 1), shape=shape,
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


# ------------------------------------------------------------------------------------------ output

def _fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec)


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
