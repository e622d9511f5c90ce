"""GPU check, stage 2: layer-level correctness of the cuda and triton layer ops on odd shapes and
every dtype, with the error budget of tests/scoring/test_triton_kernels.py."""
from __future__ import annotations

from typing import List

import torch

from iwd_fast.scoring import dispatch as _dispatch, eager_ops

from gpu_check_common import _err_text, _sync, DTYPE_NAMES, ERROR, FAIL, HALF, PASS, Report, U32, U64


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
        spec_op = getattr(eager_ops, case["op"])
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
