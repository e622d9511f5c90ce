"""Capture.weighted_gradient: the weighted real gradient and unweighted scores from one backward.

The gradient must equal autograd's gradient of the weighted mean loss, and the scores those of the
unweighted per-sample losses (the float64 vmap(grad) oracle), for every layer family, zero weights
included: no score may depend on dividing by a weight.
"""
import pytest
import torch
import torch.nn.functional as F

import iwd_fast
from iwd_fast.networks import build_network
from test_scoring import CASES, HOOK_IMPLS_HERE, make_case, random_directions


def _losses(m, x, y):
    return F.cross_entropy(m(x), y, reduction="none")


def _weights(b, zeros=True):
    g = torch.Generator().manual_seed(3)
    w = torch.rand(b, generator=g, dtype=torch.float64) * 3
    if zeros:
        w[::3] = 0.0  # a cold softmax underflows to exact zeros
    return w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("streamed", [False, True])
def test_weighted_gradient_and_unweighted_scores_match_autograd_and_oracle(case, streamed):
    m, x, y = make_case(case)
    params = [p for p in m.parameters()]
    w = _weights(x.shape[0])
    want = torch.autograd.grad((w * _losses(m, x, y)).sum() / w.sum(), params)
    v = random_directions(m, 2)
    ref = iwd_fast.grad_dot(m, x, y, v, impl="reference")
    with iwd_fast.capture(m, directions=v if streamed else None) as cap:
        got = cap.weighted_gradient(_losses(m, x, y), w, params)
    for p, a, b in zip(params, got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (case, tuple(p.shape), (a - b).abs().max())
    scores = cap.grad_dot() if streamed else cap.grad_dot(v)
    assert torch.allclose(scores, ref, rtol=1e-9, atol=1e-11), (case, (scores - ref).abs().max())
    assert (scores[w == 0].abs() > 0).all()  # zero-weight samples keep their scores


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
    norms = cap.grad_norm_sq(impl=impl)
    ref = iwd_fast.grad_norm_sq(net, x, y, impl="reference")
    assert torch.allclose(norms, ref, rtol=1e-8, atol=1e-12)


def test_sample_weights_cannot_be_given_twice_and_bad_weights_are_named():
    m, x, y = make_case("conv1d_same")
    params = list(m.parameters())
    with iwd_fast.capture(m) as cap:
        cap.weighted_gradient(_losses(m, x, y), _weights(x.shape[0]), params)
    with pytest.raises(ValueError, match="need no sample_weights"):
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


def test_parameters_outside_the_model_or_unused_are_refused():
    m, x, y = make_case("linear_sequence_layernorm")
    other = torch.nn.Parameter(torch.zeros(3))
    with iwd_fast.capture(m) as cap:
        with pytest.raises(ValueError, match="not parameters of the captured model"):
            cap.weighted_gradient(_losses(m, x, y), None, [other])
    with iwd_fast.capture(m) as cap:
        out = m.head(torch.randn(x.shape[0], 7, dtype=torch.float64))  # proj and norm never run
        with pytest.raises(RuntimeError, match="did not run in the forward"):
            cap.weighted_gradient(F.cross_entropy(out, y, reduction="none"), None, list(m.parameters()))
