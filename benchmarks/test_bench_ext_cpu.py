"""pytest-benchmark: the compiled CPU ops (iwd_fast._C) against the eager reference formulas, per layer shape.

    pytest benchmarks/test_bench_ext_cpu.py --benchmark-only --bench-threads 1 \
        --benchmark-json=benchmarks/results/pytest_ext_cpu.json
    pytest benchmarks/test_bench_ext_cpu.py --benchmark-only --bench-quick       # tiny shapes (CI smoke)
    python benchmarks/pytest_report.py benchmarks/results/pytest_ext_cpu.json --baseline eager

One group per shape, holding the "eager" and "ext" paths, so they print side by side; the ratio
eager / ext (> 1: the C++ op is faster) of the same run is the result, absolute times are not. Each
ext test first checks the op against the eager formula on the same inputs. Shapes: ConvNet-3 (width
128, 32x32 input) at B=256 and the ResNet-18 CIFAR layers at B=64, K=1 unless stated, plus a K=4 conv,
the linear heads, a GroupNorm affine and the heads' gradient norms.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import harness  # noqa: E402 - benchmarks/ is on sys.path (conftest.py)
from iwd_fast.scoring import eager_ops as ref  # noqa: E402
from iwd_fast.scoring.backends import compiled_ext as _ext, compiled_ops as _ops  # noqa: E402

ROUNDS = 5
TOL = 1e-4  # max |ext - eager| / max |eager| in float32 (the op accumulates in double: ~1e-6 measured)


def conv_case(name, b, cin, cout, hw, k=3, stride=1, k_dirs=1):
    pad = k // 2
    ho = (hw + 2 * pad - k) // stride + 1
    shapes = dict(x=(b, cin, hw, hw), v=(k_dirs, cout, cin, k, k), delta=(b, cout, ho, ho))
    return name, "conv_dot", shapes, ([stride] * 2, [pad] * 2, [1, 1], 1)


def linear_case(name, b, t, d, p, k_dirs=1):
    return name, "linear_dot", dict(a=(b, t, d), v=(k_dirs, p, d), delta=(b, t, p)), ()


QUICK = [conv_case("tiny conv 8->8 8x8", 4, 8, 8, 8), linear_case("tiny linear", 4, 3, 16, 5),
         ("tiny affine", "affine_dot", dict(delta=(4, 8, 16), v_bias=(1, 8), xhat=(4, 8, 16), v_weight=(1, 8)), ()),
         ("tiny norm", "linear_grad_norm_sq", dict(a=(4, 3, 16), delta=(4, 3, 5)), ("ghost",))]
FULL = [
    conv_case("ConvNet-3 conv1 3->128 32x32", 256, 3, 128, 32),
    conv_case("ConvNet-3 128->128 32x32", 256, 128, 128, 32),
    conv_case("ConvNet-3 conv2 128->128 16x16", 256, 128, 128, 16),
    conv_case("ConvNet-3 conv3 128->128 8x8", 256, 128, 128, 8),
    conv_case("ConvNet-3 conv3 128->128 8x8, K=4", 256, 128, 128, 8, k_dirs=4),
    linear_case("ConvNet-3 head 2048->10", 256, 1, 2048, 10),
    ("ConvNet-3 GroupNorm(128) 32x32 affine", "affine_dot",
     dict(delta=(256, 128, 1024), v_bias=(1, 128), xhat=(256, 128, 1024), v_weight=(1, 128)), ()),
    conv_case("ResNet-18 conv1 3->64 32x32", 64, 3, 64, 32),
    conv_case("ResNet-18 layer1 64->64 32x32", 64, 64, 64, 32),
    conv_case("ResNet-18 layer2 64->128 s2 32->16", 64, 64, 128, 32, stride=2),
    conv_case("ResNet-18 layer2 128->128 16x16", 64, 128, 128, 16),
    conv_case("ResNet-18 layer2 shortcut 1x1 64->128 s2", 64, 64, 128, 32, k=1, stride=2),
    conv_case("ResNet-18 layer3 128->256 s2 16->8", 64, 128, 256, 16, stride=2),
    conv_case("ResNet-18 layer3 256->256 8x8", 64, 256, 256, 8),
    conv_case("ResNet-18 layer4 256->512 s2 8->4", 64, 256, 512, 8, stride=2),
    conv_case("ResNet-18 layer4 512->512 4x4", 64, 512, 512, 4),
    linear_case("ResNet-18 fc 512->10", 64, 1, 512, 10),
    ("ResNet-18 fc 512->10 grad norm (ghost)", "linear_grad_norm_sq", dict(a=(64, 1, 512), delta=(64, 1, 10)),
     ("ghost",)),
    ("token linear T=64 256->256 grad norm (materialize)", "linear_grad_norm_sq",
     dict(a=(64, 64, 256), delta=(64, 64, 256)), ("materialize",)),
]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        table = QUICK if metafunc.config.getoption("--bench-quick") else FULL
        metafunc.parametrize("case", table, ids=[c[0] for c in table])
        metafunc.parametrize("path", ["eager", "ext"])


def test_op(benchmark, request, case, path):
    if _ext.load() is None:
        pytest.skip(_ext.status()["cpu"][1])
    name, op, shapes, extra = case
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen) for s in shapes.values()] + list(extra)
    eager, ext = getattr(ref, op), getattr(_ops, op)
    fn = eager if path == "eager" else ext
    env = harness.environment(torch.device("cpu"))
    benchmark.group = name
    benchmark.extra_info.update(case=name, op=op, path=path, shapes={k: list(v) for k, v in shapes.items()},
                                git_sha=env["git_sha"], git_dirty=env["git_dirty"], torch=env["torch"],
                                threads=torch.get_num_threads(), load_avg_1min=env["load_avg_1min"],
                                quick=bool(request.config.getoption("--bench-quick")))
    if path == "ext":
        want, got = eager(*args).double(), ext(*args).double()
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        benchmark.extra_info["max_rel_diff"] = rel
        assert rel <= TOL, f"{name}: ext differs from the eager formula by {rel:.1e}"
    # warmup_rounds=1: oneDNN primitive creation and allocator growth stay out of the timings
    benchmark.pedantic(lambda: fn(*args), rounds=1 if request.config.getoption("--bench-quick") else ROUNDS,
                       iterations=1, warmup_rounds=1)
