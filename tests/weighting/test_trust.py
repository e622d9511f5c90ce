"""How strongly to weight: cross-fitted out-of-sample probabilities, the confident-learning noise estimate
and the trust weights (METHOD.md section 4b), checked against hand-computed cases."""
import pytest
import torch
import torch.nn as nn

from iwd_fast.weighting import (InfluenceWeighter, crossfit_probabilities, estimate_noise, select_initial,
                                trust_weights)
from iwd_fast.weighting.trust import stratified_folds

# Two classes, six instances (rows: p(class 0), p(class 1)); worked out by hand below.
PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8],     # labelled 0; instance 2 looks like a 1
                      [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)  # labelled 1; 5 is unsure
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_confident_learning_by_hand():
    est = estimate_noise(PROBS, LABELS, 2)
    # t_0 = mean p_0 over labels 0 = (0.9 + 0.8 + 0.2) / 3; t_1 = (0.9 + 0.7 + 0.4) / 3
    torch.testing.assert_close(est.thresholds, torch.tensor([1.9 / 3, 2.0 / 3], dtype=torch.float64))
    # p_i0 >= t_0 for 0 and 1; p_i1 >= t_1 for 2, 3, 4; instance 5 clears neither threshold (0.6 < 0.633)
    assert est.confident_class.tolist() == [0, 0, 1, 1, 1, -1]
    # class 0: confident joint row (2 as 0, 1 as 1) -> rate 1/3 -> round(1/3 * 3) = 1 suspect, the largest margin
    # class 1: row (0 as 0, 2 as 1; instance 5 is in no cell) -> rate 0, no suspect although 5's margin is positive
    torch.testing.assert_close(est.rates, torch.tensor([1 / 3, 0.0], dtype=torch.float64))
    assert est.suspect.tolist() == [False, False, True, False, False, False]
    torch.testing.assert_close(est.margin, torch.tensor([-0.8, -0.6, 0.6, -0.8, -0.4, 0.2], dtype=torch.float64))
    assert est.runner_up.tolist() == [1, 1, 1, 0, 0, 0]
    assert est.noise_rate == pytest.approx(1 / 6)
    assert est.summary() == {"estimated_rate": pytest.approx(1 / 6), "class_rates": [0.3333, 0.0], "suspects": 1}


def test_trust_weights_by_hand_and_a_clean_class_stays_at_exactly_one():
    w = trust_weights(torch.tensor([False, False, True, False, False, False]), LABELS, 2)
    assert w.tolist() == [1.5, 1.5, 0.0, 1.0, 1.0, 1.0]  # mean 1 in each class
    with pytest.raises(ValueError, match=r"every instance of classes \[1\] is a suspect"):
        trust_weights(torch.tensor([False, False, False, True, True, True]), LABELS, 2)
    with pytest.raises(ValueError, match="suspect must be bool"):
        trust_weights(torch.zeros(6), LABELS, 2)


def test_the_rate_is_capped_where_the_networks_rather_than_the_labels_failed():
    # three of the four instances labelled 0 confidently look like a 1 (t_0 = 0.2625, t_1 = 0.6): rate 3/4,
    # capped at max_rate (half the class); the tied margins go to the lower indices
    probs = torch.tensor([[0.05, 0.95]] * 3 + [[0.9, 0.1]] + [[0.4, 0.6]] * 4, dtype=torch.float64)
    labels = torch.tensor([0] * 4 + [1] * 4)
    est = estimate_noise(probs, labels, 2)
    assert est.rates.tolist() == [0.5, 0.0] and est.suspect.tolist() == [True, True] + [False] * 6
    assert estimate_noise(probs, labels, 2, max_rate=0.25).suspect.tolist() == [True] + [False] * 7
    assert estimate_noise(probs, labels, 2, max_rate=0.9).rates[0] == 0.75


def test_bad_probabilities_are_named():
    p = PROBS.clone()
    p[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"indices \[4\]"):
        estimate_noise(p, LABELS, 2)
    with pytest.raises(ValueError, match=r"must be \[6, 3\]"):
        estimate_noise(PROBS, LABELS, 3)


def test_folds_are_stratified_and_seeded():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 9)
    fold = stratified_folds(labels, 3, seed=4)
    for c, n in ((0, 7), (1, 4), (2, 9)):
        counts = torch.bincount(fold[labels == c], minlength=3)
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == n
    assert torch.equal(fold, stratified_folds(labels, 3, seed=4))
    assert not torch.equal(fold, stratified_folds(labels, 3, seed=5))


class _Remembers(nn.Module):
    """Logits that say "seen in training" (class 0) or not (class 1); pixel 0 of an image is its index."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))
        self.seen = set()

    def forward(self, x):
        ids = x[:, 0].round().long().tolist()
        if self.training:
            self.seen.update(ids)
            return self.bias.expand(x.shape[0], 2) * 1.0
        flag = torch.tensor([1.0 if i in self.seen else -1.0 for i in ids], dtype=x.dtype)
        return torch.stack([20 * flag, -20 * flag], dim=1) + 0 * self.bias


def test_every_instance_is_predicted_by_a_network_that_never_trained_on_it():
    n = 30
    images = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    labels = torch.arange(n) % 2
    nets = []

    def make(seed):
        nets.append(_Remembers())
        return nets[-1]

    probs = crossfit_probabilities(make, images, labels, 2, folds=3, steps=4, batch_size=5, seed=0)
    assert len(nets) == 3
    assert bool((probs[:, 1] > 0.99).all())  # nobody was predicted by a network that had seen it
    fold = stratified_folds(labels, 3, seed=0)
    for k, net in enumerate(nets):  # each fold's network trained only on the other folds
        assert net.seen <= set(torch.nonzero(fold != k).flatten().tolist())


def test_crossfit_refuses_classes_smaller_than_the_folds():
    with pytest.raises(ValueError, match=r"classes \[1\] have fewer instances than folds=3"):
        crossfit_probabilities(lambda s: _Remembers(), torch.zeros(5, 3), torch.tensor([0, 0, 0, 1, 1]), 2, folds=3)


def test_prior_weights_in_the_weighter():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    prior = trust_weights(torch.tensor([False, False, True, False, False, False]), labels, 2)
    wt = InfluenceWeighter(labels, 2, prior=prior, ema=0.0, standardize=False, transform="zscore")
    assert wt.weights().tolist() == [1.5, 1.5, 0.0, 1.0, 1.0, 1.0]  # no scores yet: the prior
    wt.update(torch.arange(6), torch.tensor([1.0, -1.0, 50.0, 0.0, 1.0, 2.0]))
    w = wt.weights().double()
    # class 0: the suspect stays at 0 and is left out of the z-scores: the two others have z = +-1
    e = torch.exp(torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(w[:3], torch.cat([3 * e / e.sum(), torch.zeros(1, dtype=torch.float64)]))
    with pytest.raises(ValueError, match=r"every instance of the batch has weight 0 \(indices \[2\]\)"):
        wt.relative_batch_weights(torch.tensor([2]))


def test_trusted_initialisation():
    labels = torch.tensor([0] * 6 + [1] * 6)
    w = torch.ones(12)
    # all trusted: exactly the draw of "random"
    assert torch.equal(select_initial(labels, w, 2, 3, "trusted", seed=7), select_initial(labels, None, 2, 3, "random", seed=7))
    w[[0, 1, 2, 6]] = 0.0
    got = select_initial(labels, w, 2, 3, "trusted", seed=7)
    assert sorted(got[:3].tolist()) == [3, 4, 5]  # class 0: its only three trusted instances
    assert not set(got[3:].tolist()) & {6}
    got = select_initial(labels, w, 2, 5, "trusted", seed=7)  # fewer trusted than ipc: the rest fill in
    assert set(got[:3].tolist()) == {3, 4, 5} and set(got[3:5].tolist()) <= {0, 1, 2}


def test_trusted_weights_is_what_the_built_in_auto_holds(tiny_splits):
    """The one-call API gives the built-in warm-up's trust weights bit for bit, with the built-in's defaults."""
    import dataclasses

    from iwd_fast import trusted_weights
    from iwd_fast.app.presets import preset_config
    from iwd_fast.distill.config import IWDSpec
    from iwd_fast.distill.base import build_net
    from iwd_fast.distill.pool import prepare_pool
    from iwd_fast.distill.warmup import crossfit_estimate
    from iwd_fast.runtime import Stream, mix_seed
    from iwd_fast.weighting import CROSSFIT_DEFAULTS

    assert (IWDSpec().crossfit_folds, IWDSpec().crossfit_steps, IWDSpec().crossfit_lr) == \
        (CROSSFIT_DEFAULTS["folds"], CROSSFIT_DEFAULTS["steps"], CROSSFIT_DEFAULTS["lr"])
    cfg = preset_config("smoke", "dc", "digits", 2)
    cfg = cfg.replace(weighting="auto", noise=0.3, iwd=dataclasses.replace(cfg.iwd, crossfit_steps=20))
    pool = prepare_pool(cfg, tiny_splits, "cpu")
    built_in_weights, built_in = crossfit_estimate(cfg, pool, "cpu")
    base = mix_seed(cfg.seed, Stream.WARMUP_NETWORK)
    weights, noise = trusted_weights(lambda s: build_net(cfg.net, pool, mix_seed(base, s), "cpu"), pool.images,
                                     pool.labels, pool.num_classes, seed=mix_seed(cfg.seed, Stream.WARMUP_TRAINING),
                                     steps=20)
    assert torch.equal(noise.suspect, built_in.suspect) and bool(noise.suspect.any())
    assert torch.equal(weights, built_in_weights)
    assert torch.equal(weights, trust_weights(built_in.suspect, pool.labels, pool.num_classes))
