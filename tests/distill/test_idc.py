"""IDC: multi-formation decode (shape, values, gradient), the mix initialisation and IDC's distance."""
import pytest
import torch
import torch.nn.functional as F

from iwd_fast.distill.idc import decode_multi, idc_distance, mix_initial_images


def test_decode_shape_order_and_values():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    out = decode_multi(x, 2)
    assert out.shape == (12, 2, 8, 8)
    for i in range(2):
        for j in range(2):
            tile = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            expected = F.interpolate(tile, size=(8, 8), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out[(2 * i + j) * 3:(2 * i + j + 1) * 3], expected, rtol=0, atol=0)
    assert decode_multi(x, 1) is x
    assert decode_multi(torch.randn(2, 1, 7, 7), 2).shape == (8, 1, 7, 7)  # 7 is padded to 8, then tiled
    assert decode_multi(torch.randn(1, 3, 28, 28), 3).shape == (9, 3, 28, 28)
    with pytest.raises(ValueError, match="factor"):
        decode_multi(x, 0)


def test_decode_gradient_reaches_stored_pixels():
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: decode_multi(t, 2), (x,))
    assert torch.autograd.gradcheck(lambda t: decode_multi(t, 2), (torch.randn(1, 1, 5, 5, dtype=torch.float64,
                                                                              requires_grad=True),))
    g = torch.autograd.grad(decode_multi(x, 2).sum(), x)[0]
    assert bool((g > 0).all())  # every stored pixel feeds some decoded pixel


def test_mix_initialisation_puts_one_real_image_per_tile():
    real = torch.randn(8, 1, 8, 8)  # factor 2: 4 tiles x 2 stored images
    stored = mix_initial_images(real, 2)
    assert stored.shape == (2, 1, 8, 8)
    for i in range(2):
        for j in range(2):
            block = real[(2 * i + j) * 2:(2 * i + j + 1) * 2]
            expected = F.interpolate(block, size=(4, 4), mode="bilinear", align_corners=False)
            torch.testing.assert_close(stored[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], expected)
    with pytest.raises(ValueError, match="multiple"):
        mix_initial_images(real[:7], 2)


def test_idc_distance_metrics_and_which_parameters_count():
    torch.manual_seed(0)
    conv_s, conv_r = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    fc_s, fc_r = torch.randn(3, 5), torch.randn(3, 5)
    b_s, b_r = torch.randn(4), torch.randn(4)
    gs, gr = [conv_s, b_s, fc_s], [conv_r, b_r, fc_r]
    assert idc_distance(gs, gr, "l1") == pytest.approx(float((conv_s - conv_r).abs().sum()), rel=1e-6)
    assert idc_distance(gs, gr, "mse") == pytest.approx(float((conv_s - conv_r).pow(2).sum()), rel=1e-6)
    a, b = conv_s.reshape(4, -1), conv_r.reshape(4, -1)
    cos = (1 - F.cosine_similarity(a, b, dim=1, eps=0)).sum()
    assert idc_distance(gs, gr, "cos") == pytest.approx(float(cos), rel=1e-5)
    full = float((conv_s - conv_r).abs().sum() + (b_s - b_r).abs().sum() + (fc_s - fc_r).abs().sum())
    assert idc_distance(gs, gr, "l1", match_bias=True, match_fc=True) == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError, match="metric"):
        idc_distance(gs, gr, "l3")


def test_idc_scores_come_from_the_matching_backward():
    """IWD in IDC: the weighted real loss of a matching step is captured; the self-influence scores it
    yields equal ||g_i||^2 computed independently on the same real batch (weights' scaling undone)."""
    import dataclasses

    from iwd_fast import grad_norm_sq
    from iwd_fast.app.distill_job import prepare_pool
    from iwd_fast.app.presets import preset_config
    from iwd_fast.data import DatasetSplits, from_tensors
    from iwd_fast.distill import IWDState, SyntheticSet
    from iwd_fast.distill.base import build_net
    from iwd_fast.distill.config import IWDSpec
    from iwd_fast.distill.idc import IDC
    from iwd_fast.runtime import PhaseTimer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.arange(4).repeat(12)
    train = from_tensors(x, y, "digits", 4)
    splits = DatasetSplits(train=train, test=train)
    cfg = preset_config("smoke", "idc", "digits", 2)
    cfg = cfg.replace(weighting="iwd", batch_real=6, iwd=IWDSpec(influence="self", refresh=1),
                      idc=dataclasses.replace(cfg.idc, aug="none"))
    device = torch.device("cpu")
    pool = prepare_pool(cfg, splits, device)
    iwd = IWDState.from_config(cfg, pool, PhaseTimer())
    iwd.weighter.update(torch.arange(len(pool.labels)), torch.rand(len(pool.labels), generator=g).double())
    syn = SyntheticSet(pool.images[:8].clone(), 4, 2)
    method = IDC(cfg, pool, syn, iwd, None, device)
    seen = {}
    iwd.update = lambda idx, raw: seen.update(idx=idx.clone(), raw=raw.detach().clone())
    net = build_net(cfg.net, pool, 0, device)
    loss = method._class_term(net, [n for n, _ in net.named_parameters()], list(net.parameters()), 1, True, None)
    assert loss.requires_grad and float(loss.detach()) > 0
    idx = seen["idx"]
    assert bool((pool.labels[idx] == 1).all()) and len(idx) == 6
    expected = grad_norm_sq(net, pool.images[idx], pool.labels[idx], impl="reference")
    torch.testing.assert_close(seen["raw"], expected, rtol=1e-5, atol=0)  # float32 sums: measured 7e-7


def test_idc_implicit_influence_matches_autograd_through_the_look_ahead():
    """IWD's implicit target in IDC (float64): the score the matching step records for each real instance is
    the derivative of IDC's objective after one look-ahead step of the STORED images (decoded inside),
    L(S'(w), w) with S' = S - lr_img grad_S L(S, w), computed here by exact autograd. Failed before the
    IDC matching term was shared with DC (the look-ahead was taken w.r.t. a tensor outside the graph)."""
    import dataclasses

    import torch.nn.functional as F

    from iwd_fast.app.distill_job import prepare_pool
    from iwd_fast.app.presets import preset_config
    from iwd_fast.data import DatasetSplits, from_tensors
    from iwd_fast.distill import IWDState, SyntheticSet
    from iwd_fast.distill.base import build_net
    from iwd_fast.distill.config import IWDSpec
    from iwd_fast.distill.idc import IDC
    from iwd_fast.runtime import PhaseTimer

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(56, 1, 8, 8, generator=g), torch.arange(4).repeat(14)
    train = from_tensors(x, y, "digits", 4)
    cfg = preset_config("smoke", "idc", "digits", 2)
    alpha = 2e-3
    cfg = cfg.replace(weighting="iwd", batch_real=7, lr_img=alpha,
                      iwd=IWDSpec(influence="implicit", refresh=1, standardize=False),
                      idc=dataclasses.replace(cfg.idc, aug="none", metric="mse"))
    device = torch.device("cpu")
    pool = prepare_pool(cfg, DatasetSplits(train=train, test=train), device)
    pool = dataclasses.replace(pool, images=pool.images.double())
    iwd = IWDState.from_config(cfg, pool, PhaseTimer())
    syn = SyntheticSet(torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), 4, 2)
    method = IDC(cfg, pool, syn, iwd, None, device)
    seen = {}
    iwd.update = lambda idx, raw: seen.update(idx=idx.clone(), raw=raw.detach().clone())
    net = build_net(cfg.net, pool, 0, device).double()
    c = 2
    method._class_term(net, [n for n, _ in net.named_parameters()], list(net.parameters()), c, True, None)
    idx = seen["idx"]
    assert len(idx) == 7 and bool((pool.labels[idx] == c).all())

    xr, yr = pool.images[idx], pool.labels[idx]
    y_syn = torch.full((8,), c)

    def loss(stored, w):  # IDC's objective with weighted real loss, fresh parameter leaves each call
        theta = {n: q.detach().requires_grad_(True) for n, q in net.named_parameters()}
        call = lambda inp: torch.func.functional_call(net, theta, (inp,))  # noqa: E731
        real = torch.autograd.grad(((w / w.sum()) * F.cross_entropy(call(xr), yr, reduction="none")).sum(),
                                   list(theta.values()), create_graph=True)
        synth = torch.autograd.grad(F.cross_entropy(call(decode_multi(stored, 2)), y_syn), list(theta.values()),
                                    create_graph=True)
        return idc_distance(synth, real, "mse")

    w = torch.ones(7, dtype=torch.float64, requires_grad=True)
    s = syn.of_class(c).detach().clone().requires_grad_(True)
    u = torch.autograd.grad(loss(s, w), s, create_graph=True)[0]
    look_ahead = torch.autograd.grad(loss(s - alpha * u, w), w)[0]
    explicit = torch.autograd.grad(loss(s.detach(), w), w)[0]
    got = seen["raw"]
    correction_exact, correction_got = look_ahead - explicit, got - explicit
    assert correction_exact.abs().max() > 1e-6 * explicit.abs().max()
    ratio = float(correction_got @ correction_exact / (correction_exact @ correction_exact))
    assert ratio == pytest.approx(1.0, abs=0.05), ratio
    assert (got - look_ahead).abs().max() < 0.1 * correction_exact.abs().max()
