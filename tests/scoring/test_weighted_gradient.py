"""Capture.weighted_gradient: the weighted real gradient through autograd's own backward, and the scores of
the UNWEIGHTED per-sample losses from the same backward.

The oracle is an explicit float64 loop over samples (one ``autograd.grad`` per per-sample loss): the
gradient must be what that loop's weighted sum gives, and bitwise what the unscored path
(``autograd.grad(weighted_cross_entropy(...))``) gives; the dots and norms those of the loop's per-sample
gradients, for every layer family, a module called twice, K > 1 directions, soft labels, zero weights and
weights too small to divide out.
"""
import pytest
import torch
import torch.nn.functional as F

import iwd_fast
from iwd_fast.networks import build_network
from iwd_fast.scoring.losses import cross_entropy_per_sample
from test_scoring import CASES, HOOK_IMPLS_HERE, make_case, random_directions


def _losses(m, x, y):
    return cross_entropy_per_sample(m(x), y)


def per_sample_gradients(m, x, y, params):
    """[B] lists of per-sample gradients by an explicit loop (the float64 oracle)."""
    out = []
    for i in range(x.shape[0]):
        loss = cross_entropy_per_sample(m(x[i:i + 1]), y[i:i + 1]).sum()
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return out


def loop_scores(m, x, y, v):
    """([B, K] dots with v {name: [K, *shape]}, [B] squared norms) from the per-sample loop."""
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    k = next(iter(v.values())).shape[0]
    dots, norms = torch.zeros(x.shape[0], k, dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.float64)
    for i, grads in enumerate(per_sample_gradients(m, x, y, params)):
        for n, g in zip(names, grads):
            if g is None:
                continue
            dots[i] += (v[n].reshape(k, -1) @ g.reshape(-1))
            norms[i] += g.pow(2).sum()
    return dots, norms


def _weights(b, zeros=True, tiny=False):
    g = torch.Generator().manual_seed(3)
    w = torch.rand(b, generator=g, dtype=torch.float64) * 3 + 0.1
    if zeros:
        w[::3] = 0.0  # a cold softmax underflows to exact zeros
    if tiny:
        w[1] = 1e-200  # representable, but c_i * delta_i loses its digits: rescored apart
    return w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("streamed", [False, True])
def test_gradient_and_unweighted_scores_match_the_per_sample_loop(case, streamed):
    m, x, y = make_case(case)
    params = [p for p in m.parameters()]
    w = _weights(x.shape[0], tiny=True)
    grads = per_sample_gradients(m, x, y, params)
    want = [sum(w[i] * g[j] for i, g in enumerate(grads)) / w.sum() for j in range(len(params))]
    v = random_directions(m, 3)
    dots, norms = loop_scores(m, x, y, v)
    with iwd_fast.capture(m, directions=v if streamed else None, norm_sq=streamed) as cap:
        got = cap.weighted_gradient(_losses(m, x, y), w, params)
    for p, a, b in zip(params, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scores = cap.grad_dot() if streamed else cap.grad_dot(v)
    torch.testing.assert_close(scores, dots, rtol=1e-9, atol=1e-11 * dots.abs().max().item())
    torch.testing.assert_close(cap.grad_norm_sq(), norms, rtol=1e-9, atol=1e-12 * norms.max().item())
    assert (scores[w == 0].abs() > 0).all()  # zero-weight samples keep their scores


@pytest.mark.parametrize("case", CASES)
def test_gradient_is_bitwise_the_unscored_paths(case):
    m, x, y = make_case(case)
    m = m.float()
    x = x.float() if x.is_floating_point() else x
    params = [p for p in m.parameters()]
    w = _weights(x.shape[0]).float()
    plain = torch.autograd.grad(iwd_fast.weighted_cross_entropy(m(x), y, w), params)
    with iwd_fast.capture(m, directions=random_directions(m, 2, torch.float32)) as cap:
        scored = cap.weighted_gradient(F.cross_entropy(m(x), y, reduction="none"), w, params)
    for a, b in zip(scored, plain):
        assert torch.equal(a, b)
    uniform_plain = torch.autograd.grad(F.cross_entropy(m(x), y, reduction="none").mean(), params)
    with iwd_fast.capture(m) as cap:
        uniform = cap.weighted_gradient(F.cross_entropy(m(x), y, reduction="none"), None, params)
    for a, b in zip(uniform, uniform_plain):
        assert torch.equal(a, b)


def test_soft_labels_and_a_module_called_twice():
    m, x, _ = make_case("shared_module")
    g = torch.Generator().manual_seed(5)
    soft = torch.softmax(torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64), dim=1)
    params = [p for p in m.parameters()]
    w = _weights(x.shape[0])
    v = random_directions(m, 2)
    dots, _ = loop_scores(m, x, soft, v)
    grads = per_sample_gradients(m, x, soft, params)
    want = [sum(w[i] * gr[j] for i, gr in enumerate(grads)) / w.sum() for j in range(len(params))]
    with iwd_fast.capture(m, directions=v) as cap:
        got = cap.weighted_gradient(cross_entropy_per_sample(m(x), soft), w, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cap.grad_dot(), dots, rtol=1e-9, atol=1e-11 * dots.abs().max().item())


def test_a_batch_of_only_tiny_weights_is_rescored_whole():
    m, x, y = make_case("conv1d_same")
    params = list(m.parameters())
    w = torch.full((x.shape[0],), 1e-300, dtype=torch.float64)
    w[0] = 1.0  # every other factor is ~1e-300: not divisible
    v = random_directions(m, 1)
    dots, norms = loop_scores(m, x, y, v)
    with iwd_fast.capture(m, directions=v) as cap:
        cap.weighted_gradient(_losses(m, x, y), w, params)
    torch.testing.assert_close(cap.grad_dot(), dots, rtol=1e-9, atol=1e-11 * dots.abs().max().item())


@pytest.mark.parametrize("impl", HOOK_IMPLS_HERE)
def test_uniform_weights_give_the_mean_gradient_and_norms(impl):
    torch.manual_seed(0)
    net = build_network("convnet", 1, 4, (12, 12), width=5, depth=2).double()
    x, y = torch.randn(7, 1, 12, 12, dtype=torch.float64), torch.randint(0, 4, (7,))
    params = list(net.parameters())
    want = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    with iwd_fast.capture(net) as cap:
        got = cap.weighted_gradient(_losses(net, x, y), None, params)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(got, want))
    _, ref = loop_scores(net, x, y, random_directions(net, 1))
    torch.testing.assert_close(cap.grad_norm_sq(impl=impl), ref, rtol=1e-8, atol=1e-12)


def test_sample_weights_cannot_be_given_twice_and_bad_weights_are_named():
    m, x, y = make_case("conv1d_same")
    params = list(m.parameters())
    with iwd_fast.capture(m) as cap:
        cap.weighted_gradient(_losses(m, x, y), _weights(x.shape[0]), params)
    with pytest.raises(ValueError, match="knows the weights"):
        cap.grad_dot(random_directions(m, 1), sample_weights=torch.ones(x.shape[0]))
    with iwd_fast.capture(m) as cap:
        bad = torch.ones(x.shape[0], dtype=torch.float64)
        bad[2] = float("nan")
        bad[3] = -1.0
        with pytest.raises(ValueError, match=r"indices \[2, 3\]"):
            cap.weighted_gradient(_losses(m, x, y), bad, params)
    with iwd_fast.capture(m) as cap:
        with pytest.raises(ValueError, match="all weights are zero"):
            cap.weighted_gradient(_losses(m, x, y), torch.zeros(x.shape[0]), params)


def test_unused_parameters_are_named():
    m, x, y = make_case("linear_sequence_layernorm")
    with iwd_fast.capture(m) as cap:
        out = m.head(torch.randn(x.shape[0], 7, dtype=torch.float64))  # proj and norm never run
        with pytest.raises(RuntimeError, match=r"no gradient reached \['proj.weight'"):
            cap.weighted_gradient(F.cross_entropy(out, y, reduction="none"), None, list(m.parameters()))
