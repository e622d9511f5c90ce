"""Influence targets against exact autograd of the weighted gradient-matching objective (float64).

L(S, w) = D(grad_theta CE(S), sum_i wn_i g_i), wn = w / sum w, g_i the per-sample real gradients. The
exact influence is the autograd derivative of L w.r.t. w at w = 1; the implicit target's is the
derivative of L(S'(w), w) through one look-ahead step S' = S - alpha grad_S L(S, w).
"""
import pytest
import torch
import torch.nn.functional as F

from iwd_fast.distill.gradient_matching import layerwise_distance
from iwd_fast.networks import build_network
from iwd_fast.scoring.oracle import per_sample_grads
from iwd_fast.weighting.targets import exact_influence, implicit_direction, matching_direction


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(3)
    net = build_network("convnet", 1, 3, (8, 8), width=4, depth=2).double()
    params = list(net.parameters())
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.full((7,), 1)  # one class, as in a gradient-matching step
    s0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y_syn = torch.tensor([1, 1])
    ce = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    per = per_sample_grads(net, x, y, ce, [n for n, _ in net.named_parameters()])
    g = [per[n] for n, _ in net.named_parameters()]  # each [B, *shape]

    def fresh():
        """Fresh leaf copies of the parameters: a gradient w.r.t. them never follows S' = S - alpha u
        back into the parameters that u was computed with (the network is fixed during the image step)."""
        return {n: q.detach().requires_grad_(True) for n, q in net.named_parameters()}

    def real_grad(w, create_graph):
        theta = fresh()
        wn = w / w.sum()
        out = torch.func.functional_call(net, theta, (x,))
        return torch.autograd.grad((wn * ce(out, y)).sum(), list(theta.values()), create_graph=create_graph)

    def syn_grad(s, create_graph=True):
        theta = fresh()
        out = torch.func.functional_call(net, theta, (s,))
        return torch.autograd.grad(F.cross_entropy(out, y_syn), list(theta.values()), create_graph=create_graph)

    def loss(s, w):
        return layerwise_distance(syn_grad(s), real_grad(w, True))

    return dict(net=net, params=params, g=g, s0=s0, real_grad=real_grad, syn_grad=syn_grad, loss=loss, b=7)


def _dots(g, d):
    return sum((gi.flatten(1) * di.flatten()).sum(1) for gi, di in zip(g, d))


def test_explicit_influence_is_the_exact_derivative(problem):
    p = problem
    w = torch.ones(p["b"], dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(p["loss"](p["s0"], w), w)[0]
    gs = [t.detach() for t in p["syn_grad"](p["s0"], False)]
    gr = [t.detach() for t in p["real_grad"](w.detach(), False)]
    _, v = matching_direction(lambda r: layerwise_distance(gs, r), gr)
    got = exact_influence(_dots(p["g"], v), v, gr, p["b"])
    assert torch.allclose(got, exact, rtol=1e-8, atol=1e-12), (got, exact)
    raw = _dots(p["g"], v)  # the bare dot is off by a batch offset and scale: not comparable across batches
    assert not torch.allclose(raw, exact, rtol=1e-2)


@pytest.mark.parametrize("exact_jvp", [True, False])
def test_implicit_direction_matches_autograd_through_the_look_ahead(problem, exact_jvp):
    p, alpha = problem, 2e-3
    w = torch.ones(p["b"], dtype=torch.float64, requires_grad=True)
    s = p["s0"].clone().requires_grad_(True)
    u = torch.autograd.grad(p["loss"](s, w), s, create_graph=True)[0]
    look_ahead = torch.autograd.grad(p["loss"](s - alpha * u, w), w)[0]          # exact, through S'(w)
    explicit = torch.autograd.grad(p["loss"](p["s0"], w), w)[0]                  # no look-ahead

    gr = [t.detach() for t in p["real_grad"](w.detach(), False)]

    def v_of(s_new, create_graph):
        gs = p["syn_grad"](s_new, True)
        return matching_direction(lambda r: layerwise_distance(gs, r), gr, create_graph)[1]

    v = v_of(p["s0"], False)
    d = implicit_direction(v, v_of, p["s0"], u.detach(), alpha, exact=exact_jvp)
    got = exact_influence(_dots(p["g"], d), d, gr, p["b"])
    correction_exact, correction_got = look_ahead - explicit, got - explicit
    assert correction_exact.abs().max() > 1e-6 * explicit.abs().max()  # far above float64 rounding
    # first order in alpha: the correction agrees to O(alpha); half of it (the old slip) would be off by 50%
    ratio = float(correction_got @ correction_exact / (correction_exact @ correction_exact))
    assert ratio == pytest.approx(1.0, abs=0.05), ratio
    assert (got - look_ahead).abs().max() < 0.1 * correction_exact.abs().max()


def test_prototype_margin_by_hand_and_against_a_loop():
    # two classes in 2-D: instance 3 is labelled 1 but points where class 0 lives
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05]])
    y = torch.tensor([0, 0, 1, 1])
    from iwd_fast.weighting.targets import prototype_margin
    got = prototype_margin(e, y, 2)
    assert got[:3].gt(0).all() and got[3] < 0
    # instance 0 = (1, 0): its class mean is ((1, 0) + (0.9, 0.1)/|.|) / 2, the other's ((0, 1) + (1, 0.05)/|.|) / 2
    own = (1.0 + 0.9 / (0.82 ** 0.5)) / 2
    other = (0.0 + 1.0 / (1.0025 ** 0.5)) / 2
    assert float(got[0]) == pytest.approx(own - other, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.arange(23) % 4
    want = torch.zeros(23, dtype=torch.float64)
    f = [v / v.norm() for v in e]
    mu = [sum(f[j] for j in range(23) if y[j] == c) / int((y == c).sum()) for c in range(4)]
    for i in range(23):
        own = float(f[i] @ mu[int(y[i])])
        other = max(float(f[i] @ mu[c]) for c in range(4) if c != int(y[i]))
        want[i] = own - other
    torch.testing.assert_close(prototype_margin(e, y, 4), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"classes \[3\] have no embeddings"):
        prototype_margin(e[y < 3], y[y < 3], 4)
