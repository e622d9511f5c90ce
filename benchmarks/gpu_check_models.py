"""GPU check, stage 1: model-level correctness of every GPU backend against a float64 oracle on the
ReLU-frozen twin of the network (see gpu_check.py's docstring)."""
from __future__ import annotations

import copy
import inspect
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import iwd_fast
from iwd_fast.networks import build_network

from gpu_check_common import _err_text, _fmt, _sync, DTYPE_NAMES, ERROR, FAIL, PASS, Report


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
