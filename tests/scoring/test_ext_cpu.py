"""The compiled CPU ops (iwd_fast._C via iwd_fast._ops) against the float64 eager reference.

float64: |ext - ref| <= 1e-12 * mag, where mag is the op applied to the absolute values of its
inputs (the sum of |terms|, which bounds every rounding error of the sum).
float32: the inputs are float32 and the reference runs on their exact float64 copies; the error
budget comes from plain PyTorch (the reference formula) on the same float32 data (STYLE habit 6).
Errors are measured in units of mag, so elements of different size compare; per element
    |ext32 - ref64| <= 2 * mag * max_j(|torch32 - ref64|_j / mag_j) + u32 * |ref64|    (u32 = 2**-24)
i.e. at most twice plain PyTorch's worst error on this output, plus the rounding of the result itself.
"""
import pytest
import torch

from iwd_fast.scoring.backends import compiled_ext as _ext

if _ext.load() is None:
    pytest.skip(f"compiled ops unavailable: {_ext.status()['cpu'][1]}", allow_module_level=True)

from iwd_fast.scoring.backends import compiled_ops as _ops  # noqa: E402
from iwd_fast.scoring import eager_ops as ref  # noqa: E402

U32 = 2.0 ** -24


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _strided(t):
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
    out = buf[..., 0]
    out.copy_(t)
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def _abs_all(args):
    return [a.abs() if isinstance(a, torch.Tensor) else a for a in args]


def _to(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]


def _check(ext_fn, ref_fn, args32, mag_fn=None):
    """ext_fn/ref_fn take the same positional args; args32 hold float32 tensors (or None / ints)."""
    args64 = _to(args32, torch.float64)
    ref64 = ref_fn(*args64)
    mag = (mag_fn or ref_fn)(*_abs_all(args64))
    # float64
    ext64 = ext_fn(*args64)
    assert ext64.dtype == torch.float64 and ext64.shape == ref64.shape
    err64 = (ext64 - ref64).abs()
    assert bool((err64 <= 1e-12 * mag).all()), f"float64 error {err64.max().item():.3e} (mag {mag.max().item():.3e})"
    # float32, error budget from plain PyTorch in float32
    ext32 = ext_fn(*args32)
    torch32 = ref_fn(*args32)
    assert ext32.dtype == torch.float32 and ext32.shape == ref64.shape
    err = (ext32.double() - ref64).abs()
    safe_mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    torch_rel = ((torch32.double() - ref64).abs() / safe_mag).max() if ref64.numel() else 0.0
    budget = 2 * torch_rel * mag + U32 * ref64.abs()
    assert bool((err <= budget).all()), (
        f"float32 error {err.max().item():.3e} over budget (worst excess {(err - budget).max().item():.3e})")
    return ext64


# ----------------------------------------------------------------------------------------------- conv
# (B, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, K)
CONV_CASES = [
    (3, 5, 7, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    (1, 4, 6, 7, 5, (3, 2), (2, 2), (0, 0), (1, 1), 2, 3),
    (2, 6, 4, 13, 8, (3, 3), (1, 1), (1, 1), (2, 2), 2, 2),
    (5, 3, 5, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1, 2),
    (4, 3, 17, 31, 29, (5, 5), (2, 2), (2, 2), (1, 1), 1, 1),
    (3, 4, 4, 10, 7, (3, 3), (2, 1), (0, 1), (1, 2), 4, 2),  # depthwise, asymmetric stride/padding/dilation
    (2, 6, 9, 5, 5, (1, 1), (2, 2), (1, 1), (1, 1), 3, 5),   # 1x1 strided, padded, 3 groups
]


def _conv_args(case, gen, strided=False):
    b, cin, cout, h, w, (kh, kw), stride, padding, dilation, groups, k = case
    x = _rand(b, cin, h, w, gen=gen)
    v = _rand(k, cout, cin // groups, kh, kw, gen=gen)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    delta = _rand(b, cout, ho, wo, gen=gen)
    if strided:
        x, v, delta = _strided(x), _strided(v), _strided(delta)
    return [x, v, delta, list(stride), list(padding), list(dilation), groups]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_conv_dot(case, strided):
    gen = torch.Generator().manual_seed(0)
    args = _conv_args(case, gen, strided)
    out = _check(_ops.conv_dot, ref.conv_dot, args)
    assert out.shape == (case[0], case[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_dot_empty_batch(dtype):
    """B = 0 gives an empty [0, K] (reference.conv_dot cannot reshape an empty batch, so no oracle here)."""
    gen = torch.Generator().manual_seed(10)
    args = _to(_conv_args((0, 3, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2), gen), dtype)
    out = _ops.conv_dot(*args)
    assert out.shape == (0, 2) and out.dtype == dtype


def test_conv_dot_channels_last():
    gen = torch.Generator().manual_seed(1)
    x, v, delta, *rest = _conv_args(CONV_CASES[0], gen)
    x = x.contiguous(memory_format=torch.channels_last)
    delta = delta.contiguous(memory_format=torch.channels_last)
    _check(_ops.conv_dot, ref.conv_dot, [x, v, delta, *rest])


# Chunk targets: one sample per chunk, 2 (float32) or 1 (float64) samples per chunk with a remainder,
# and the default (an even share per thread). The shapes carry enough work (> 2**19 multiply-adds) for
# the chunks to run in parallel.
CHUNK_BYTES = ["1", "40000", None]


def _set_chunk_bytes(monkeypatch, chunk_bytes):
    if chunk_bytes is None:
        monkeypatch.delenv("IWD_FAST_CPU_CHUNK_BYTES", raising=False)
    else:
        monkeypatch.setenv("IWD_FAST_CPU_CHUNK_BYTES", chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
def test_conv_dot_chunking(monkeypatch, chunk_bytes):
    _set_chunk_bytes(monkeypatch, chunk_bytes)
    gen = torch.Generator().manual_seed(2)
    args = _conv_args((7, 16, 16, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2), gen)  # 18432 B/sample in fp32
    _check(_ops.conv_dot, ref.conv_dot, args)
    assert torch.equal(_ops.conv_dot(*args), _ops.conv_dot(*args))  # deterministic


@pytest.mark.parametrize("groups", [1, 2])
def test_conv1d_dot(groups):
    gen = torch.Generator().manual_seed(3)
    x = _rand(3, 4, 23, gen=gen)
    v = _rand(2, 6, 4 // groups, 3, gen=gen)
    delta = _rand(3, 6, 11, gen=gen)  # (23 + 2*1 - 2*2 - 1) // 2 + 1 = 11
    _check(_ops.conv_dot, ref.conv_dot, [x, v, delta, [2], [1], [2], groups])


def test_conv_dot_rejects_3d_and_bad_input():
    x = torch.zeros(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="1d and 2d"):
        _ops.conv_dot(x, torch.zeros(1, 2, 2, 1, 1, 1), torch.zeros(1, 2, 3, 3, 3), 1, 0, 1, 1)
    x, v = torch.zeros(2, 4, 5, 5), torch.zeros(1, 3, 4, 3, 3)
    with pytest.raises(RuntimeError, match="delta must be"):
        _ops.conv_dot(x, v, torch.zeros(2, 3, 5, 5), 1, 0, 1, 1)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        _ops.conv_dot(x, v.double(), torch.zeros(2, 3, 3, 3), 1, 0, 1, 1)
    with pytest.raises(RuntimeError, match="Half"):
        _ops.conv_dot(x.half(), v.half(), torch.zeros(2, 3, 3, 3).half(), 1, 0, 1, 1)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        _ops.conv_dot(x, v, torch.zeros(2, 3, 3, 3), 1, 0, 1, 2)


# --------------------------------------------------------------------------------------------- linear
# (B, T, d, p, K)
LINEAR_CASES = [(3, 5, 7, 11, 1), (1, 1, 13, 3, 4), (6, 17, 2, 1, 3), (2, 31, 29, 37, 2), (0, 4, 5, 6, 2)]


def _linear_args(case, gen, strided=False):
    b, t, d, p, k = case
    a, v, delta = _rand(b, t, d, gen=gen), _rand(k, p, d, gen=gen), _rand(b, t, p, gen=gen)
    if strided:  # transposed views and a strided buffer
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
        v = _strided(v)
        delta = delta.transpose(1, 2).contiguous().transpose(1, 2)
    return [a, v, delta]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_linear_dot(case, strided):
    gen = torch.Generator().manual_seed(4)
    out = _check(_ops.linear_dot, ref.linear_dot, _linear_args(case, gen, strided))
    assert out.shape == (case[0], case[-1])


@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
def test_linear_dot_chunking(monkeypatch, chunk_bytes):
    _set_chunk_bytes(monkeypatch, chunk_bytes)
    gen = torch.Generator().manual_seed(5)
    args = _linear_args((9, 33, 64, 40, 2), gen)  # 10560 B/sample in fp32
    _check(_ops.linear_dot, ref.linear_dot, args)
    assert torch.equal(_ops.linear_dot(*args), _ops.linear_dot(*args))


# --------------------------------------------------------------------------------------------- affine
# (B, C, P, K, parts)
AFFINE_CASES = [(3, 5, 7, 1, "both"), (4, 1, 1, 3, "bias"), (2, 7, 13, 2, "weight"), (1, 3, 31, 4, "both"),
                (0, 4, 5, 2, "both")]


def _affine_args(case, gen, strided=False):
    b, c, p, k, parts = case
    delta, xhat = _rand(b, c, p, gen=gen), _rand(b, c, p, gen=gen)
    vb, vw = _rand(k, c, gen=gen), _rand(k, c, gen=gen)
    if strided:  # channels-last activations seen as [B, C, P]
        delta = delta.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        xhat, vb, vw = _strided(xhat), vb.t().contiguous().t(), _strided(vw)
    if parts == "bias":
        return [delta, vb, None, None]
    if parts == "weight":
        return [delta, None, xhat, vw]
    return [delta, vb, xhat, vw]


@pytest.mark.parametrize("case", AFFINE_CASES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_affine_dot(case, strided):
    gen = torch.Generator().manual_seed(6)
    out = _check(_ops.affine_dot, ref.affine_dot, _affine_args(case, gen, strided))
    assert out.shape == (case[0], case[3])


def test_affine_dot_bad_input():
    delta = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="give v_bias or v_weight"):
        _ops.affine_dot(delta, None)
    with pytest.raises(RuntimeError, match="needs xhat"):
        _ops.affine_dot(delta, None, None, torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match="v_bias must be"):
        _ops.affine_dot(delta, torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------- grad norms
# (B, T, d, p)
NORM_CASES = [(3, 5, 7, 11), (1, 1, 13, 3), (5, 17, 2, 1), (2, 31, 29, 37), (0, 4, 5, 6)]


def _norm_mag(a, delta, method):
    return ref.linear_grad_norm_sq(a, delta, "materialize")


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_linear_grad_norm_sq(case, method, strided):
    gen = torch.Generator().manual_seed(7)
    b, t, d, p = case
    a, delta = _rand(b, t, d, gen=gen), _rand(b, t, p, gen=gen)
    if strided:
        a, delta = _strided(a), delta.transpose(1, 2).contiguous().transpose(1, 2)
    out = _check(_ops.linear_grad_norm_sq, ref.linear_grad_norm_sq, [a, delta, method], mag_fn=_norm_mag)
    assert out.shape == (b,)


@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_linear_grad_norm_sq_chunking(monkeypatch, chunk_bytes, method):
    _set_chunk_bytes(monkeypatch, chunk_bytes)
    gen = torch.Generator().manual_seed(11)
    a, delta = _rand(9, 40, 64, gen=gen), _rand(9, 40, 48, gen=gen)
    _check(_ops.linear_grad_norm_sq, ref.linear_grad_norm_sq, [a, delta, method], mag_fn=_norm_mag)
    assert torch.equal(_ops.linear_grad_norm_sq(a, delta, method), _ops.linear_grad_norm_sq(a, delta, method))


def test_linear_grad_norm_sq_bad_method():
    with pytest.raises(RuntimeError, match="unknown method"):
        torch.ops.iwd_fast.linear_grad_norm_sq(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), "exact")


# ------------------------------------------------------------------------------ opcheck and compile
def _opcheck_cases():
    gen = torch.Generator().manual_seed(8)
    conv = _conv_args(CONV_CASES[1], gen)
    conv_1x1 = _conv_args(CONV_CASES[6], gen, strided=True)
    yield "conv_dot", conv
    yield "conv_dot", conv_1x1
    yield "linear_dot", _linear_args(LINEAR_CASES[0], gen)
    yield "linear_dot", _linear_args(LINEAR_CASES[1], gen, strided=True)
    yield "affine_dot", _affine_args(AFFINE_CASES[0], gen)
    yield "affine_dot", _affine_args(AFFINE_CASES[1], gen)
    yield "linear_grad_norm_sq", [_rand(3, 5, 7, gen=gen), _rand(3, 5, 11, gen=gen), "ghost"]
    yield "linear_grad_norm_sq", [_rand(2, 4, 3, gen=gen).double(), _rand(2, 4, 6, gen=gen).double(), "materialize"]


@pytest.mark.parametrize("name,args", list(_opcheck_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.iwd_fast, name).default, tuple(args))


def test_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(9)
    conv = _conv_args(CONV_CASES[2], gen)
    lin = _linear_args(LINEAR_CASES[0], gen)
    aff = _affine_args(AFFINE_CASES[0], gen)
    a, delta = _rand(3, 5, 7, gen=gen), _rand(3, 5, 11, gen=gen)
    x1, v1, d1 = _rand(2, 4, 9, gen=gen), _rand(3, 6, 2, 3, gen=gen), _rand(2, 6, 9, gen=gen)

    def all_ops():
        return (_ops.conv_dot(*conv), _ops.linear_dot(*lin), _ops.affine_dot(*aff),
                _ops.linear_grad_norm_sq(a, delta, "auto"), _ops.conv_dot(x1, v1, d1, 1, 1, 1, 2))

    torch._dynamo.reset()
    compiled = torch.compile(all_ops, fullgraph=True)
    for got, want in zip(compiled(), all_ops()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
