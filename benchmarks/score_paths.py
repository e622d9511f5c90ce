"""The timed paths of ``bench_score.py``: ways of scoring one segment of a dataset, all over the same
in-memory images, batch by batch.

Every path takes a segment (images [n, C, H, W], labels [n], held-out positions inside it) and does the
whole job of that segment:

* ``plain fwd+bwd``: forward, mean cross entropy, backward to the parameters, per batch: the unit.
* ``validation <impl>``: ``iwd_fast.score_dataset(..., "validation")``: the held-out gradient (10% of the
  segment, stratified), then every instance's dot with it. impl = every usable hook impl, ``jvp``, and
  ``reference`` (torch.func vmap(grad), then the dot).
* ``direction K=<k> <impl>``: the scoring pass alone with k fixed directions (the K = 8 comparison).
* ``self <impl>``: streamed squared norms (self-influence); ``reference`` = vmap(grad), then the norms.
* ``opacus validation`` / ``opacus self``: the held-out gradient by a plain backward, then Opacus
  per-sample gradients (GradSampleModule) and the dot (or the norms).
* ``backpack validation``: the same with BackPACK BatchGrad (reported unavailable where BackPACK cannot
  handle the network).

``check(path, x, y)`` is the correctness gate: scores of a few instances against the float64 oracle.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import iwd_fast
from iwd_fast.scoring.dataset import score_dataset

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")

SCALE = 0.01  # validation direction = lr * held-out gradient, as in `iwd-fast score`


@dataclass
class Segment:
    x: torch.Tensor
    y: torch.Tensor
    held: torch.Tensor  # positions inside the segment forming its held-out split


@dataclass
class Path:
    name: str
    kind: str                      # "plain", "validation", "direction", "self"
    impl: Optional[str]
    run: Optional[Callable[[Segment], None]]
    gate: Optional[Callable[[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]], torch.Tensor]] = None
    max_images: Optional[int] = None  # slow anchors: timed on the first segments only
    k: int = 1
    status: str = "ok"
    reason: Optional[str] = None
    times: List[float] = field(default_factory=list)
    images: int = 0


def held_direction(net, seg: Segment) -> Dict[str, torch.Tensor]:
    """SCALE * grad of the mean held-out loss (one plain backward), as score_dataset computes it."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    for s in range(0, seg.held.numel(), 256):
        idx = seg.held[s:s + 256]
        loss = F.cross_entropy(net(seg.x[idx]), seg.y[idx], reduction="sum")
        for acc, g in zip(total, torch.autograd.grad(loss, [p for _, p in named])):
            acc.add_(g)
    return {n: SCALE * t / seg.held.numel() for (n, _), t in zip(named, total)}


def build_paths(net, impls: List[str], batch: int, k: int, slow_images: int, sample_shape) -> List[Path]:
    params = [p for p in net.parameters() if p.requires_grad]
    gdirs = torch.Generator().manual_seed(11)
    fixed = [{n: torch.randn(p.shape, generator=gdirs) * 1e-3 for n, p in net.named_parameters()} for _ in range(k)]

    def plain(seg: Segment) -> None:
        for s in range(0, seg.x.shape[0], batch):
            loss = F.cross_entropy(net(seg.x[s:s + batch]), seg.y[s:s + batch])
            for p in params:
                p.grad = None
            loss.backward()
        for p in params:
            p.grad = None

    def engine(target: str, impl: str, dirs=None):
        def run(seg: Segment) -> None:
            kwargs = {"validation": seg.held, "scale": SCALE} if target == "validation" else \
                ({"directions": dirs} if target == "direction" else {})
            score_dataset(net, (seg.x, seg.y), target, batch_size=batch, impl=impl, **kwargs)

        def gate(x, y, v):
            kw = {"directions": v} if target != "self" else {}
            return score_dataset(net, (x, y), "direction" if target != "self" else "self", batch_size=batch,
                                 impl=impl, **kw).scores
        return run, gate

    paths = [Path("plain fwd+bwd", "plain", None, plain)]
    for impl in impls + ["jvp", "reference"]:
        run, gate = engine("validation", impl)
        slow = slow_images if impl in ("jvp", "reference") else None
        paths.append(Path(f"validation {impl}", "validation", impl, run, gate, max_images=slow))
    best = impls[0]
    for kk, dirs in ((1, fixed[0]), (k, fixed)):
        run, gate = engine("direction", best, dirs)
        paths.append(Path(f"direction K={kk} {best}", "direction", best, run, gate, k=kk))
    for impl in impls + ["reference"]:
        run, gate = engine("self", impl)
        paths.append(Path(f"self {impl}", "self", impl, run, gate, max_images=slow_images if impl == "reference" else None))
    paths += [_opacus(net, batch, "validation", slow_images), _opacus(net, batch, "self", slow_images),
              _backpack(net, batch, slow_images, sample_shape)]
    return paths


def _dot(grads: Dict[str, torch.Tensor], v: Dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(grads[n].flatten(1) @ v[n].flatten().to(grads[n].dtype) for n in v if n in grads)


def _opacus(net, batch: int, target: str, slow_images: int) -> Path:
    name = f"opacus {target}"
    try:
        from opacus import GradSampleModule
        # Opacus records activations in training mode only; the networks here have no batch-coupled layer
        # (GroupNorm), so train and eval mode compute the same function.
        model = GradSampleModule(copy.deepcopy(net).train(), batch_first=True, loss_reduction="sum")
    except Exception as err:  # noqa: BLE001 - an anchor that cannot run is reported, not fatal
        return Path(name, target, "opacus", None, status="unavailable", reason=f"{type(err).__name__}: {err}"[:160])
    named = [(n, p) for n, p in model._module.named_parameters() if p.requires_grad]

    def per_sample(x, y) -> Dict[str, torch.Tensor]:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        grads = {n: p.grad_sample for n, p in named}
        model.zero_grad(set_to_none=True)
        return grads

    def scores(x, y, v) -> torch.Tensor:
        g = per_sample(x, y)
        return _dot(g, v) if v is not None else sum(t.flatten(1).pow(2).sum(1) for t in g.values())

    def run(seg: Segment) -> None:
        v = held_direction(net, seg) if target == "validation" else None  # a plain copy: no Opacus hooks
        for s in range(0, seg.x.shape[0], batch):
            scores(seg.x[s:s + batch], seg.y[s:s + batch], v)

    return Path(name, target, "opacus", run, lambda x, y, v: scores(x, y, v if target != "self" else None),
                max_images=slow_images)


def _backpack(net, batch: int, slow_images: int, sample_shape) -> Path:
    name = "backpack validation"
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError as err:
        return Path(name, "validation", "backpack", None, status="unavailable", reason=f"not installed ({err})")
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    try:
        model = extend(copy.deepcopy(net))
    except Exception as err:  # noqa: BLE001
        return Path(name, "validation", "backpack", None, status="unavailable",
                    reason=f"extend: {type(err).__name__}: {str(err)[:160]}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def scores(x, y, v) -> torch.Tensor:
        with backpack(BatchGrad()):
            loss_fn(model(x), y).backward()
        grads = {n: p.grad_batch for n, p in named}
        for _, p in named:
            del p.grad_batch
            p.grad = None
        return _dot(grads, v)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores(torch.zeros(2, *sample_shape), torch.zeros(2, dtype=torch.long),
                   {n: torch.zeros_like(p) for n, p in named})
            failure = None
        except Exception as err:  # noqa: BLE001
            failure = f"{type(err).__name__}: {str(err)[:120]}"
    missing = sorted({str(w.message).split("Module <class '")[-1].split("'>")[0]
                      for w in caught if "does not have an extension" in str(w.message)})
    missing = [m for m in missing if m.startswith("torch.nn.")]  # the layers with parameters, not containers
    if missing or failure:
        why = f"BackPACK 1.7 has no BatchGrad extension for {', '.join(missing)}" if missing else failure
        return Path(name, "validation", "backpack", None, status="unavailable", reason=why)

    def run(seg: Segment) -> None:
        v = held_direction(net, seg)
        for s in range(0, seg.x.shape[0], batch):
            scores(seg.x[s:s + batch], seg.y[s:s + batch], v)

    return Path(name, "validation", "backpack", run, scores, max_images=slow_images)


def check(path: Path, net, x: torch.Tensor, y: torch.Tensor, tol: float = 1e-3) -> None:
    """Gate: scores of ``x`` against the float64 oracle; a path off by more than ``tol`` (relative to the
    largest score) is marked WRONG and not timed. Dots use one fixed random direction."""
    if path.gate is None or path.status != "ok":
        return
    g = torch.Generator().manual_seed(5)
    v = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in net.named_parameters()}
    net64 = copy.deepcopy(net).double().eval()
    x64 = x.double()
    if path.kind == "self":
        ref = iwd_fast.grad_norm_sq(net64, x64, y, impl="reference")
    else:
        ref = iwd_fast.grad_dot(net64, x64, y, {n: t.double() for n, t in v.items()}, impl="reference")
    try:
        got = path.gate(x, y, v if path.kind != "self" else None).double()
    except Exception as err:  # noqa: BLE001 - a path that raises is reported with its error
        path.status, path.reason = "error", f"{type(err).__name__}: {str(err)[:160]}"
        return
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    path.reason = f"max rel err vs float64 oracle {err:.1e} on {x.shape[0]} instances"
    if not err <= tol:
        path.status = "WRONG"
