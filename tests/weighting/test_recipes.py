"""The README's drop-in recipes, run in loops written the way the reference distillers are (float64).

Each loop uses only the recipe's lines; the scores must equal an explicit per-sample loop, the weighted
real gradient the weighted mean of per-sample gradients, and the weighted losses their explicit forms.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import iwd_fast
from iwd_fast.data import class_indices, stratified_split
from iwd_fast.networks import build_network
from iwd_fast.scoring.oracle import per_sample_grads
from iwd_fast.weighting import IndexedDataset, InfluenceWeighter, sign_for, weighted_class_mean, weighted_cross_entropy
from iwd_fast.weighting.targets import embedding_influence, validation_directions

C = 3


def _data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(n // C)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) + y.view(-1, 1, 1, 1).double()
    return x, y


def _ce(out, t):
    return F.cross_entropy(out, t, reduction="none")


def test_dc_recipe_in_a_reference_style_loop():
    images_all, labels_all = _data()
    pool, held = stratified_split(labels_all, 0.1, seed=0)                 # the held-out split, out of the pool
    x_val, y_val = images_all[held], labels_all[held]
    images_all, labels_all = images_all[pool], labels_all[pool]           # re-indexed: pool indices from here on
    indices_class = class_indices(labels_all, C)
    sampler = iwd_fast.IndexedClassSampler(labels_all, C, seed=0)
    W = InfluenceWeighter(labels_all, C, sign=sign_for("validation"))
    torch.manual_seed(0)
    net = build_network("convnet", 1, C, (8, 8), width=4, depth=2).double()
    net_parameters = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    for outer in range(2):
        v_val = validation_directions(net, x_val, y_val, scale=0.01)      # once per outer step
        for c in range(C):
            idx = sampler.sample(c, 8)
            assert set(idx.tolist()) <= set(indices_class[c].tolist())
            img_real, lab_real = images_all[idx], labels_all[idx]
            w = W.batch_weights(idx, device=img_real.device)
            with iwd_fast.capture(net, directions=v_val) as cap:
                gw_real = cap.weighted_gradient(F.cross_entropy(net(img_real), lab_real, reduction="none"), w,
                                                net_parameters)
            scores = cap.grad_dot()
            W.update(idx, scores)
            # the explicit per-sample loop
            per = per_sample_grads(net, img_real, lab_real, _ce, names)
            want_scores = sum((per[n].flatten(1) * v_val[n].flatten()).sum(1) for n in names)
            assert torch.allclose(scores, want_scores, rtol=1e-9, atol=1e-13)
            wn = w.double() / w.double().sum()
            for n, g in zip(names, gw_real):
                assert torch.allclose(g, torch.einsum("b,b...->...", wn, per[n]), rtol=1e-9, atol=1e-13)
        with torch.no_grad():  # a training step of the network between outer steps
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    assert W.scored.sum() > 0 and not torch.allclose(W.weights(), torch.ones(len(labels_all)))


def test_dm_recipe_with_frozen_parameters_both_branches():
    images_all, labels_all = _data()
    torch.manual_seed(1)
    net = build_network("convnet", 1, C, (8, 8), width=4, depth=2).double()
    for p in net.parameters():
        p.requires_grad = False                                            # DM's reference freezes the network
    embed = net.embed
    sampler = iwd_fast.IndexedClassSampler(labels_all, C, seed=0)
    W = InfluenceWeighter(labels_all, C, sign=sign_for("explicit", "informative"))
    syn = torch.randn(C * 2, 1, 8, 8, dtype=torch.float64)
    batch = 6
    idx = torch.stack([sampler.sample(c, batch) for c in range(C)])       # [C, B]
    w = W.batch_weights(idx.flatten()).reshape(C, batch)
    # ConvNet branch: one class at a time
    for c in range(C):
        output_real = embed(images_all[idx[c]]).detach()
        output_syn = embed(syn[2 * c:2 * c + 2])
        mean_real = weighted_class_mean(output_real, w[c])
        scores = embedding_influence(output_real, output_syn, w[c])
        wl = w[c].double().clone().requires_grad_(True)                    # exact: autograd of D w.r.t. w
        d = ((weighted_class_mean(output_real, wl, validate=False) - output_syn.mean(0)) ** 2).sum()
        assert torch.allclose(scores, torch.autograd.grad(d, wl)[0], rtol=1e-10, atol=1e-14)
        assert torch.allclose(mean_real, (w[c, :, None] * output_real).sum(0) / w[c].sum())
        W.update(idx[c], scores)
    # ConvNetBN branch: all classes in one batch, reshaped to [C, B, F]
    output_real = embed(images_all[idx.flatten()]).detach().reshape(C, batch, -1)
    means = weighted_class_mean(output_real, W.batch_weights(idx.flatten()).reshape(C, batch), dim=1)
    for c in range(C):
        wc = W.batch_weights(idx[c])
        assert torch.allclose(means[c], (wc[:, None].double() * output_real[c]).sum(0) / wc.sum())


def test_mtt_expert_epoch_with_class_mixed_batches():
    images_all, labels_all = _data(seed=2)
    W = InfluenceWeighter(labels_all, C, sign=sign_for("self"), ema=0.0)
    W.update(torch.arange(len(labels_all)), torch.rand(len(labels_all), dtype=torch.float64))
    loader = DataLoader(IndexedDataset(TensorDataset(images_all, labels_all)), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    teacher = build_network("convnet", 1, C, (8, 8), width=4, depth=2).double()
    seen = []
    for x, y, idx in loader:
        assert len(set(y.tolist())) > 1 or len(y) < 4                    # batches mix classes
        w = W.batch_weights(idx, device=x.device)
        loss = weighted_cross_entropy(teacher(x), y, w)
        explicit = (W.weights()[idx].double() * _ce(teacher(x), y)).sum() / W.weights()[idx].double().sum()
        assert torch.allclose(loss, explicit, rtol=1e-6)
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(labels_all)))


def test_the_weights_follow_the_data_and_a_forgotten_sample_weights_is_impossible():
    x, y = _data(12)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, C)).double()
    W = InfluenceWeighter(y, C)
    idx = torch.arange(12)
    assert W.batch_weights(idx, device="meta").device.type == "meta"
    with iwd_fast.capture(net) as cap:
        cap.weighted_gradient(F.cross_entropy(net(x), y, reduction="none"), W.batch_weights(idx), list(net.parameters()))
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    ref = iwd_fast.grad_dot(net, x, y, v, impl="reference")
    assert torch.allclose(cap.grad_dot(v), ref, rtol=1e-10)  # nothing to remember: no sample_weights argument


def _readme_in_loop_long_form(images_all, labels_all, held_images, held_labels, steps, draws):
    """README recipe 2 line by line (REFRESH = 3, 256 held-out images, keep 0.7): the gradients and weights."""
    REFRESH = 3
    weighter = iwd_fast.InfluenceWeighter(labels_all, C)
    torch.manual_seed(1)
    net = build_network("convnet", 1, C, (8, 8), width=4, depth=2)
    net_parameters = list(net.parameters())
    grads = []
    for ol in range(steps):
        scoring = ol % REFRESH == 0
        if scoring:
            pick = torch.randperm(len(held_labels), generator=torch.Generator().manual_seed(ol))[:256]
            v_val = validation_directions(net, held_images[pick], held_labels[pick], scale=0.01, keep=0.7)
        for c in range(C):
            idx = draws[ol][c]
            img_real, lab_real = images_all[idx], labels_all[idx]
            if scoring:
                with iwd_fast.capture(net, directions=v_val) as cap:
                    losses = F.cross_entropy(net(img_real), lab_real, reduction="none")
                    gw_real = list(cap.weighted_gradient(losses, weighter.relative_batch_weights(idx), net_parameters))
                weighter.update(idx, cap.grad_dot())
            else:
                loss_real = iwd_fast.weighted_cross_entropy(net(img_real), lab_real, weighter.relative_batch_weights(idx))
                gw_real = torch.autograd.grad(loss_real, net_parameters)
            grads.append([g.clone() for g in gw_real])
            with torch.no_grad():                                     # move the network, as matching would
                for p, g in zip(net_parameters, gw_real):
                    p -= 0.5 * g
    return grads, weighter.weights()


def _helper_in_loop(images_all, labels_all, held_images, held_labels, steps, draws):
    """The same loop through ``iwd_fast.InLoopWeights`` (its defaults: the README's constants)."""
    in_loop = iwd_fast.InLoopWeights(labels_all, C, held_images, held_labels)
    torch.manual_seed(1)
    net = build_network("convnet", 1, C, (8, 8), width=4, depth=2)
    net_parameters = list(net.parameters())
    grads = []
    for ol in range(steps):
        in_loop.begin_step(net, ol, scale=0.01)
        for c in range(C):
            idx = draws[ol][c]
            gw_real = in_loop.real_gradient(net, images_all[idx], labels_all[idx], idx, net_parameters)
            grads.append([g.clone() for g in gw_real])
            with torch.no_grad():
                for p, g in zip(net_parameters, gw_real):
                    p -= 0.5 * g
    return grads, in_loop.weighter.weights()


def test_in_loop_weights_is_the_readme_long_form_bit_for_bit():
    x, y = _data(n=90)
    x, y = x.float(), y.clone()
    y[torch.tensor([4, 17, 40, 61])] = (y[torch.tensor([4, 17, 40, 61])] + 1) % C      # some flipped labels
    pool, held = stratified_split(y, 0.1, seed=0)
    images_all, labels_all, held_images, held_labels = x[pool], y[pool], x[held], y[held]
    sampler = iwd_fast.IndexedClassSampler(labels_all, C, seed=3)
    steps = 5                                                          # scored at 0 and 3, plain at 1, 2, 4
    draws = [[sampler.sample(c, 7) for c in range(C)] for _ in range(steps)]
    long_grads, long_weights = _readme_in_loop_long_form(images_all, labels_all, held_images, held_labels, steps, draws)
    grads, weights = _helper_in_loop(images_all, labels_all, held_images, held_labels, steps, draws)
    assert len(grads) == len(long_grads) == steps * C
    for mine, theirs in zip(grads, long_grads):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert torch.equal(weights, long_weights)
    assert not torch.equal(weights, torch.ones_like(weights))         # the scores moved the weights


def test_in_loop_weights_refuses_a_mismatched_heldout_set():
    x, y = _data()
    with pytest.raises(ValueError, match="InLoopWeights: need as many held-out images as labels.*6 images and 5"):
        iwd_fast.InLoopWeights(y, C, x[:6], y[:5])
    with pytest.raises(ValueError, match=r"InLoopWeights \(heldout_labels\): labels outside \[0, 3\) at indices \[1\]"):
        iwd_fast.InLoopWeights(y, C, x[:2], torch.tensor([0, 7]))


@pytest.mark.parametrize("option, value, words", [("refresh", 0, r"refresh must be >= 1, got 0"),
                                                  ("heldout_batch", -2, r"heldout_batch must be >= 1, got -2"),
                                                  ("heldout_keep", 0.0, r"heldout_keep must lie in \(0, 1\], got 0.0"),
                                                  ("heldout_keep", float("nan"), r"heldout_keep must lie in \(0, 1\], got nan"),
                                                  ("refresh", "three", r"refresh must be a number, got 'three'"),
                                                  ("heldout_batch", float("nan"), r"heldout_batch must be a number, got nan")])
def test_in_loop_options_are_refused_alike_by_the_helper_and_a_run(option, value, words):
    """InLoopWeights and a run's config share one check: the same option refused in the same words."""
    from iwd_fast.distill.config import DistillConfig, validate
    x, y = _data()
    with pytest.raises(ValueError, match="InLoopWeights: " + words):
        iwd_fast.InLoopWeights(y, C, x[:4], y[:4], **{option: value})
    cfg = DistillConfig(method="dc", weighting="iwd")
    setattr(cfg.iwd, option, value)
    with pytest.raises(ValueError, match=r"iwd\." + words):
        validate(cfg)
