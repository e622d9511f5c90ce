"""The Triton launchers (iwd_fast.kernels, iwd_fast._triton_ops) against the float64 eager reference.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before
triton is imported when CUDA is absent), or on a GPU. Shapes are tiny: the interpreter runs every
program in Python, with 16-wide tiles, so sizes 15/16/17 sit on the tile boundaries.

Error budget (STYLE habit 6), with mag = the op applied to the absolute values of its inputs in
float64 (the sum of |terms|, which bounds every rounding error of the sum):
    float32/float16/bfloat16:  |triton - ref64| <= 2 * |torch32 - ref64| + 4 * u32 * mag
        (ref64 = the reference formula on the exact float64 copies of the inputs; torch32 = the same
        formula in float32 on the same inputs. For float16/bfloat16 inputs this is stricter than
        PyTorch in the input dtype, and fair: the kernels accumulate in float32. u32 = 2**-24.)
    float64 (interpreter only): |triton - ref64| <= gamma_n * mag, gamma_n = n u64 / (1 - n u64),
        the classical bound for any summation order of n terms (n counted generously).
"""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.interpreter

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (set it before triton is imported)",
                allow_module_level=True)

from iwd_fast.scoring.backends import triton_ops as _triton_ops  # noqa: E402
from iwd_fast.scoring import eager_ops as ref  # noqa: E402

_ok, _why = _triton_ops.available()
# triton is installed and the interpreter (or a GPU) is on: a backend that cannot run is a defect, not a skip.
assert _ok, f"triton is installed but its backend cannot run: {_why}"

from iwd_fast import kernels  # noqa: E402

INTERPRETED = kernels.interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
U32 = 2.0 ** -24
U64 = 2.0 ** -53
HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def _strided(t):
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    out = buf[..., 0]
    out.copy_(t)
    return out


def _dev(t, dtype, strided=False):
    if t is None:
        return None
    t = t.to(dtype).to(DEVICE)
    return _strided(t) if strided else t


def _check(fast, op, args, n_terms):
    """Assert ``fast`` (the Triton result for ``args``, already rounded to their dtype) is in budget."""
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    as64 = [a.double() if isinstance(a, torch.Tensor) else a for a in cpu]
    ref64 = op(*as64)
    mag = op(*[a.abs() if isinstance(a, torch.Tensor) else a for a in as64])
    fast = fast.cpu()
    want = torch.float32 if dtype in HALF else dtype
    assert fast.dtype == want and fast.shape == ref64.shape
    if ref64.numel() == 0:
        return
    err = (fast.double() - ref64).abs().max().item()
    scale = mag.abs().max().item()
    if dtype == torch.float64:
        n = n_terms + 2  # n - 1 additions, up to two products per term (x * v * delta)
        allowed = n * U64 / (1 - n * U64) * scale
    else:
        # Half inputs: the kernels accumulate in float32, so hold them to float32 PyTorch on the same
        # (already rounded) inputs, which is stricter than PyTorch in float16/bfloat16.
        plain_dtype = torch.float32 if dtype in HALF else dtype
        plain = op(*[a.to(plain_dtype) if isinstance(a, torch.Tensor) else a for a in cpu])
        allowed = 2 * (plain.double() - ref64).abs().max().item() + 4 * U32 * scale
    assert err <= allowed, f"{dtype}: error {err:.3e} > budget {allowed:.3e} (mag {scale:.3e})"


def _conv_case(b, cin, spatial, cout, kernel, stride, padding, dilation, groups, k, scale=1.0):
    nd = len(spatial)
    out = [(s + 2 * p - d * (kk - 1) - 1) // st + 1
           for s, kk, st, p, d in zip(spatial, kernel, stride, padding, dilation)]
    x = _rand(b, cin, *spatial, scale=scale)
    v = _rand(k, cout, cin // groups, *kernel, scale=scale)
    delta = _rand(b, cout, *out, scale=scale)
    n = (cin // groups) * _prod(kernel) * cout * _prod(out)
    return x, v, delta, n, nd


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


def _dtypes_to_test():
    dts = [torch.float32, torch.float16, torch.bfloat16]
    return dts + ([torch.float64] if INTERPRETED else [])


# ------------------------------------------------------------------------------------------------
# conv_dot (and conv1d through it)
# ------------------------------------------------------------------------------------------------

# (B, Cin, spatial, Cout, kernel, stride, padding, dilation, groups, K)
CONV_CASES = [
    (2, 3, (5, 6), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3),       # positions 30: two M tiles
    (1, 2, (3, 5), 16, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1),      # 15 positions, 16 channels, 1x1
    (1, 16, (4, 4), 15, (1, 1), (1, 1), (0, 0), (1, 1), 1, 2),     # 16 positions, R = 16, 15 channels
    (2, 17, (1, 17), 17, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1),    # 17 positions, R = 17, 17 channels
    (2, 4, (7, 7), 6, (3, 3), (2, 2), (1, 1), (2, 2), 2, 2),       # groups 2, stride 2, dilation 2
    (3, 5, (7, 11), 13, (3, 2), (2, 1), (1, 0), (1, 2), 1, 2),     # primes, non-square everything
    (2, 4, (5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, 2),       # depthwise
    (2, 3, (11,), 4, (3,), (2,), (1,), (1,), 1, 2),                # conv1d
    (2, 4, (9,), 6, (2,), (1,), (0,), (3,), 2, 1),                 # conv1d, groups, dilation
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv_dot_fp32(case):
    b, cin, sp, cout, ker, st, pad, dil, g, k = case
    x, v, delta, n, _ = _conv_case(b, cin, sp, cout, ker, st, pad, dil, g, k)
    args = [_dev(x, torch.float32), _dev(v, torch.float32), _dev(delta, torch.float32), st, pad, dil, g]
    _check(kernels.conv_dot(*args), ref.conv_dot, args, n)


@pytest.mark.parametrize("dtype", _dtypes_to_test(), ids=str)
def test_conv_dot_dtypes(dtype):
    x, v, delta, n, _ = _conv_case(2, 4, (5, 6), 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, scale=0.5)
    args = [_dev(x, dtype), _dev(v, dtype), _dev(delta, dtype), (1, 1), (1, 1), (1, 1), 2]
    _check(kernels.conv_dot(*args), ref.conv_dot, args, n)


def test_conv_dot_non_contiguous():
    x, v, delta, n, _ = _conv_case(2, 3, (6, 5), 5, (3, 3), (2, 1), (1, 1), (1, 1), 1, 2)
    args = [_dev(x, torch.float32, True), _dev(v, torch.float32, True), _dev(delta, torch.float32, True),
            (2, 1), (1, 1), (1, 1), 1]
    assert not any(a.is_contiguous() for a in args[:3])
    _check(kernels.conv_dot(*args), ref.conv_dot, args, n)
    # channels-last input: another stride pattern of the same values
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    _check(kernels.conv_dot(*args), ref.conv_dot, args, n)


def test_conv_dot_empty_batch():
    x, v, delta, n, _ = _conv_case(0, 3, (5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2)
    out = kernels.conv_dot(_dev(x, torch.float32), _dev(v, torch.float32), _dev(delta, torch.float32),
                             (1, 1), (1, 1), (1, 1), 1)
    assert out.shape == (0, 2) and out.dtype == torch.float32


def test_conv_dot_bad_shapes():
    x, v, delta, _, _ = _conv_case(2, 4, (5, 5), 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2)
    x, v, delta = (_dev(t, torch.float32) for t in (x, v, delta))
    with pytest.raises(ValueError, match="delta"):
        kernels.conv_dot(x, v, delta[:, :, :4], (1, 1), (1, 1), (1, 1), 2)
    with pytest.raises(ValueError, match="groups"):
        kernels.conv_dot(x, v, delta, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="expected"):
        kernels.conv_dot(x.unsqueeze(2), v.unsqueeze(3), delta.unsqueeze(2), 1, 1, 1, 2)
    with pytest.raises(ValueError, match="padding"):
        kernels.conv_dot(x, v, delta, (1, 1), (1, 1, 1), (1, 1), 2)
    with pytest.raises(ValueError, match="padding"):
        kernels.conv_dot(x, v, delta, (1, 1), "same", (1, 1), 2)


# ------------------------------------------------------------------------------------------------
# linear_dot
# ------------------------------------------------------------------------------------------------

# (B, T, d, p, K): T < 16 uses flat rows, T >= 16 per-sample tiles
LINEAR_CASES = [(3, 1, 5, 7, 2), (2, 15, 16, 17, 1), (2, 16, 17, 15, 3), (2, 17, 13, 16, 2),
                (1, 33, 3, 2, 1), (5, 3, 1, 1, 4)]


def _linear_case(b, t, d, p, k, scale=1.0):
    return _rand(b, t, d, scale=scale), _rand(k, p, d, scale=scale), _rand(b, t, p, scale=scale), t * d * p


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[f"lin{i}" for i in range(len(LINEAR_CASES))])
def test_linear_dot_fp32(case):
    a, v, delta, n = _linear_case(*case)
    args = [_dev(a, torch.float32), _dev(v, torch.float32), _dev(delta, torch.float32)]
    _check(kernels.linear_dot(*args), ref.linear_dot, args, n)


@pytest.mark.parametrize("dtype", _dtypes_to_test(), ids=str)
@pytest.mark.parametrize("t", [3, 17])
def test_linear_dot_dtypes(dtype, t):
    a, v, delta, n = _linear_case(2, t, 19, 18, 2, scale=0.5)
    args = [_dev(a, dtype), _dev(v, dtype), _dev(delta, dtype)]
    _check(kernels.linear_dot(*args), ref.linear_dot, args, n)


@pytest.mark.parametrize("t", [2, 17])
def test_linear_dot_non_contiguous(t):
    a, v, delta, n = _linear_case(3, t, 6, 5, 2)
    args = [_dev(a, torch.float32, True), _dev(v, torch.float32, True), _dev(delta, torch.float32, True)]
    _check(kernels.linear_dot(*args), ref.linear_dot, args, n)


def test_linear_dot_empty_and_errors():
    a, v, delta, _ = _linear_case(0, 3, 4, 5, 2)
    out = kernels.linear_dot(_dev(a, torch.float32), _dev(v, torch.float32), _dev(delta, torch.float32))
    assert out.shape == (0, 2)
    a, v, delta, _ = _linear_case(2, 3, 4, 5, 2)
    a, v, delta = (_dev(t, torch.float32) for t in (a, v, delta))
    with pytest.raises(ValueError, match="disagree"):
        kernels.linear_dot(a, v[:, :, :3], delta)
    with pytest.raises(ValueError, match="expected"):
        kernels.linear_dot(a[0], v, delta)
    with pytest.raises(ValueError, match="floating"):
        kernels.linear_dot(a.long(), v, delta)


# ------------------------------------------------------------------------------------------------
# affine_dot
# ------------------------------------------------------------------------------------------------

AFFINE_CASES = [(2, 5, 7, 3), (3, 17, 16, 1), (1, 15, 33, 17), (2, 16, 1, 2)]


def _affine_args(case, which, dtype, strided=False, scale=1.0):
    b, c, p, k = case
    delta, xhat = _rand(b, c, p, scale=scale), _rand(b, c, p, scale=scale)
    vb, vw = _rand(k, c, scale=scale), _rand(k, c, scale=scale)
    if which == "bias":
        xhat = vw = None
    elif which == "weight":
        vb = None
    return [_dev(t, dtype, strided) for t in (delta, vb, xhat, vw)], p


def _affine_op(delta, vb, xhat, vw):
    return ref.affine_dot(delta, vb, xhat, vw)


@pytest.mark.parametrize("which", ["bias", "weight", "both"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=[f"aff{i}" for i in range(len(AFFINE_CASES))])
def test_affine_dot_fp32(case, which):
    args, n = _affine_args(case, which, torch.float32)
    _check(kernels.affine_dot(*args), _affine_op, args, 2 * n * case[1])


@pytest.mark.parametrize("dtype", _dtypes_to_test(), ids=str)
def test_affine_dot_dtypes(dtype):
    args, n = _affine_args((2, 6, 19, 3), "both", dtype, scale=0.5)
    _check(kernels.affine_dot(*args), _affine_op, args, 2 * n * 6)


def test_affine_dot_non_contiguous_empty_errors():
    args, n = _affine_args((2, 5, 7, 3), "both", torch.float32, strided=True)
    _check(kernels.affine_dot(*args), _affine_op, args, 2 * n * 5)
    empty, _ = _affine_args((0, 5, 7, 3), "both", torch.float32)
    assert kernels.affine_dot(*empty).shape == (0, 3)
    delta, vb, xhat, vw = args
    with pytest.raises(ValueError, match="v_bias or v_weight"):
        kernels.affine_dot(delta, None)
    with pytest.raises(ValueError, match="needs xhat"):
        kernels.affine_dot(delta, vb, None, vw)
    with pytest.raises(ValueError, match=r"\[K, C\]"):
        kernels.affine_dot(delta, vb[:, :4])


# ------------------------------------------------------------------------------------------------
# linear_grad_norm_sq
# ------------------------------------------------------------------------------------------------

NORM_CASES = [(3, 1, 5, 7), (2, 17, 16, 15), (2, 16, 13, 33), (1, 15, 17, 1)]


def _norm_args(case, dtype, strided=False, scale=1.0):
    b, t, d, p = case
    return [_dev(_rand(b, t, d, scale=scale), dtype, strided), _dev(_rand(b, t, p, scale=scale), dtype, strided)]


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("case", NORM_CASES, ids=[f"norm{i}" for i in range(len(NORM_CASES))])
def test_grad_norm_fp32(case, method):
    args = _norm_args(case, torch.float32)
    n = case[1] ** 2 * (case[2] + case[3])

    def op(a, delta):
        return ref.linear_grad_norm_sq(a, delta, method)
    _check(kernels.linear_grad_norm_sq(*args, method), op, args, n)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("dtype", _dtypes_to_test(), ids=str)
def test_grad_norm_dtypes_non_contiguous(dtype, method):
    args = _norm_args((2, 17, 6, 5), dtype, strided=True, scale=0.5)
    n = 17 ** 2 * 11

    def op(a, delta):
        return ref.linear_grad_norm_sq(a, delta, method)
    _check(kernels.linear_grad_norm_sq(*args, method), op, args, n)


def test_grad_norm_auto_empty_errors():
    args = _norm_args((2, 3, 8, 9), torch.float32)
    method = ref.choose_norm_method(3, 8, 9)
    assert torch.equal(kernels.linear_grad_norm_sq(*args, "auto"), kernels.linear_grad_norm_sq(*args, method))
    out = kernels.linear_grad_norm_sq(*_norm_args((0, 3, 4, 5), torch.float32), "ghost")
    assert out.shape == (0,)
    with pytest.raises(ValueError, match="unknown method"):
        kernels.linear_grad_norm_sq(*args, "exact")
    with pytest.raises(ValueError, match="expected"):
        kernels.linear_grad_norm_sq(args[0], args[1][:, :2], "ghost")


# ------------------------------------------------------------------------------------------------
# determinism, dtype policy, registered ops
# ------------------------------------------------------------------------------------------------

def test_deterministic():
    """Several tiles per sample (partials), run twice: bit-identical."""
    x, v, delta, _, _ = _conv_case(1, 2, (3, 6), 17, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1)
    cargs = [_dev(t, torch.float32) for t in (x, v, delta)] + [(1, 1), (1, 1), (1, 1), 1]
    a, lv, ld, _ = _linear_case(1, 17, 5, 17, 1)
    largs = [_dev(t, torch.float32) for t in (a, lv, ld)]
    for fn, args in [(kernels.conv_dot, cargs), (kernels.linear_dot, largs),
                     (lambda a, v, d: kernels.linear_grad_norm_sq(a, d, "ghost"), largs),
                     (lambda a, v, d: kernels.linear_grad_norm_sq(a, d, "materialize"), largs)]:
        assert torch.equal(fn(*args), fn(*args))


@pytest.mark.skipif(INTERPRETED, reason="float64 runs only under the interpreter; on a GPU it raises")
def test_float64_rejected_on_gpu():
    a, v, delta, _ = _linear_case(2, 3, 4, 5, 2)
    with pytest.raises(ValueError, match="float64"):
        kernels.linear_dot(*(t.to(DEVICE) for t in (a, v, delta)))


def test_available_reports_usable():
    ok, why = _triton_ops.available()
    assert ok and why
    if INTERPRETED:
        assert "interpreter" in why


def test_registered_ops_match_launchers():
    x, v, delta, _, _ = _conv_case(2, 3, (5, 4), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2)
    cx, cv, cd = (_dev(t, torch.float32) for t in (x, v, delta))
    a, lv, ld, _ = _linear_case(2, 3, 5, 4, 2)
    la, lv, ld = (_dev(t, torch.float32) for t in (a, lv, ld))
    (aff_d, aff_b, aff_x, aff_w), _ = _affine_args((2, 5, 7, 3), "both", torch.float32)
    pairs = [
        (_triton_ops.conv_dot(cx, cv, cd, 1, 1, 1, 1), kernels.conv_dot(cx, cv, cd, 1, 1, 1, 1)),
        (_triton_ops.linear_dot(la, lv, ld), kernels.linear_dot(la, lv, ld)),
        (_triton_ops.affine_dot(aff_d, aff_b, aff_x, aff_w), kernels.affine_dot(aff_d, aff_b, aff_x, aff_w)),
        (_triton_ops.linear_grad_norm_sq(la, ld, "materialize"), kernels.linear_grad_norm_sq(la, ld, "materialize")),
    ]
    for op_out, launcher_out in pairs:
        assert torch.equal(op_out, launcher_out)


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck():
    """Schema, fake tensors and autograd registration; AOT dispatch (torch.compile) only on a GPU,
    since interpreted kernels cannot run on the functional tensors it traces with."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETED:
        utils = utils + ("test_aot_dispatch_dynamic",)
    _triton_ops.ops()
    ns = torch.ops.iwd_fast_triton
    x, v, delta, _, _ = _conv_case(2, 3, (5, 4), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2)
    a, lv, ld, _ = _linear_case(2, 3, 5, 4, 2)
    (aff_d, aff_b, aff_x, aff_w), _ = _affine_args((2, 5, 7, 3), "both", torch.float32)
    c = [_dev(t, torch.float32) for t in (x, v, delta)]
    lin = [_dev(t, torch.float32) for t in (a, lv, ld)]
    cases = [
        (ns.conv_dot.default, (*c, [1, 1], [1, 1], [1, 1], 1)),
        (ns.linear_dot.default, tuple(lin)),
        (ns.affine_dot.default, (aff_d, aff_b, aff_x, aff_w)),
        (ns.linear_grad_norm_sq.default, (lin[0], lin[2], "ghost")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not hasattr(torch.library, "triton_op"),
                    reason="torch.compile of the triton ops needs compiled (GPU) kernels and torch >= 2.6")
def test_torch_compile_fullgraph():
    _triton_ops.ops()
    a, v, delta, n = _linear_case(3, 17, 18, 19, 2)
    args = [_dev(t, torch.float32) for t in (a, v, delta)]
    compiled = torch.compile(lambda a, v, d: torch.ops.iwd_fast_triton.linear_dot(a, v, d) * 2, fullgraph=True)
    _check(compiled(*args) / 2, ref.linear_dot, args, n)


_COMPILE_SCRIPT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from iwd_fast.kernels.affine_dot import _affine_dot_kernel
from iwd_fast.kernels.conv_dot import _conv_dot_kernel
from iwd_fast.kernels.linear_grad_norm_sq import _ghost_norm_kernel, _materialize_norm_kernel
from iwd_fast.kernels.linear_dot import _linear_dot_kernel

def compile_one(kernel, ty, consts):
    sig = {n: "constexpr" if n in consts else "*fp32" if n == "part_ptr" else "*" + ty if n.endswith("_ptr")
           else "i32" for n in kernel.arg_names}
    cc = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4})
    assert "ptx" in cc.asm, kernel.__name__

for ty in sys.argv[1:]:
    compile_one(_conv_dot_kernel, ty, dict(KH=3, KW=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, DOT_FP32=False))
    for flat in (True, False):
        compile_one(_linear_dot_kernel, ty, dict(FLAT_M=flat, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, DOT_FP32=False))
    compile_one(_ghost_norm_kernel, ty, dict(BLOCK_T=32, BLOCK_K=32, DOT_FP32=False))
    compile_one(_materialize_norm_kernel, ty, dict(BLOCK_P=64, BLOCK_D=64, BLOCK_T=32, DOT_FP32=False))
    compile_one(_affine_dot_kernel, ty, dict(HAS_BIAS=True, HAS_WEIGHT=True, BLOCK_C=32, BLOCK_P=128, BLOCK_K=16))
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile every kernel for an H100/H200 (sm_90) without a GPU, so the compiled path cannot rot on
    CPU-only machines (the interpreter does not type-check it). About 30 s on 2 CPU cores."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ASTSource/GPUTarget compile API: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, "fp32", "bf16"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_a_refused_wrap_triton_is_said_once_not_swallowed(monkeypatch):
    from iwd_fast.kernels import _common

    def refuse(kernel):
        raise RuntimeError("this torch rejects interpreter kernels")

    monkeypatch.setattr(torch.library, "wrap_triton", refuse, raising=False)
    kernel = object()
    with pytest.warns(RuntimeWarning, match="wrap_triton refused .*rejects interpreter kernels.*runs eagerly"):
        assert _common._wrap(kernel) is kernel
