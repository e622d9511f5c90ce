"""Drop-in hooks: weighted losses and means, the indexed sampler, weighted initialisation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iwd_fast.weighting.dropin import (IndexedClassSampler, normalize_weights, select_initial, weighted_class_mean,
                            weighted_cross_entropy)


def _close(got, want, rtol=1.3e-6, atol=1e-5):
    """assert_allclose on tensors (numpy: torch.testing's first call costs seconds of lazy imports)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got.detach().double().numpy(), want.detach().double().numpy(), rtol=rtol, atol=atol)


def _batch(b=7, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g),
            torch.rand(b, generator=g) * 3)


def test_weighted_cross_entropy_matches_float64_hand_computation():
    logits, labels, w = _batch()
    got = weighted_cross_entropy(logits, labels, w)
    lg = logits.double()
    ce = -(lg.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(lg, dim=1))
    want = sum(float(w[i]) / float(w.double().sum()) * float(ce[i]) for i in range(7))
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert abs(float(got) - float(ce.mean())) > 1e-3  # weights actually change the answer


def test_weighted_cross_entropy_uniform_equals_mean_and_grad_flows_to_weights():
    logits, labels, _ = _batch()
    ref = F.cross_entropy(logits, labels)
    _close(weighted_cross_entropy(logits, labels, torch.full((7,), 2.5)), ref)
    _close(weighted_cross_entropy(logits, labels, None), ref)
    w = torch.ones(7, requires_grad=True)
    weighted_cross_entropy(logits, labels, w).backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_weighted_cross_entropy_errors():
    logits, labels, w = _batch()
    w_neg = w.clone()
    w_neg[[2, 5]] = -1.0
    with pytest.raises(ValueError, match=r"indices \[2, 5\]"):
        weighted_cross_entropy(logits, labels, w_neg)
    w_nan = w.clone()
    w_nan[3] = float("nan")
    with pytest.raises(ValueError, match=r"indices \[3\]"):
        weighted_cross_entropy(logits, labels, w_nan)
    with pytest.raises(ValueError, match="all weights are zero"):
        weighted_cross_entropy(logits, labels, torch.zeros(7))
    with pytest.raises(ValueError, match="shape"):
        weighted_cross_entropy(logits, labels, torch.ones(6))


def test_weighted_class_mean():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(6, 4, 3, generator=g)
    w = torch.rand(6, generator=g) + 0.1
    want = (w.double()[:, None, None] * f.double()).sum(0) / w.double().sum()
    got = weighted_class_mean(f, w)
    assert got.shape == (4, 3)
    _close(got.double(), want, rtol=1e-6, atol=1e-6)
    _close(weighted_class_mean(f, torch.full((6,), 0.3)), f.mean(0))
    _close(weighted_class_mean(f, None), f.mean(0))
    onehot = torch.zeros(6)
    onehot[4] = 2.0
    _close(weighted_class_mean(f, onehot), f[4])
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        weighted_class_mean(f, torch.tensor([1.0, -0.5, 1, 1, 1, 1]))
    _close(normalize_weights(torch.tensor([1.0, 3.0])), torch.tensor([0.25, 0.75]))


def _labels(n=100, c=4):
    return torch.arange(n) % c


def test_sampler_deterministic_without_replacement():
    lab = _labels()
    a, b, other = IndexedClassSampler(lab, 4, seed=7), IndexedClassSampler(lab, 4, seed=7), \
        IndexedClassSampler(lab, 4, seed=8)
    state = torch.get_rng_state()
    draws_a = [a.sample(c, 10) for c in (0, 1, 2, 3, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    draws_b = [b.sample(c, 10) for c in (0, 1, 2, 3, 1)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not all(torch.equal(x, other.sample(c, 10)) for x, c in zip(draws_a, (0, 1, 2, 3, 1)))
    for c, d in zip((0, 1, 2, 3, 1), draws_a):
        assert d.dtype == torch.int64 and d.numel() == 10 and d.unique().numel() == 10
        assert bool((lab[d] == c).all())
    whole = a.sample(2, 1000)  # larger than the class: all of it
    assert sorted(whole.tolist()) == list(range(2, 100, 4))
    with pytest.raises(ValueError, match="class 4"):
        a.sample(4, 3)


def test_weighted_sampling_favours_heavy_instances():
    lab = torch.zeros(40, dtype=torch.int64)
    w = torch.ones(40)
    heavy = torch.arange(10)
    w[heavy] = 20.0
    s = IndexedClassSampler(lab, 1, seed=0)
    counts = torch.zeros(40)
    for _ in range(300):
        d = s.sample_weighted(0, 5, w)
        assert d.unique().numel() == 5
        counts[d] += 1
    # heavy instances hold 200/230 of the mass: expected heavy share of draws ~0.8+ (uniform would be 0.25)
    share = float(counts[heavy].sum() / counts.sum())
    assert share > 0.7, share
    assert int(s.sample_weighted(0, 50, w).numel()) == 40
    w0 = torch.zeros(40)
    w0[:3] = 1.0
    with pytest.raises(ValueError, match="3 instances with positive weight"):
        s.sample_weighted(0, 5, w0)


def test_sampler_state_dict_resumes_identical_stream():
    lab = _labels()
    w = torch.rand(100, generator=torch.Generator().manual_seed(2))
    s = IndexedClassSampler(lab, 4, seed=3)
    s.sample(0, 5)
    state = s.state_dict()
    cont = [s.sample(1, 8), s.sample_weighted(2, 6, w), s.sample(3, 4)]
    resumed = IndexedClassSampler(lab, 4, seed=999)
    resumed.load_state_dict(state)
    again = [resumed.sample(1, 8), resumed.sample_weighted(2, 6, w), resumed.sample(3, 4)]
    assert all(torch.equal(x, y) for x, y in zip(cont, again))
    with pytest.raises(ValueError, match="n=100"):
        IndexedClassSampler(_labels(96), 4).load_state_dict(state)


def test_select_initial_modes():
    lab = _labels(40, 4)
    w = torch.arange(40, dtype=torch.float32)  # later instances weigh more
    top = select_initial(lab, w, 4, 3, mode="top")
    assert top.tolist() == [36, 32, 28, 37, 33, 29, 38, 34, 30, 39, 35, 31]
    for mode in ("proportional", "random"):
        a = select_initial(lab, w, 4, 3, mode=mode, seed=5)
        assert torch.equal(a, select_initial(lab, w, 4, 3, mode=mode, seed=5))
        assert a.shape == (12,) and a.unique().numel() == 12
        assert lab[a].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    w_sparse = torch.zeros(40)
    w_sparse[[0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]] = 1.0
    prop = select_initial(lab, w_sparse, 4, 3, mode="proportional", seed=0)
    assert sorted(prop.tolist()) == list(range(12))  # only positive-weight instances can be drawn
    rnd = [select_initial(lab, None, 4, 3, mode="random", seed=s) for s in range(4)]
    assert not all(torch.equal(rnd[0], r) for r in rnd[1:])
    with pytest.raises(ValueError, match=r"classes \[1, 3\]"):
        select_initial(torch.tensor([0, 0, 1, 2, 2, 3]), torch.ones(6), 4, 2)
    with pytest.raises(ValueError, match="mode"):
        select_initial(lab, w, 4, 3, mode="best")
