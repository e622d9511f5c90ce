"""grad_dot / grad_norm_sq / capture against the float64 vmap(grad) oracle, layer by layer."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iwd_fast
from iwd_fast.networks import build_network

from conftest import error_budget

from iwd_fast.scoring import dispatch as _dispatch

# Every hook backend that can run on CPU tensors: "torch" always, "cpu" when iwd_fast._C is built, "triton"
# under TRITON_INTERPRET=1 (conftest sets it on machines without CUDA). One that cannot run here is a
# reported skip with its reason, never a silently missing case.
CPU_HOOK_IMPLS = [i for i in _dispatch.HOOK_IMPLS if i != "cuda"]
HOOK_IMPLS_HERE = [
    pytest.param(i, marks=pytest.mark.skip(reason=f"impl {i!r} cannot run here: {why}")) if why else i
    for i, why in ((i, _dispatch.why_not(i, torch.device("cpu"))) for i in CPU_HOOK_IMPLS)]


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class SeqHead(nn.Module):
    """Linear over a sequence dimension followed by a pooled head (Linear with leading dims)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 4)

    def forward(self, x):  # x [B, T=3, 5]
        return self.head(self.norm(torch.tanh(self.proj(x))).mean(1))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


class Shared(nn.Module):
    """One Linear called twice in a forward, plus a tied weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def conv_stack(conv, norm, pool_to=2):
    return nn.Sequential(conv, norm, nn.ReLU(), nn.AdaptiveAvgPool2d(pool_to) if isinstance(conv, nn.Conv2d)
                         else nn.AdaptiveAvgPool1d(pool_to), Flat(), nn.LazyLinear(3))


def make_case(name):
    """(model, inputs, targets) in float64 for one layer family."""
    g = torch.Generator().manual_seed(1)
    if name == "conv2d_groups_stride_dilation":
        m = conv_stack(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.GroupNorm(3, 6))
        x = torch.randn(5, 4, 9, 11, generator=g)
    elif name == "conv2d_reflect_1x1":
        m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.Conv2d(5, 4, 1),
                          nn.InstanceNorm2d(4, affine=True), nn.ReLU(), nn.AdaptiveAvgPool2d(1), Flat(), nn.Linear(4, 3))
        x = torch.randn(3, 3, 7, 5, generator=g)
    elif name == "conv1d_same":
        m = conv_stack(nn.Conv1d(3, 5, 5, padding="same"), nn.GroupNorm(5, 5))
        x = torch.randn(4, 3, 13, generator=g)
    elif name == "batchnorm_eval":
        m = conv_stack(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
        x = torch.randn(6, 2, 6, 6, generator=g)
        with torch.no_grad():
            m(x.float())  # materialise the lazy head
            m[1].running_mean.normal_(generator=g)
            m[1].running_var.uniform_(0.5, 2.0, generator=g)
    elif name == "instancenorm_running_eval":
        m = conv_stack(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
        x = torch.randn(6, 2, 6, 6, generator=g)
        m.train()
        with torch.no_grad():
            m(x.float())
        m.eval()
    elif name == "linear_sequence_layernorm":
        m = SeqHead()
        x = torch.randn(5, 3, 5, generator=g)
    elif name == "embedding":
        m = EmbedNet()
        x = torch.randint(0, 11, (7, 4), generator=g)
        x[0, 1] = 0  # padding row gets no gradient
        x[1, :] = x[1, 0]  # repeated rows
    elif name == "shared_module":
        m = Shared()
        x = torch.randn(5, 6, generator=g)
    else:
        raise KeyError(name)
    with torch.no_grad():
        m(x.float() if x.is_floating_point() else x)
    m = m.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return m, x, y


CASES = ["conv2d_groups_stride_dilation", "conv2d_reflect_1x1", "conv1d_same", "batchnorm_eval",
         "instancenorm_running_eval", "linear_sequence_layernorm", "embedding", "shared_module"]


def random_directions(model, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", HOOK_IMPLS_HERE + ["jvp"])
def test_grad_dot_float64_matches_reference(case, impl):
    m, x, y = make_case(case)
    dirs = random_directions(m, 3)
    ref = iwd_fast.grad_dot(m, x, y, dirs, impl="reference")
    got = iwd_fast.grad_dot(m, x, y, dirs, impl=impl)
    assert got.shape == (x.shape[0], 3)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10 * ref.abs().max().item())


def _usable(impls):
    """The impls of ``impls`` that run here; skips the calling test, naming them, if one cannot (a test that
    loops over backends must not pass with one of them silently left out)."""
    missing = {i: _dispatch.why_not(i, torch.device("cpu")) for i in impls}
    missing = {i: why for i, why in missing.items() if why}
    if missing:
        pytest.skip(f"backends that cannot run here: {missing}")
    return list(impls)


@pytest.mark.parametrize("case", CASES)
def test_grad_dot_float32_within_error_budget(case):
    m64, x64, y = make_case(case)
    dirs64 = random_directions(m64, 2)
    ref64 = iwd_fast.grad_dot(m64, x64, y, dirs64, impl="reference")
    m32 = copy.deepcopy(m64).float()
    x32 = x64.float() if x64.is_floating_point() else x64
    dirs32 = {n: v.float() for n, v in dirs64.items()}
    plain = iwd_fast.grad_dot(m32, x32, y, dirs32, impl="reference")
    for impl in _usable(CPU_HOOK_IMPLS) + ["jvp"]:
        got = iwd_fast.grad_dot(m32, x32, y, dirs32, impl=impl)
        assert got.dtype == torch.float32
        err, budget = error_budget(got, ref64, plain)
        assert err <= budget, (impl, err, budget)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", HOOK_IMPLS_HERE)
def test_grad_norm_sq_matches_reference(case, impl):
    m, x, y = make_case(case)
    ref = iwd_fast.grad_norm_sq(m, x, y, impl="reference")
    got = iwd_fast.grad_norm_sq(m, x, y, impl=impl)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)
    some = [n for n, _ in m.named_parameters()][:2]
    torch.testing.assert_close(iwd_fast.grad_norm_sq(m, x, y, params=some, impl=impl),
                               iwd_fast.grad_norm_sq(m, x, y, params=some, impl="reference"), rtol=1e-9, atol=0)


def test_single_direction_returns_vector_and_subset_of_parameters():
    m, x, y = make_case("conv2d_groups_stride_dilation")
    name = next(n for n, _ in m.named_parameters())
    v = {name: torch.randn_like(dict(m.named_parameters())[name])}
    s = iwd_fast.grad_dot(m, x, y, v, impl="torch")
    assert s.shape == (x.shape[0],)
    torch.testing.assert_close(s, iwd_fast.grad_dot(m, x, y, v, impl="reference"), rtol=1e-9, atol=1e-12)
    listed = iwd_fast.grad_dot(m, x, y, [v, {name: 2 * v[name]}], impl="torch")
    assert listed.shape == (x.shape[0], 2)
    torch.testing.assert_close(listed[:, 1], 2 * s, rtol=1e-12, atol=1e-12)


def test_batch_of_one_empty_batch_and_non_contiguous_inputs():
    m, x, y = make_case("conv2d_groups_stride_dilation")
    dirs = random_directions(m, 2)
    one = iwd_fast.grad_dot(m, x[:1], y[:1], dirs, impl="torch")
    torch.testing.assert_close(one, iwd_fast.grad_dot(m, x[:1], y[:1], dirs, impl="reference"), rtol=1e-9, atol=1e-12)
    empty = iwd_fast.grad_dot(m, x[:0], y[:0], dirs, impl="torch")
    assert empty.shape == (0, 2)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(iwd_fast.grad_dot(m, xt, y, dirs, impl="torch"),
                               iwd_fast.grad_dot(m, x, y, dirs, impl="reference"), rtol=1e-9, atol=1e-12)


def test_chunked_hook_path_equals_unchunked():
    m, x, y = make_case("batchnorm_eval")
    dirs = random_directions(m, 2)
    whole = iwd_fast.grad_dot(m, x, y, dirs, impl="torch")
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, dirs, impl="torch", chunk_size=4), whole,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, dirs, impl="reference", chunk_size=4), whole,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted"])
def test_capture_undoes_the_callers_reduction(reduction):
    m, x, y = make_case("batchnorm_eval")
    dirs = random_directions(m, 2)
    ref = iwd_fast.grad_dot(m, x, y, dirs, impl="reference")
    w = torch.rand(x.shape[0], dtype=torch.float64) + 0.1
    factors = {"mean": None, "sum": "sum", "weighted": w / w.sum()}[reduction]
    with iwd_fast.capture(m) as cap:
        per = F.cross_entropy(m(x), y, reduction="none")
        loss = {"mean": per.mean(), "sum": per.sum(), "weighted": (per * w / w.sum()).sum()}[reduction]
        grads = torch.autograd.grad(loss, [p for p in m.parameters()])
    assert all(g is not None for g in grads)
    torch.testing.assert_close(cap.grad_dot(dirs, sample_weights=factors, impl="torch"), ref, rtol=1e-9, atol=1e-12)
    norms = cap.grad_norm_sq(sample_weights=factors, impl="torch")
    torch.testing.assert_close(norms, iwd_fast.grad_norm_sq(m, x, y, impl="reference"), rtol=1e-9, atol=0)


def test_capture_with_backward_and_inplace_relu():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), Flat(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    dirs = random_directions(m, 1)
    ref = iwd_fast.grad_dot(m, x, y, dirs, impl="reference")
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, dirs, impl="torch"), ref, rtol=1e-9, atol=1e-12)
    with iwd_fast.capture(m) as cap:
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(cap.grad_dot(dirs, impl="torch"), ref, rtol=1e-9, atol=1e-12)


def test_soft_labels_and_custom_loss():
    m, x, _ = make_case("linear_sequence_layernorm")
    dirs = random_directions(m, 2)
    soft = torch.softmax(torch.randn(x.shape[0], 4, dtype=torch.float64), dim=1)
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, soft, dirs, impl="torch"),
                               iwd_fast.grad_dot(m, x, soft, dirs, impl="reference"), rtol=1e-9, atol=1e-12)
    target = torch.randn(x.shape[0], 4, dtype=torch.float64)

    def mse(out, t):
        return ((out - t) ** 2).sum(1)

    torch.testing.assert_close(iwd_fast.grad_dot(m, x, target, dirs, loss=mse, impl="torch"),
                               iwd_fast.grad_dot(m, x, target, dirs, loss=mse, impl="reference"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("im_size,channels", [((32, 32), 3), ((28, 28), 1)])
def test_field_convnet3_width128(im_size, channels):
    torch.manual_seed(3)
    net = build_network("convnet", channels, 10, im_size, width=128, depth=3, norm="instancenorm").double()
    x = torch.randn(3, channels, *im_size, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    dirs = random_directions(net, 2)
    ref = iwd_fast.grad_dot(net, x, y, dirs, impl="reference")
    compiled = _usable(["torch", "cpu"])  # the Triton interpreter is too slow at width 128
    for impl in compiled:
        torch.testing.assert_close(iwd_fast.grad_dot(net, x, y, dirs, impl=impl), ref, rtol=1e-9, atol=1e-10)
    with iwd_fast.capture(net) as cap:
        F.cross_entropy(net(x), y).backward()
    for impl in compiled:
        torch.testing.assert_close(cap.grad_dot(dirs, impl=impl), ref, rtol=1e-9, atol=1e-10)


def test_resnet_with_eval_batchnorm():
    torch.manual_seed(4)
    net = build_network("resnet10", 3, 10, (16, 16), width=8, norm="batchnorm")
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, 3, 16, 16))  # non-trivial running statistics
    net = net.double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 5, 9])
    dirs = random_directions(net, 2)
    ref = iwd_fast.grad_dot(net, x, y, dirs, impl="reference")
    torch.testing.assert_close(iwd_fast.grad_dot(net, x, y, dirs, impl="torch"), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(iwd_fast.grad_norm_sq(net, x, y, impl="torch"),
                               iwd_fast.grad_norm_sq(net, x, y, impl="reference"), rtol=1e-9, atol=0)


def test_train_mode_batchnorm_jvp_matches_batch_coupled_oracle():
    torch.manual_seed(5)
    m = conv_stack(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(5, 2, 6, 6)
    m(x)
    m = m.double().train()
    x = x.double()
    y = torch.tensor([0, 1, 2, 1, 0])
    dirs = random_directions(m, 2)
    before = {n: b.clone() for n, b in m.named_buffers()}
    got = iwd_fast.grad_dot(m, x, y, dirs, impl="jvp")
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"jvp changed buffer {n}"
    params = [p for _, p in m.named_parameters()]
    losses = F.cross_entropy(m(x), y, reduction="none")  # batch statistics couple the samples
    oracle = torch.zeros(5, 2, dtype=torch.float64)
    for i in range(5):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        for k in range(2):
            oracle[i, k] = sum((g * dirs[n][k]).sum() for g, (n, _) in zip(grads, m.named_parameters()))
    torch.testing.assert_close(got, oracle, rtol=1e-9, atol=1e-12)
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="jvp"):
        iwd_fast.grad_dot(m, x, y, dirs, impl="torch")
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="jvp"):
        iwd_fast.grad_dot(m, x, y, dirs, impl="reference")
    with pytest.warns(UserWarning, match="jvp"):
        auto = iwd_fast.grad_dot(m, x, y, dirs)
    torch.testing.assert_close(auto, oracle, rtol=1e-9, atol=1e-12)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


def test_unsupported_module_refused_by_name_and_auto_uses_jvp():
    m = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    dirs = random_directions(m, 1)
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="'1' \\(Scale\\)"):
        iwd_fast.grad_dot(m, x, y, dirs, impl="torch")
    with pytest.warns(UserWarning):
        got = iwd_fast.grad_dot(m, x, y, dirs)
    torch.testing.assert_close(got, iwd_fast.grad_dot(m, x, y, dirs, impl="reference"), rtol=1e-9, atol=1e-12)
    # Directions that avoid the unsupported module stay on the hook path.
    only_linear = {"0.weight": dirs["0.weight"]}
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, only_linear, impl="torch"),
                               iwd_fast.grad_dot(m, x, y, only_linear, impl="reference"), rtol=1e-9, atol=1e-12)


def test_overridden_forward_is_not_trusted():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyLinear(4, 3)).double()
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="MyLinear"):
        iwd_fast.grad_dot(m, torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1]),
                          random_directions(m, 1), impl="torch")


def test_tied_parameters_sum_both_uses():
    m = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False)).double()
    m[2].weight = m[0].weight
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 2])
    dirs = random_directions(m, 2)
    assert list(dirs) == ["0.weight"]
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, dirs, impl="torch"),
                               iwd_fast.grad_dot(m, x, y, dirs, impl="reference"), rtol=1e-9, atol=1e-12)


def test_clear_errors():
    m, x, y = make_case("shared_module")
    dirs = random_directions(m, 1)
    with pytest.raises(ValueError, match="does not have: \\['nope'\\]"):
        iwd_fast.grad_dot(m, x, y, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected"):
        iwd_fast.grad_dot(m, x, y, {"a.weight": torch.zeros(5, 5)})
    bad = y.clone()
    bad[2] = 7
    bad[4] = -1
    with pytest.raises(ValueError, match=r"indices \[2, 4\]"):
        iwd_fast.grad_dot(m, x, bad, dirs, impl="torch")
    with pytest.raises(ValueError, match=r"indices \[2, 4\]"):
        iwd_fast.grad_dot(m, x, bad, dirs, impl="reference")
    with pytest.raises(ValueError, match="unknown impl"):
        iwd_fast.grad_dot(m, x, y, dirs, impl="fast")
    with pytest.raises(iwd_fast.ImplUnavailableError, match="cuda"):
        iwd_fast.grad_dot(m, x, y, dirs, impl="cuda")
    frozen = copy.deepcopy(m)
    frozen.a.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        iwd_fast.grad_dot(frozen, x, y, {"a.bias": torch.zeros(6, dtype=torch.float64)})
    with iwd_fast.capture(m) as cap:
        m(x)
    with pytest.raises(RuntimeError, match="backward"):
        cap.grad_dot(dirs, impl="torch")
    with iwd_fast.capture(m) as cap:
        F.cross_entropy(m(x), y).backward()
    w = torch.ones(x.shape[0], dtype=torch.float64)
    w[3] = 0
    with pytest.raises(ValueError, match=r"bad indices: \[3\]"):
        cap.grad_dot(dirs, sample_weights=w, impl="torch")
    with pytest.raises(iwd_fast.ImplUnavailableError, match="reference"):
        cap.grad_dot(dirs, impl="reference")


@pytest.mark.parametrize("case", ["conv2d_groups_stride_dilation", "shared_module", "embedding", "batchnorm_eval"])
@pytest.mark.parametrize("impl", HOOK_IMPLS_HERE)
def test_streaming_capture_matches_reference_and_releases_tensors(case, impl):
    m, x, y = make_case(case)
    dirs = random_directions(m, 2)
    ref = iwd_fast.grad_dot(m, x, y, dirs, impl="reference")
    w = torch.rand(x.shape[0], dtype=torch.float64) + 0.1
    with iwd_fast.capture(m, directions=dirs, impl=impl) as cap:
        per = F.cross_entropy(m(x), y, reduction="none")
        (per * w / w.sum()).sum().backward()
    torch.testing.assert_close(cap.grad_dot(sample_weights=w / w.sum()), ref, rtol=1e-9, atol=1e-12)
    assert all(c.record.x is None and c.record.delta is None for c in cap.calls)  # released as consumed
    with pytest.raises(RuntimeError, match="streamed"):
        cap.grad_dot(dirs, impl=impl)
    single = {n: v[0] for n, v in dirs.items()}
    with iwd_fast.capture(m, directions=single, impl=impl) as cap:
        F.cross_entropy(m(x), y, reduction="sum").backward()
    torch.testing.assert_close(cap.grad_dot(sample_weights="sum"), ref[:, 0], rtol=1e-9, atol=1e-12)


def test_streaming_capture_errors_before_backward():
    m, x, y = make_case("shared_module")
    with iwd_fast.capture(m, directions=random_directions(m, 1)) as cap:
        m(x)
    with pytest.raises(RuntimeError, match="backward"):
        cap.grad_dot()
    with iwd_fast.capture(m) as plain:
        F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="this capture got none"):
        plain.grad_dot()
