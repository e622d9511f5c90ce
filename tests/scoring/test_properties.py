"""Property-based tests (hypothesis): random small architectures, shapes and dtypes, every impl usable on
CPU against the float64 vmap(grad) oracle; and determinism (bitwise-equal scores across calls).

Architectures: Conv2d / Conv1d with random kernel, stride, padding (ints, "valid", "same"), padding
mode, dilation and groups, followed by one of the norm layers (GroupNorm, InstanceNorm, LayerNorm,
eval-mode BatchNorm) or none; Linear over a sequence (leading dims) with LayerNorm; Embedding with or
without padding_idx. Batches of 1 to 5, K of 1 to 3 directions, float64 and float32.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iwd_fast
from iwd_fast.scoring import dispatch

from conftest import error_budget

CPU = torch.device("cpu")
HOOKS = [i for i in ("torch", "cpu") if dispatch.why_not(i, CPU) is None]
TRITON = dispatch.why_not("triton", CPU) is None  # under TRITON_INTERPRET=1 (conftest)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class Mean1(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _conv_geometry(draw, nd):
    g = draw(st.integers(1, 3))
    cin, cout = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    same_ok = all(s == 1 for s in stride) and all(d * (kk - 1) % 2 == 0 for d, kk in zip(dil, k))
    pad_kind = draw(st.sampled_from(["int", "valid"] + (["same"] if same_ok else [])))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(nd)) if pad_kind == "int" else pad_kind
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if pad_kind == "int" else "zeros"
    ints = pad if pad_kind == "int" else (0,) * nd
    sizes = []
    for i in range(nd):
        lo = max(1, dil[i] * (k[i] - 1) + 1 - 2 * ints[i], ints[i] + 1)
        sizes.append(draw(st.integers(lo, lo + 5)))
    conv = (nn.Conv2d if nd == 2 else nn.Conv1d)(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=g,
                                                 bias=draw(st.booleans()), padding_mode=mode)
    return conv, cin, cout, sizes


@st.composite
def architectures(draw):
    """(model in float64, inputs, labels) for one random small architecture."""
    kind = draw(st.sampled_from(["conv2d", "conv1d", "linear_seq", "embedding"]))
    b, classes = draw(st.integers(1, 5)), draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind in ("conv2d", "conv1d"):
        nd = 2 if kind == "conv2d" else 1
        conv, cin, cout, sizes = _conv_geometry(draw, nd)
        x = torch.randn(b, cin, *sizes, generator=g, dtype=torch.float64)
        out_shape = conv.double()(x).shape[1:]
        norm = draw(st.sampled_from(["none", "group", "instance", "layer", "batch_eval"]))
        divisors = [d for d in range(1, cout + 1) if cout % d == 0]
        layer = {"none": nn.Identity(), "group": nn.GroupNorm(draw(st.sampled_from(divisors)), cout),
                 "instance": (nn.InstanceNorm2d if nd == 2 else nn.InstanceNorm1d)(cout, affine=True),
                 "layer": nn.LayerNorm(list(out_shape)),
                 "batch_eval": (nn.BatchNorm2d if nd == 2 else nn.BatchNorm1d)(cout)}[norm]
        if norm == "instance" and all(s == 1 for s in out_shape[1:]):
            layer = nn.Identity()  # instance statistics over one position are undefined
        if norm == "batch_eval":
            layer.running_mean.normal_(generator=g)
            layer.running_var.uniform_(0.5, 2.0, generator=g)
        model = nn.Sequential(conv, layer, nn.Tanh(), nn.Flatten(), nn.Linear(out_shape.numel(), classes))
    elif kind == "linear_seq":
        t, d, p = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
        model = nn.Sequential(nn.Linear(d, p, bias=draw(st.booleans())), nn.LayerNorm(p), nn.Tanh(), Mean1(),
                              nn.Linear(p, classes))
    else:
        vocab, dim, t = draw(st.integers(2, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        pad = draw(st.sampled_from([None, 0, vocab - 1]))
        x = torch.randint(0, vocab, (b, t), generator=g)
        model = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=pad), Mean1(), nn.Linear(dim, classes))
    model = model.double().eval()
    y = torch.randint(0, classes, (b,), generator=g)
    return model, x, y


def directions(model, k, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def in_dtype(model, x, dirs, dtype):
    m = copy.deepcopy(model).to(dtype)
    return m, (x.to(dtype) if x.is_floating_point() else x), {n: v.to(dtype) for n, v in dirs.items()}


@settings(max_examples=40, **SETTINGS)
@given(arch=architectures(), k=st.integers(1, 3), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_every_cpu_impl_matches_the_float64_oracle(arch, k, dtype):
    model, x, y = arch
    dirs = directions(model, k, 1)
    ref = iwd_fast.grad_dot(model, x, y, dirs, impl="reference")
    ref_n = iwd_fast.grad_norm_sq(model, x, y, impl="reference")
    m, xd, dd = in_dtype(model, x, dirs, dtype)
    plain = iwd_fast.grad_dot(m, xd, y, dd, impl="reference")
    plain_n = iwd_fast.grad_norm_sq(m, xd, y, impl="reference")
    for impl in HOOKS + ["jvp"]:
        got = iwd_fast.grad_dot(m, xd, y, dd, impl=impl)
        assert got.shape == ref.shape and got.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10 * max(1.0, ref.abs().max().item()))
        else:
            err, budget = error_budget(got, ref, plain)
            assert err <= budget, (impl, err, budget)
    for impl in HOOKS:
        got = iwd_fast.grad_norm_sq(m, xd, y, impl=impl)
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref_n, rtol=1e-9, atol=1e-12 * max(1.0, ref_n.abs().max().item()))
        else:
            err, budget = error_budget(got, ref_n, plain_n)
            assert err <= budget, (impl, err, budget)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON, reason="triton not usable on CPU tensors here")
@settings(max_examples=6, **SETTINGS)
@given(arch=architectures(), k=st.integers(1, 2))
def test_triton_interpreter_matches_the_oracle(arch, k):
    model, x, y = arch
    m, xd, dd = in_dtype(model, x, directions(model, k, 2), torch.float32)
    ref = iwd_fast.grad_dot(model, x, y, directions(model, k, 2), impl="reference")
    err, budget = error_budget(iwd_fast.grad_dot(m, xd, y, dd, impl="triton"), ref,
                               iwd_fast.grad_dot(m, xd, y, dd, impl="reference"))
    assert err <= budget, (err, budget)


@settings(max_examples=15, **SETTINGS)
@given(arch=architectures())
def test_scores_are_bitwise_identical_across_calls(arch):
    model, x, y = arch
    m, xd, dd = in_dtype(model, x, directions(model, 2, 3), torch.float32)
    for impl in HOOKS + ["jvp"]:
        assert torch.equal(iwd_fast.grad_dot(m, xd, y, dd, impl=impl), iwd_fast.grad_dot(m, xd, y, dd, impl=impl))
    for impl in HOOKS:
        assert torch.equal(iwd_fast.grad_norm_sq(m, xd, y, impl=impl), iwd_fast.grad_norm_sq(m, xd, y, impl=impl))
