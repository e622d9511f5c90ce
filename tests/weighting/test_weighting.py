"""InfluenceWeighter: per-class softmax weights, EMA, persistence, sign policies, AUROC."""
import math

import numpy as np
import pytest
import torch

from iwd_fast import weighting as W
from iwd_fast.weighting import InfluenceWeighter, auroc, sign_for, weight_mass_on


def _close(got, want, rtol=1.3e-6, atol=1e-5):
    """assert_allclose on tensors (numpy: torch.testing's first call costs seconds of lazy imports)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got.detach().double().numpy(), want.detach().double().numpy(), rtol=rtol, atol=atol)


def _labels(n=60, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % c
    return lab[torch.randperm(n, generator=g)]


ZSCORE = {"transform": "zscore", "standardize": False}  # the formula _ref_weights states (not the default)


def _scored(labels, c=3, seed=1, **kw):
    wtr = InfluenceWeighter(labels, c, **{**ZSCORE, **kw})
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(labels.numel(), generator=g, dtype=torch.float64)
    wtr.update(torch.arange(labels.numel()), scores)
    return wtr, scores


def _ref_weights(scores, labels, c, temperature=1.0, sign=1, floor=0.0, eps=1e-8):
    """Float64 numpy version of METHOD.md section 4 for fully scored data."""
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    w = np.ones_like(s)
    for k in range(c):
        m = lab == k
        z = sign * (s[m] - s[m].mean()) / (s[m].std() + eps) / temperature
        e = np.exp(z - z.max())
        w[m] = m.sum() * e / e.sum()
    return (1 - floor) * w + floor


def test_weights_match_reference_and_mean_one_per_class():
    lab = _labels()
    wtr, s = _scored(lab, temperature=0.7, sign=-1, floor=0.1)
    w = wtr.weights()
    assert w.dtype == torch.float32 and w.shape == (60,)
    np.testing.assert_allclose(w.numpy(), _ref_weights(s.numpy(), lab.numpy(), 3, 0.7, -1, 0.1), rtol=1e-6)
    for k in range(3):
        assert abs(float(w[lab == k].double().mean()) - 1.0) < 1e-6
    assert float(w.std()) > 0.1  # genuinely non-uniform


def test_infinite_temperature_is_uniform():
    wtr, _ = _scored(_labels(), temperature=math.inf)
    assert torch.equal(wtr.weights(), torch.ones(60))


def test_lower_temperature_is_more_peaked():
    wtr, _ = _scored(_labels())
    maxima = []
    for t in (10.0, 3.0, 1.0, 0.5, 0.2):
        wtr.temperature = t
        maxima.append(float(wtr.weights().max()))
    assert all(b > a for a, b in zip(maxima, maxima[1:])), maxima


def test_order_preserved_and_sign_flips_it():
    lab = _labels()
    pos, s = _scored(lab, sign=1)
    neg, _ = _scored(lab, sign=-1)
    for k in range(3):
        m = torch.nonzero(lab == k).flatten()
        order = torch.argsort(s[m])
        wp, wn = pos.weights()[m][order], neg.weights()[m][order]
        assert bool((wp[1:] > wp[:-1]).all())
        assert bool((wn[1:] < wn[:-1]).all())


def test_floor_mixes_toward_one():
    lab = _labels()
    base, _ = _scored(lab)
    floored, _ = _scored(lab, floor=0.3)
    _close(floored.weights(), 0.7 * base.weights() + 0.3, rtol=1e-6, atol=1e-6)
    full, _ = _scored(lab, floor=1.0)
    assert torch.equal(full.weights(), torch.ones(60))


def test_ema_by_hand():
    wtr = InfluenceWeighter(torch.tensor([0, 0, 1, 1]), 2, ema=0.75, standardize=False)  # raw scores kept
    wtr.update(torch.tensor([0, 2]), torch.tensor([4.0, -2.0]))
    wtr.update(torch.tensor([0, 1]), torch.tensor([8.0, 1.0]))
    wtr.update(torch.tensor([0]), torch.tensor([0.0]))
    # instance 0: 4 -> 0.75*4 + 0.25*8 = 5 -> 0.75*5 + 0 = 3.75; instance 1: first score 1; 2: -2; 3 never
    assert wtr.scores.tolist() == [3.75, 1.0, -2.0, 0.0]
    assert wtr.scored.tolist() == [True, True, True, False]


def test_unscored_take_class_mean_and_unscored_class_is_uniform():
    lab = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    wtr = InfluenceWeighter(lab, 2, sign=1, **ZSCORE)
    s = torch.tensor([1.0, 2.0, 6.0])
    wtr.update(torch.tensor([0, 1, 2]), s)
    w = wtr.weights().double()
    # class 0 as if instance 3 had the mean of the scored ones (its z is 0)
    mean, std = s.double().mean(), s.double().std(unbiased=False)
    z = torch.cat([(s.double() - mean) / (std + 1e-8), torch.zeros(1, dtype=torch.float64)])
    _close(w[:4], 4 * torch.softmax(z, 0), rtol=1e-6, atol=1e-7)
    assert torch.equal(w[4:], torch.ones(3, dtype=torch.float64))
    assert abs(float(w[:4].mean()) - 1.0) < 1e-6


def test_affine_invariance_within_class():
    lab = _labels()
    wtr, s = _scored(lab, temperature=0.5)
    other = InfluenceWeighter(lab, 3, temperature=0.5, **ZSCORE)
    a = torch.tensor([3.0, 0.2, 17.0], dtype=torch.float64)[lab]
    b = torch.tensor([-5.0, 100.0, 0.3], dtype=torch.float64)[lab]
    other.update(torch.arange(60), a * s + b)
    _close(other.weights(), wtr.weights(), rtol=1e-5, atol=1e-6)


def test_batch_and_normalized_batch_weights_and_cache():
    lab = _labels()
    wtr, _ = _scored(lab)
    idx = torch.tensor([5, 0, 17, 33, 5 + 1])
    assert torch.equal(wtr.batch_weights(idx), wtr.weights()[idx])
    wn = wtr.normalized_batch_weights(idx, lab[idx])
    for k in lab[idx].unique():
        assert abs(float(wn[lab[idx] == k].sum()) - 1.0) < 1e-6
    _close(wn, wtr.normalized_batch_weights(idx))
    before = wtr.weights().clone()
    wtr.update(torch.tensor([0]), torch.tensor([50.0]))  # invalidates the cache
    assert not torch.equal(before, wtr.weights())
    bad_labels = lab[idx].clone()
    bad_labels[1] = (bad_labels[1] + 1) % 3
    with pytest.raises(ValueError, match=r"\[0\]"):
        wtr.normalized_batch_weights(idx, bad_labels)


def test_save_load_roundtrip_exact(tmp_path):
    lab = _labels()
    wtr = InfluenceWeighter(lab, 3, temperature=math.inf, ema=0.6, floor=0.25, sign=-1, eps=1e-6)
    g = torch.Generator().manual_seed(3)
    wtr.update(torch.arange(0, 40), torch.randn(40, generator=g, dtype=torch.float64) * 1e3 / 7)
    wtr.update(torch.arange(10, 20), torch.randn(10, generator=g, dtype=torch.float64))
    path = tmp_path / "w.safetensors"
    wtr.save(path)
    for labels in (None, lab.clone()):
        back = InfluenceWeighter.load(path, labels=labels)
        assert torch.equal(back.scores, wtr.scores) and torch.equal(back.scored, wtr.scored)
        assert back.hyperparameters() == wtr.hyperparameters()
        assert torch.equal(back.labels, lab)
    back.temperature = wtr.temperature = 0.3
    assert torch.equal(back.weights(), wtr.weights())
    sd = InfluenceWeighter(lab, 3)
    sd.load_state_dict(wtr.state_dict())
    assert torch.equal(sd.weights(), wtr.weights())


def test_loading_against_other_labels_raises(tmp_path):
    lab = _labels()
    wtr, _ = _scored(lab)
    path = tmp_path / "w.safetensors"
    wtr.save(path)
    other = lab.clone()
    other[[0, 1]] = other[[1, 0]] if other[0] != other[1] else (other[[0, 1]] + 1) % 3
    with pytest.raises(ValueError, match="sha256 differs"):
        InfluenceWeighter.load(path, labels=other)
    with pytest.raises(ValueError, match="n 60 vs 61"):
        InfluenceWeighter.load(path, labels=torch.cat([lab, lab[:1]]))
    with pytest.raises(ValueError, match="another dataset"):
        InfluenceWeighter(other, 3).load_state_dict(wtr.state_dict())
    with pytest.raises(ValueError, match="num_classes 3 vs 4"):
        InfluenceWeighter(lab, 4).load_state_dict(wtr.state_dict())


def test_update_errors_name_indices():
    wtr = InfluenceWeighter(_labels(), 3)
    with pytest.raises(ValueError, match=r"duplicated indices \[4, 7\]"):
        wtr.update(torch.tensor([4, 7, 1, 7, 4]), torch.zeros(5))
    with pytest.raises(ValueError, match=r"out of range \[0, 60\): \[60, -1\]"):
        wtr.update(torch.tensor([60, 3, -1]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"non-finite scores at indices \[9, 2\]"):
        wtr.update(torch.tensor([9, 5, 2]), torch.tensor([math.nan, 0.0, math.inf]))
    assert not bool(wtr.scored.any())  # failed updates leave no trace
    with pytest.raises(ValueError, match="temperature"):
        InfluenceWeighter(_labels(), 3, temperature=0.0)
    with pytest.raises(ValueError, match="floor"):
        InfluenceWeighter(_labels(), 3, floor=1.5)
    with pytest.raises(ValueError, match="sign"):
        InfluenceWeighter(_labels(), 3, sign=0)


def test_sign_policies():
    assert sign_for("explicit", "informative") == 1 and sign_for("implicit", "informative") == 1
    assert sign_for("explicit", "consistent") == -1 and sign_for("explicit", "auto") == -1
    assert sign_for("implicit", "auto") == -1
    assert sign_for("validation", "auto") == 1 and sign_for("self", "auto") == -1 and sign_for("crossfit") == -1
    assert set(W.SIGN_POLICIES) == {"explicit", "implicit", "validation", "self", "crossfit", "prototype"}
    for target, policy in (("validation", "informative"), ("self", "consistent"), ("bogus", "auto"),
                           ("explicit", "bogus")):
        with pytest.raises(ValueError):
            sign_for(target, policy)


def test_self_target_upweights_small_norms():
    lab = torch.zeros(5, dtype=torch.int64)
    wtr = InfluenceWeighter(lab, 1, sign=sign_for("self"))
    wtr.update(torch.arange(5), torch.tensor([0.1, 5.0, 0.2, 9.0, 0.3]))
    assert int(wtr.weights().argmax()) == 0 and int(wtr.weights().argmin()) == 3


def test_weight_mass_on():
    w = torch.tensor([1.0, 3.0, 0.0, 4.0])
    assert weight_mass_on(w, torch.tensor([True, False, True, True])) == pytest.approx(5 / 8)
    wtr = InfluenceWeighter(_labels(), 3)
    assert wtr.weight_mass_on(torch.arange(60) < 15) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="bool"):
        weight_mass_on(w, torch.tensor([1, 0, 0, 1]))


@pytest.mark.parametrize("impl", ["auto", "rank"])
def test_auroc_hand_examples(impl):
    pos = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), pos, impl=impl) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), pos, impl=impl) == 0.0
    assert auroc(torch.ones(4), pos, impl=impl) == 0.5
    # one positive above both negatives, one tied with a negative and below the other: (2 + 0.5) / 4
    assert auroc(torch.tensor([0.3, 0.5, 0.9, 0.3]), pos, impl=impl) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc(torch.ones(3), torch.ones(3, dtype=torch.bool), impl=impl)


def test_auroc_rank_agrees_with_sklearn():
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        s = torch.randint(0, 7, (200,), generator=g).double() + (trial % 2) * torch.rand(200, generator=g)
        pos = torch.rand(200, generator=g) < 0.3 + 0.1 * trial
        a, b = auroc(s, pos, impl="sklearn"), auroc(s, pos, impl="rank")
        assert a == pytest.approx(b, abs=1e-12)
        assert 0.3 < a < 0.7  # random scores: near chance, so the check is not trivially 0 or 1


def test_auroc_without_sklearn_falls_back_to_rank(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # makes the import raise ImportError
    pos = torch.tensor([False, True, False, True])
    assert auroc(torch.tensor([0.3, 0.5, 0.9, 0.3]), pos) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="not installed"):
        auroc(torch.tensor([0.3, 0.5, 0.9, 0.3]), pos, impl="sklearn")


# ------------------------------------------------------------------ bounded weights, standardised updates
def _heavy_tailed(n, gen):
    s = torch.randn(n, generator=gen, dtype=torch.float64)
    s[:3] = torch.tensor([40.0, 80.0, 200.0], dtype=torch.float64)  # a few extreme scores
    return s


def test_rank_transform_bounds_the_weights_where_zscore_does_not():
    gen = torch.Generator().manual_seed(0)
    n = 2000
    labels = torch.zeros(n, dtype=torch.long)
    scores = _heavy_tailed(n, gen)
    z = InfluenceWeighter(labels, 1, temperature=0.2, ema=0.0, **ZSCORE)
    r = InfluenceWeighter(labels, 1, temperature=0.2, ema=0.0, transform="rank", standardize=False)
    for wt in (z, r):
        wt.update(torch.arange(n), scores)
    wz, wr = z.weights(), r.weights()
    assert float(wz.max()) > 100.0  # one instance carries a twentieth of its class
    # bound by design: z <= ndtri(1 - 1/(2n)), and the softmax denominator is a mean over the rank grid
    zmax = float(torch.special.ndtri(torch.tensor(1 - 0.5 / n, dtype=torch.float64)))
    grid = torch.special.ndtri((torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n)
    bound = math.exp(zmax / 0.2) / float(torch.exp(grid / 0.2).mean())
    assert float(wr.max()) == pytest.approx(bound, rel=1e-5)
    assert float(wr.mean()) == pytest.approx(1.0, abs=1e-5)
    # ranks ignore the scale of the tail: a monotone map of the scores leaves the weights unchanged
    r2 = InfluenceWeighter(labels, 1, temperature=0.2, ema=0.0, transform="rank", standardize=False)
    r2.update(torch.arange(n), torch.sinh(scores))
    assert torch.equal(r2.weights(), wr)


def test_standardized_updates_are_invariant_to_each_batchs_offset_and_scale():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % 3
    batches = [torch.randperm(60, generator=gen)[:20] for _ in range(4)]
    raw = [torch.randn(20, generator=gen, dtype=torch.float64) for _ in batches]
    maps = [(0.01, 5.0), (30.0, -2.0), (1.0, 0.0), (4.0, 100.0)]  # per-batch affine: a new network each time

    def weights(standardize, with_maps):
        wt = InfluenceWeighter(labels, 3, ema=0.5, standardize=standardize)
        for idx, s, (a, b) in zip(batches, raw, maps):
            uniq = torch.unique(idx)  # distinct indices per update
            keep = torch.isin(idx, uniq)
            wt.update(idx[keep], (a * s + b)[keep] if with_maps else s[keep])
        return wt.weights()

    assert torch.allclose(weights(True, True), weights(True, False), atol=1e-6)
    assert not torch.allclose(weights(False, True), weights(False, False), atol=1e-3)


def test_transform_and_standardize_survive_save_and_load(tmp_path):
    labels = torch.arange(30) % 3
    wt = InfluenceWeighter(labels, 3, temperature=0.5, transform="rank", standardize=True)
    wt.update(torch.arange(30), torch.linspace(-1, 1, 30))
    wt.save(str(tmp_path / "w.safetensors"))
    back = InfluenceWeighter.load(str(tmp_path / "w.safetensors"), labels)
    assert (back.transform, back.standardize) == ("rank", True)
    assert torch.equal(back.weights(), wt.weights())
    with pytest.raises(ValueError, match="transform"):
        InfluenceWeighter(labels, 3, transform="softplus")


def test_batch_weights_follow_the_requested_device():
    wt = InfluenceWeighter(torch.arange(10) % 2, 2)
    idx = torch.tensor([1, 4, 7])
    assert wt.batch_weights(idx, device="meta").device.type == "meta"
    assert wt.batch_weights(idx).device.type == "cpu"


def test_relative_batch_weights_stay_defined_where_float32_weights_underflow():
    labels = torch.zeros(50, dtype=torch.long)
    wt = InfluenceWeighter(labels, 1, temperature=0.01, ema=0.0, transform="zscore")
    wt.update(torch.arange(50), torch.linspace(0, 1, 50, dtype=torch.float64))
    batch = torch.arange(10)  # the lowest scores: every float32 weight of the batch is 0
    assert float(wt.batch_weights(batch).max()) == 0.0
    rel = wt.relative_batch_weights(batch)
    assert float(rel.max()) == 1.0 and int(rel.argmax()) == 9
    # the ratios are the exact ones of the softmax: exp((z_i - z_9) / tau)
    z = (torch.linspace(0, 1, 50, dtype=torch.float64) - 0.5) / torch.linspace(0, 1, 50, dtype=torch.float64).std(unbiased=False)
    want = torch.exp((z[:10] - z[9]) / 0.01).float()
    assert torch.allclose(rel, want, rtol=1e-5, atol=0)
    assert math.isfinite(wt.batch_log_weight_sum(batch)) and wt.batch_log_weight_sum(batch) < -100
