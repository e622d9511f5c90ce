"""Tests for iwd_fast.augment (DSA): determinism, Siamese sharing, gradients, each op, strategies."""
import pytest
import torch

from iwd_fast.data.augment import DEFAULT_STRATEGY, DSAParams, default_strategy, dsa_augment, parse_strategy


def batch(n=4, c=3, h=16, w=16, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def asymmetric_image(n=1, c=1, h=8, w=8):
    """Left half bright, right half dark, plus a ramp: a horizontal flip always changes it."""
    x = torch.zeros(n, c, h, w)
    x[..., : w // 2] = 1.0
    return x + torch.arange(w, dtype=torch.float32) * 0.01


def test_same_seed_same_output_different_seed_different():
    x = batch()
    a = dsa_augment(x, DEFAULT_STRATEGY, seed=7)
    b = dsa_augment(x, DEFAULT_STRATEGY, seed=7)
    assert torch.equal(a, b)
    differs = [not torch.equal(a, dsa_augment(x, DEFAULT_STRATEGY, seed=s)) for s in (8, 9, 10)]
    assert all(differs)


def test_siamese_same_transform_for_different_batch_sizes():
    real, syn = batch(n=6, seed=1), batch(n=2, seed=2)
    both = torch.cat([real, syn])
    out_joint = dsa_augment(both, DEFAULT_STRATEGY, seed=3)
    # one parameter draw per call, applied to every image (all statistics are per image), so augmenting
    # the two batches separately with the same seed equals augmenting them together
    assert torch.allclose(dsa_augment(real, DEFAULT_STRATEGY, seed=3), out_joint[:6], atol=1e-6)
    assert torch.allclose(dsa_augment(syn, DEFAULT_STRATEGY, seed=3), out_joint[6:], atol=1e-6)


@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, "color", "crop", "cutout", "scale", "rotate", "flip",
                                      "brightness_saturation_contrast"])
def test_shapes_dtype_and_gradient(strategy):
    x = batch(n=3, c=3, h=12, w=10).requires_grad_(True)
    out = dsa_augment(x, strategy, seed=11)
    assert out.shape == x.shape and out.dtype == x.dtype
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_double_dtype_and_single_channel():
    x = batch(n=2, c=1, h=8, w=8).double()
    out = dsa_augment(x, "color_crop_cutout_scale_rotate", seed=0)
    assert out.dtype == torch.float64 and out.shape == (2, 1, 8, 8)


def test_flip_only_when_listed():
    x = asymmetric_image()
    never = [dsa_augment(x, "", seed=s) for s in range(40)]
    assert all(torch.equal(o, x) for o in never)  # empty strategy: identity for every seed
    flipped = [torch.equal(dsa_augment(x, "flip", seed=s), x.flip(3)) for s in range(40)]
    same = [torch.equal(dsa_augment(x, "flip", seed=s), x) for s in range(40)]
    assert all(f != s for f, s in zip(flipped, same))  # each call either flips or not
    assert 5 < sum(flipped) < 35  # probability 0.5
    no_flip_params = DSAParams(flip=0.0)
    assert all(torch.equal(dsa_augment(x, "flip", seed=s, params=no_flip_params), x) for s in range(20))


def test_strategy_without_flip_never_mirrors():
    """Left half +10, right half -10: colour ops keep the sign order, geometry ops only fill zeros, so the
    left edge stays positive and the right edge negative unless the image is mirrored."""
    x = torch.full((1, 1, 16, 16), -10.0)
    x[..., :8] = 10.0

    def mirrored(out):
        return bool(out[..., :4].mean() < 0 < out[..., -4:].mean())

    strategy = default_strategy("mnist")
    assert "flip" not in strategy.split("_")
    assert not any(mirrored(dsa_augment(x, strategy, seed=s)) for s in range(40))
    # the criterion does detect flips: with flip in the strategy some seeds mirror
    assert any(mirrored(dsa_augment(x, DEFAULT_STRATEGY, seed=s)) for s in range(40))


def test_crop_translates_with_zero_fill():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) + 1.0
    moved = 0
    for s in range(20):
        out = dsa_augment(x, "crop", seed=s)
        nz = out[out != 0]
        # values are a shifted copy: the surviving pixels are original values, the rest are zero
        assert torch.all(torch.isin(nz, x.flatten()))
        moved += int(not torch.equal(out, x))
    assert moved > 10


def test_cutout_zeroes_a_square():
    x = torch.ones(2, 3, 16, 16)
    out = dsa_augment(x, "cutout", seed=4)
    zeros = (out[0, 0] == 0)
    assert 0 < int(zeros.sum()) <= 64  # at most 8x8 (0.5 * 16) and clipped at the border
    assert torch.equal(out[0], out[1]) and torch.equal(out[0, 0], out[0, 2])  # same square for all
    rows, cols = zeros.any(1).nonzero().flatten(), zeros.any(0).nonzero().flatten()
    assert int(zeros.sum()) == len(rows) * len(cols)  # a rectangle


def test_scale_and_rotate_change_geometry_only_mildly():
    x = batch(n=1, c=1, h=16, w=16, seed=5)
    for op in ("scale", "rotate"):
        out = dsa_augment(x, op, seed=2)
        assert not torch.allclose(out, x)
        assert torch.corrcoef(torch.stack([out.flatten(), x.flatten()]))[0, 1] > 0.2
    small = DSAParams(scale=1.0, rotate=0.0)
    for op in ("scale", "rotate"):  # identity transform reproduces the input
        assert torch.allclose(dsa_augment(x, op, seed=2, params=small), x, atol=1e-5)


def test_color_ops():
    x = batch(n=2, c=3, h=8, w=8, seed=6)
    b = dsa_augment(x, "brightness", seed=1) - x
    assert torch.allclose(b, b.flatten()[0].expand_as(b)) and b.abs().max() <= 0.5
    grey = x.mean(1, keepdim=True).expand_as(x)
    assert torch.allclose(dsa_augment(grey.contiguous(), "saturation", seed=1), grey)  # no chroma to scale
    out = dsa_augment(x, "contrast", seed=1)
    assert torch.allclose(out.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)  # contrast keeps the mean


def test_strategy_parsing_and_errors():
    assert parse_strategy("color_crop_flip") == ["color", "crop", "flip"]
    assert parse_strategy("") == [] and parse_strategy("none") == []
    with pytest.raises(ValueError, match="unknown DSA op 'blur'"):
        dsa_augment(batch(), "color_blur", seed=0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        dsa_augment(torch.zeros(3, 8, 8), "color", seed=0)
    with pytest.raises(ValueError, match="seed"):
        dsa_augment(batch(), "color")
    with pytest.raises(ValueError, match="flip"):
        DSAParams(flip=1.5)
    with pytest.raises(ValueError, match="scale"):
        DSAParams(scale=0.5)


def test_default_strategy():
    for name in ("digits", "mnist", "fashion-mnist", "svhn", "SVHN"):
        assert "flip" not in default_strategy(name).split("_")
        assert "rotate" in default_strategy(name)
    assert default_strategy("cifar10") == DEFAULT_STRATEGY == "color_crop_cutout_flip_scale_rotate"
    assert "flip" in default_strategy("cifar100").split("_")


def test_defaults_match_dsa_paper():
    p = DSAParams()
    assert (p.brightness, p.saturation, p.contrast, p.crop_pad, p.cutout, p.scale, p.rotate, p.flip) == (
        1.0, 2.0, 0.5, 0.125, 0.5, 1.2, 15.0, 0.5)
