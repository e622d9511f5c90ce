"""Tests for iwd_fast.networks: shapes, parameter counts, norms, determinism, errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iwd_fast.networks import (MLP, NETWORK_NAMES, BasicBlock, ConvNet, ResNet, build_network, make_norm,
                               resnet10, resnet18)

INPUTS = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]  # digits, (fashion-)mnist, cifar/svhn
CONV_FEATURE_SIDE = {8: 1, 28: 3, 32: 4}  # three 2x2 poolings with floor: 8->1, 28->14->7->3, 32->4


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("c,h,w", INPUTS)
def test_convnet_shapes(c, h, w):
    torch.manual_seed(0)
    net = ConvNet(c, 10, im_size=(h, w))
    x = torch.randn(3, c, h, w)
    side = CONV_FEATURE_SIDE[h]
    assert net.embed(x).shape == (3, 128 * side * side)
    assert net(x).shape == (3, 10)


def field_convnet(x, params, depth=3):
    """The field's ConvNet-3 written out from the protocol (SCIENCE.md section 5), float64: depth x [conv 3x3
    padding 1 -> instance norm with affine (GroupNorm(C, C)) -> ReLU -> 2x2 average pool], flatten, linear."""
    for d in range(depth):
        w, b, gamma, beta = params[4 * d:4 * d + 4]
        x = F.conv2d(x, w, b, padding=1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5) * gamma[None, :, None, None] + beta[None, :, None, None]
        x = F.avg_pool2d(torch.relu(x), 2)
    w, b = params[-2:]
    return x.flatten(1) @ w.T + b


@pytest.mark.parametrize("c,h,w", INPUTS)
def test_convnet_is_the_field_architecture(c, h, w):
    torch.manual_seed(1)
    net = ConvNet(c, 10, width=6, im_size=(h, w)).double()
    for p in net.parameters():  # the affine parameters start at 1 and 0: move them so that they count
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    params = [p for p in net.parameters()]
    assert len(params) == 3 * 4 + 2  # conv weight, bias, norm weight, bias per block; the head
    torch.testing.assert_close(net(x), field_convnet(x, params), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c,h,w", INPUTS)
def test_mlp_and_resnet_shapes(c, h, w):
    torch.manual_seed(0)
    x = torch.randn(2, c, h, w)
    mlp = MLP(c, 7, (h, w), width=32, depth=3)
    assert mlp(x).shape == (2, 7) and mlp.embed(x).shape == (2, 32)
    for make in (resnet10, resnet18):
        net = make(c, 7, im_size=(h, w), width=8, norm="groupnorm")
        assert net(x).shape == (2, 7) and net.embed(x).shape == (2, 64)


def test_convnet3_parameter_count_by_hand():
    net = ConvNet(3, 10, width=128, depth=3, im_size=(32, 32))
    conv1 = 3 * 128 * 3 * 3 + 128
    conv23 = 2 * (128 * 128 * 3 * 3 + 128)
    norms = 3 * (128 + 128)  # GroupNorm(128, 128) affine: weight + bias
    head = (128 * 4 * 4) * 10 + 10  # 32 -> 16 -> 8 -> 4
    assert n_params(net) == conv1 + conv23 + norms + head


def test_mlp_parameter_count_by_hand():
    net = MLP(1, 10, (8, 8), width=16, depth=3)
    assert n_params(net) == (64 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10)
    assert len([m for m in net.modules() if isinstance(m, nn.Linear)]) == 3


def test_instancenorm_is_groupnorm_per_channel_and_per_sample():
    torch.manual_seed(0)
    net = ConvNet(3, 10, width=16, im_size=(32, 32))
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 16 and m.affine for m in norms)
    pools = [m for m in net.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 3
    x = torch.randn(4, 3, 32, 32)
    # no batch coupling: a sample's output does not depend on the rest of the batch
    assert torch.allclose(net(x)[2:3], net(x[2:3]), atol=1e-5)


@pytest.mark.parametrize("norm,cls", [("batchnorm", nn.BatchNorm2d), ("layernorm", nn.LayerNorm),
                                      ("groupnorm", nn.GroupNorm), ("none", nn.Identity)])
def test_convnet_norm_variants(norm, cls):
    net = ConvNet(1, 10, width=8, norm=norm, im_size=(28, 28))
    assert sum(isinstance(m, cls) for m in net.features) == 3
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    if norm == "groupnorm":
        assert net.features[1].num_groups == 4


@pytest.mark.parametrize("pooling,side", [("maxpool", 4), ("none", 32)])
def test_convnet_pooling(pooling, side):
    net = ConvNet(3, 10, width=4, pooling=pooling, im_size=32)
    assert net.embed(torch.randn(1, 3, 32, 32)).shape == (1, 4 * side * side)
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules()) == (pooling == "maxpool")


def test_resnet_structure():
    r10 = resnet10(3, 10, width=8)
    r18 = resnet18(3, 10, width=8, norm="batchnorm")
    assert sum(isinstance(m, BasicBlock) for m in r10.modules()) == 4
    assert sum(isinstance(m, BasicBlock) for m in r18.modules()) == 8
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    stem = r18.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert any(isinstance(m, nn.BatchNorm2d) for m in r18.modules())
    assert all(m.num_groups == m.num_channels for m in r10.modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(ValueError, match="norm"):
        ResNet([1, 1, 1, 1], 3, 10, norm="layernorm")


def test_resnet18_default_width_on_cifar():
    torch.manual_seed(0)
    net = build_network("resnet18", 3, 10, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert net.embed(x).shape == (2, 512) and net(x).shape == (2, 10)
    assert net.classifier.in_features == 512


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_build_network_all_names_and_gradients(name):
    torch.manual_seed(0)
    width = 8 if name.startswith("resnet") else 16
    net = build_network(name, 1, 10, (8, 8), width=width)
    x = torch.randn(4, 1, 8, 8)
    loss = nn.functional.cross_entropy(net(x), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    if name == "convnet_bn":
        assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    if name == "convnet":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_deterministic_init():
    torch.manual_seed(123)
    a = build_network("convnet", 3, 10, (32, 32), width=16)
    torch.manual_seed(123)
    b = build_network("convnet", 3, 10, (32, 32), width=16)
    torch.manual_seed(124)
    c = build_network("convnet", 3, 10, (32, 32), width=16)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["features.0.weight"], sc["features.0.weight"])


def test_errors():
    with pytest.raises(ValueError, match="valid names: convnet, convnet_bn, mlp, resnet10, resnet18"):
        build_network("vgg11", 3, 10, (32, 32))
    with pytest.raises(ValueError, match="convnet_bn"):
        build_network("convnet_bn", 3, 10, (32, 32), norm="groupnorm")
    with pytest.raises(ValueError, match="norm"):
        build_network("mlp", 3, 10, (32, 32), norm="batchnorm")
    with pytest.raises(ValueError, match="norm"):
        ConvNet(3, 10, norm="weirdnorm")
    with pytest.raises(ValueError, match="activation"):
        ConvNet(3, 10, act="swishy")
    with pytest.raises(ValueError, match="pooling"):
        ConvNet(3, 10, pooling="median")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(1, 10, depth=4, im_size=(8, 8))
    with pytest.raises(ValueError, match="expects input"):
        ConvNet(1, 10, width=4, im_size=(8, 8))(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="layernorm"):
        make_norm("layernorm", 8)
