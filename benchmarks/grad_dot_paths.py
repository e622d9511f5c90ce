"""Models, inputs, timed paths and the correctness check of ``bench_grad_dot.py``.

A path is one way of getting s_i = <grad loss_i, v> (or ||grad loss_i||^2) for a batch: the plain
forward+backward baseline, the capture path per hook impl, the functional ``iwd_fast.grad_dot`` per
impl, and the Opacus / BackPACK anchors. ``build_paths(inputs, ...)`` makes closures over one set of
inputs, so the same paths can be rebuilt in float64 for the correctness recheck.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import harness
import iwd_fast
from iwd_fast.scoring import dispatch as _dispatch
from iwd_fast.networks import build_network

warnings.filterwarnings("ignore", message="Full backward hook is firing")

# Above this share of samples off in float32, a path is WRONG without a float64 recheck: ReLU-kink
# flips (the reason single samples legitimately differ, see check_paths) touch a few samples (ConvNet-3
# B=256: 1; ResNet-18 B=64: 5), not half of them.
MAX_OUTLIER_SHARE = 0.5
TOL64 = 1e-8  # max |s - s_ref| / max |s_ref| in float64; the paths agree to ~1e-14 there


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


@dataclass
class Inputs:
    net: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    v: dict                         # what the API gets: shaped like the parameters (K=1) or [K, *shape]
    v_stack: dict                   # always [K, *shape]
    k: int

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]


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
    own_bytes: int = 0              # tensors the path holds besides the inputs (an anchor's model copy)
    err: Optional[float] = None     # max over samples of |s - s_ref| / max |s_ref|, float32
    n_outliers: int = 0             # samples above --tol in float32
    err64: Optional[float] = None   # the same on those samples, float64 recheck
    timing: Optional[dict] = None
    memory: Optional[dict] = None


def make_inputs(spec: ModelSpec, k: int, seed: int, device: torch.device) -> Inputs:
    torch.manual_seed(seed)
    net = build_network(spec.network, spec.channels, spec.num_classes, spec.im_size, width=spec.width,
                        depth=spec.depth or 3, norm=spec.norm).to(device)
    x = torch.randn(spec.batch, spec.channels, spec.im_size, spec.im_size, device=device)
    y = torch.randint(0, spec.num_classes, (spec.batch,), device=device)
    v_stack = {n: torch.randn(k, *p.shape, device=device) for n, p in net.named_parameters() if p.requires_grad}
    return Inputs(net, x, y, _api_directions(v_stack, k), v_stack, k)


def as_double(inp: Inputs) -> Inputs:
    v_stack = {n: t.double() for n, t in inp.v_stack.items()}
    return Inputs(copy.deepcopy(inp.net).double(), inp.x.double(), inp.y, _api_directions(v_stack, inp.k),
                  v_stack, inp.k)


def _api_directions(v_stack: dict, k: int) -> dict:
    return {n: t[0] for n, t in v_stack.items()} if k == 1 else v_stack


impl_reasons = harness.impl_reasons  # shared with gpu_check.py


# ----------------------------------------------------------------------------------------- paths

def build_paths(inp: Inputs, reasons: Dict[str, Optional[str]], anchors: bool) -> List[Path]:
    net, x, y, v, params = inp.net, inp.x, inp.y, inp.v, inp.params

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

    def streamed(impl: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with iwd_fast.capture(net, directions=v, impl=impl) as cap:
                grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)  # dots run inside this backward
            del grads
            return cap.grad_dot()
        return run

    def functional(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: iwd_fast.grad_dot(net, x, y, v, impl=impl)

    hook = [i for i in _dispatch.HOOK_IMPLS if reasons[i] is None]
    paths = [Path("plain fwd+bwd", "baseline", None, plain)]
    paths += [Path(f"capture+{i}", "capture", i, capture(i, False), compare="dot") for i in hook]
    paths += [Path(f"capture streamed+{i}", "capture", i, streamed(i), compare="dot") for i in hook]
    paths += [Path(f"capture norm_sq+{i}", "capture_norm", i, capture(i, True), compare="norm") for i in hook]
    paths += [Path(f"grad_dot {i}", "functional", i, functional(i), compare="dot", slow=(i == "reference"))
              for i in ("reference", "jvp", *hook) if reasons[i] is None]
    paths += [Path(f"capture+{i}", "capture", i, None, status="unavailable", reason=reasons[i])
              for i in _dispatch.HOOK_IMPLS if reasons[i] is not None]  # one row per impl not usable here
    if anchors:
        paths += [_opacus_path(inp), _backpack_path(inp)]
    return paths


def _anchor_dot(grads: Dict[str, torch.Tensor], v_stack: dict, batch: int, k: int) -> torch.Tensor:
    s = None
    for name, g in grads.items():
        term = g.reshape(batch, -1) @ v_stack[name].reshape(k, -1).T
        s = term if s is None else s + term
    return s[:, 0] if k == 1 else s


def _opacus_path(inp: Inputs) -> Path:
    try:
        from opacus import GradSampleModule
    except ImportError as err:
        return Path("opacus", "anchor", None, None, status="unavailable", reason=f"opacus not installed ({err})")
    b, k = inp.x.shape[0], inp.k
    try:
        model = GradSampleModule(copy.deepcopy(inp.net), batch_first=True, loss_reduction="mean")
    except Exception as err:  # noqa: BLE001 - an anchor that cannot wrap the model is reported, not fatal
        return Path("opacus", "anchor", None, None, status="unavailable", reason=f"GradSampleModule: {err}")
    named = [(n, p) for n, p in model._module.named_parameters() if p.requires_grad]

    def run() -> torch.Tensor:
        F.cross_entropy(model(inp.x), inp.y).backward()
        s = _anchor_dot({n: p.grad_sample for n, p in named}, inp.v_stack, b, k)
        model.zero_grad(set_to_none=True)  # drops grad_sample and grad: nothing carries into the next call
        return s

    return Path("opacus", "anchor", "GradSampleModule", run, compare="dot", slow=True,
                own_bytes=harness.tensor_bytes(model))


def _backpack_path(inp: Inputs) -> Path:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError as err:
        return Path("backpack", "anchor", None, None, status="unavailable",
                    reason=f"backpack-for-pytorch not installed ({err})")
    b, k = inp.x.shape[0], inp.k
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    reasons = []
    for use_converter in (False, True):
        try:
            model = extend(copy.deepcopy(inp.net), use_converter=use_converter)
        except Exception as err:  # noqa: BLE001
            reasons.append(f"extend(use_converter={use_converter}): {type(err).__name__}: {str(err)[:120]}")
            continue
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def run(model=model, named=named, n=b) -> torch.Tensor:
            with backpack(BatchGrad()):
                loss_fn(model(inp.x[:n]), inp.y[:n]).backward()
            grads = {name: p.grad_batch * n for name, p in named}  # grad_batch of a mean loss carries 1/B
            for _, p in named:
                del p.grad_batch
                p.grad = None
            return _anchor_dot(grads, inp.v_stack, n, k)

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


# ----------------------------------------------------------------------------------------- check

def _per_sample_dev(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[B] max over directions of |out - ref| / max |ref| (float64)."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return ((out - ref).abs() / scale).reshape(out.shape[0], -1).amax(dim=1)


def check_paths(paths: List[Path], inp: Inputs, tol: float, rebuild: Callable[[Inputs], List[Path]]) -> None:
    """Run every path once (its warmup) and compare it with impl="reference"; mark error / wrong paths.

    float32 scores of single samples can legitimately differ between a batched forward (every path
    but the reference) and the reference's per-sample forward: a pre-activation within ~1e-6 of zero
    may land on the other side of a ReLU (seen on ConvNet-3 at B=256: one sample off by 5%, every
    batched path alike, float64 agreeing with the reference). So samples off by more than ``tol`` are
    recomputed in float64 by the same path (``rebuild`` makes the float64 twins) and the path is WRONG
    only if they still disagree there, or if more than MAX_OUTLIER_SHARE of the samples are off.
    """
    ready = [p for p in paths if p.status == "ok"]
    ref = next(p for p in ready if p.name == "grad_dot reference")
    refs = {"dot": ref.fn()}
    if any(p.compare == "norm" for p in ready):
        refs["norm"] = iwd_fast.grad_norm_sq(inp.net, inp.x, inp.y, impl="reference")
    suspects: Dict[str, torch.Tensor] = {}
    for p in ready:
        try:
            out = refs["dot"] if p is ref else p.fn()
        except Exception as err:  # noqa: BLE001 - report and go on with the other paths
            p.status, p.reason = "error", f"{type(err).__name__}: {str(err)[:200]}"
            continue
        if p.compare is None:
            continue
        dev = _per_sample_dev(out, refs[p.compare])
        p.err = float(dev.max())
        bad = (dev > tol).nonzero().flatten()
        p.n_outliers = int(bad.numel())
        if p.n_outliers > MAX_OUTLIER_SHARE * dev.numel():
            p.status, p.reason = "wrong", f"{p.n_outliers}/{dev.numel()} samples off by > {tol:.0e} in float32"
        elif p.n_outliers:
            suspects[p.name] = bad
    if suspects:
        _recheck_float64(paths, inp, suspects, tol, rebuild)


def _recheck_float64(paths, inp, suspects, tol, rebuild) -> None:
    by = {p.name: p for p in paths}
    inp64 = as_double(inp)
    twins = {q.name: q for q in rebuild(inp64)}
    rows = torch.unique(torch.cat(list(suspects.values())))
    where = {int(r): i for i, r in enumerate(rows.tolist())}
    refs = {"dot": iwd_fast.grad_dot(inp64.net, inp64.x[rows], inp64.y[rows], inp64.v, impl="reference")}
    if any(by[n].compare == "norm" for n in suspects):
        refs["norm"] = iwd_fast.grad_norm_sq(inp64.net, inp64.x[rows], inp64.y[rows], impl="reference")
    for name, bad in suspects.items():
        p = by[name]
        try:
            out = twins[name].fn()[bad]  # the whole batch in float64: batch-dependent kernels stay in play
        except Exception as err:  # noqa: BLE001
            p.status, p.reason = "wrong", (f"{p.n_outliers} sample(s) off by up to {p.err:.1e} in float32; "
                                           f"float64 recheck failed: {type(err).__name__}: {str(err)[:120]}")
            continue
        ref = refs[p.compare][[where[int(r)] for r in bad.tolist()]]
        scale = refs[p.compare].abs().max().clamp_min(1e-30)
        p.err64 = float(((out.double() - ref).abs() / scale).max())
        if not p.err64 <= TOL64:
            p.status, p.reason = "wrong", (f"{p.n_outliers} sample(s) off by up to {p.err:.1e} in float32 and "
                                           f"{p.err64:.1e} in float64 (tol {TOL64:.0e})")
        else:
            p.reason = (f"{p.n_outliers} sample(s) off by up to {p.err:.1e} in float32 agree in float64 "
                        f"({p.err64:.1e}): a ReLU-kink flip between batched and per-sample float32 forwards")
