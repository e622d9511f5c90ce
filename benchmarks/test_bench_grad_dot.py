"""pytest-benchmark micro-benchmarks of s_i = <grad loss_i, v> on a small ConvNet (seconds on a CPU).

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/pytest_grad_dot.json

All paths share the group "convnet-small", so pytest-benchmark prints them side by side; compare them
by their ratio to "plain fwd+bwd" in the same run. Every scoring path is also checked against
impl="reference" (float32), so a fast wrong path fails instead of being timed. Not part of the default
test command (pyproject's testpaths is tests/).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

import harness  # noqa: E402 - benchmarks/ is on sys.path when pytest collects this file
import iwd_fast  # noqa: E402
from iwd_fast.scoring import dispatch as _dispatch  # noqa: E402
from iwd_fast.networks import build_network  # noqa: E402

GROUP = "convnet-small"
BATCH, CHANNELS, IM_SIZE, WIDTH, DEPTH = 32, 3, 32, 16, 3
TOL = 1e-4  # max |s - s_ref| / max |s_ref| in float32; measured errors are ~1e-6


def _why_not(impl: str):
    try:
        return _dispatch.why_not(impl, torch.device("cpu"))
    except Exception as err:  # noqa: BLE001 - a backend that does not import is simply unavailable
        return f"{type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    net = build_network("convnet", CHANNELS, 10, IM_SIZE, width=WIDTH, depth=DEPTH, norm="instancenorm")
    x = torch.randn(BATCH, CHANNELS, IM_SIZE, IM_SIZE)
    y = torch.randint(0, 10, (BATCH,))
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    params = [p for p in net.parameters() if p.requires_grad]
    ref = iwd_fast.grad_dot(net, x, y, v, impl="reference")
    env = harness.environment(torch.device("cpu"))
    info = {"git_sha": env["git_sha"], "torch": env["torch"], "threads": env["torch_threads"],
            "input_shape": [BATCH, CHANNELS, IM_SIZE, IM_SIZE], "width": WIDTH, "depth": DEPTH, "dtype": "float32"}
    return net, x, y, v, params, ref, info


def _check(scores: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((scores - ref).abs().max() / ref.abs().max())
    assert err <= TOL, f"max rel err vs reference {err:.2e} > {TOL:.0e}"


@pytest.mark.benchmark(group=GROUP)
def test_plain_fwd_bwd(benchmark, small):
    net, x, y, _, params, _, info = small
    benchmark.extra_info.update(info, path="plain fwd+bwd")
    benchmark(lambda: torch.autograd.grad(F.cross_entropy(net(x), y), params))


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_capture(benchmark, small, impl):
    reason = _why_not(impl)
    if reason is not None:
        pytest.skip(f"impl={impl!r} unavailable: {reason}")
    net, x, y, v, params, ref, info = small

    def run() -> torch.Tensor:
        with iwd_fast.capture(net) as cap:
            grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        out = cap.grad_dot(v, impl=impl)
        del grads
        return out

    benchmark.extra_info.update(info, path=f"capture+{impl}", impl=impl)
    _check(benchmark(run), ref)


@pytest.mark.benchmark(group=GROUP)
def test_reference(benchmark, small):
    net, x, y, v, _, ref, info = small
    benchmark.extra_info.update(info, path="grad_dot reference", impl="reference")
    _check(benchmark(lambda: iwd_fast.grad_dot(net, x, y, v, impl="reference")), ref)
