"""conv_dot's two exact routes (forward convolutions, per-sample gradients) against an explicit float64
per-sample loop, on shapes that break kernels, and the rule that picks between them (reference and C++)."""
import pytest
import torch
import torch.nn.functional as F

from iwd_fast.scoring import eager_ops as ref
from iwd_fast.scoring.backends import compiled_ops

CONV = {1: F.conv1d, 2: F.conv2d}

# (spatial, Cin, Cout, groups, kernel, stride, padding, dilation, B, K)
CASES = [
    ((9, 11), 4, 6, 2, (3, 3), (2, 1), (1, 0), (1, 2), 5, 3),
    ((7, 7), 3, 5, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8),       # 1x1 kernel, B = 1
    ((6, 5), 6, 6, 6, (3, 2), (1, 2), (2, 1), (2, 1), 3, 2),       # depthwise
    ((13,), 3, 4, 1, (5,), (2,), (1,), (2,), 4, 5),                # conv1d
    ((8, 8), 2, 3, 1, (3, 3), (1, 1), (1, 1), (1, 1), 0, 4),        # empty batch
]


def per_sample_loop(x, v, delta, stride, padding, dilation, groups):
    """[B, K] float64: each sample's weight gradient by autograd of <conv(x_i; W), delta_i>, dotted with V_k."""
    out = torch.zeros(x.shape[0], v.shape[0], dtype=torch.float64)
    nd = x.dim() - 2
    for i in range(x.shape[0]):
        w = torch.zeros_like(v[0], requires_grad=True)
        y = CONV[nd](x[i:i + 1], w, None, stride, padding, dilation, groups)
        (g,) = torch.autograd.grad((y * delta[i:i + 1]).sum(), w)
        out[i] = v.reshape(v.shape[0], -1) @ g.reshape(-1)
    return out


def make(case, dtype=torch.float64):
    spatial, cin, cout, groups, kernel, stride, padding, dilation, b, k = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, *spatial, generator=g, dtype=dtype)
    v = torch.randn(k, cout, cin // groups, *kernel, generator=g, dtype=dtype)
    out = CONV[len(spatial)](torch.zeros(1, cin, *spatial, dtype=dtype), v[0], None, stride, padding, dilation, groups)
    delta = torch.randn(b, cout, *out.shape[2:], generator=g, dtype=dtype)
    return x, v, delta, stride, padding, dilation, groups


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ["forward", "gradient"])
def test_both_routes_match_the_per_sample_loop(case, route):
    args = make(case)
    if args[0].shape[0] == 0 and route == "forward":
        pytest.skip("the forward route cannot reshape an empty batch (the compiled op handles it)")
    want = per_sample_loop(*args)
    got = ref.conv_dot(*args, route=route)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(1.0, want.abs().max().item() if want.numel() else 1.0))


@pytest.mark.skipif(not compiled_ops.available(), reason="iwd_fast._C did not load")
@pytest.mark.parametrize("case", [c for c in CASES if len(c[0]) == 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_compiled_op_matches_on_both_sides_of_the_route_rule(case, dtype):
    x, v, delta, *rest = make(case, dtype)
    want = per_sample_loop(x.double(), v.double(), delta.double(), *rest)
    got = compiled_ops.conv_dot(x, v, delta, *rest)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(1.0, want.abs().max().item() if want.numel() else 1.0))
    else:  # within twice the error of the eager formula in float32, on the route the rule picks
        plain = ref.conv_dot(x, v, delta, *rest)
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        budget = 2 * (plain.double() - want).abs().max().item() if want.numel() else 0.0
        assert err <= budget + 1e-6 * max(1.0, want.abs().max().item() if want.numel() else 1.0)


def test_the_route_rule():
    assert ref.choose_conv_route(1, 10_000) == "forward"  # one direction: one convolution is cheapest
    assert ref.choose_conv_route(8, 16) == "gradient"      # 8 * 16 = 128 > 16 + 8 + 16
    # K = 2: 2P > P + 18 from P = 19 on
    assert [ref.choose_conv_route(2, p) for p in (18, 19)] == ["forward", "gradient"]
    assert ref.choose_conv_route(8, 1) == "forward"        # a 1x1 output: K convolutions are K dots
    with pytest.raises(ValueError, match="unknown route"):
        ref.conv_dot(*make(CASES[0]), route="fast")
