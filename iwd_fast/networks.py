"""Networks of the dataset-distillation literature: ConvNet, MLP and CIFAR-style ResNet-10/18.

All networks take images ``x`` [B, C, H, W] and return logits [B, num_classes]; ``embed(x)`` returns the
flattened features [B, F] that the linear head sees (distribution matching compares these).
Only standard modules (Conv2d, GroupNorm, LayerNorm, BatchNorm2d, Linear) hold parameters, with PyTorch's
default initialisation, so ``torch.manual_seed`` fixes the weights and per-sample-gradient rules apply.
"""
from __future__ import annotations

import importlib
import inspect
import math
import traceback
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["NetSpec", "ConvNet", "MLP", "BasicBlock", "ResNet", "resnet10", "resnet18", "build_network",
           "make_norm", "NETWORK_NAMES", "NORMS", "is_factory", "build_factory_network"]

NORMS = ("instancenorm", "batchnorm", "groupnorm", "layernorm", "none")
NETWORK_NAMES = ("convnet", "convnet_bn", "mlp", "resnet10", "resnet18")
_ACTS = {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
_POOLS = ("avgpool", "maxpool", "none")

Size = Union[int, Sequence[int]]


@dataclass
class NetSpec:
    """Network used for distillation and evaluation (see :func:`build_network`).

    ``name`` is a built-in name (:data:`NETWORK_NAMES`) or a user factory ``package.module:function``
    (see :func:`build_factory_network`; width, depth and norm are then the factory's business)."""

    name: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"


def _pair(im_size: Size) -> Tuple[int, int]:
    if isinstance(im_size, int):
        return im_size, im_size
    size = tuple(int(v) for v in im_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"im_size must be an int or (H, W) of positive ints, got {im_size!r}")
    return size


def make_norm(kind: str, channels: int, spatial: Optional[Tuple[int, int]] = None,
              groups: int = 4) -> nn.Module:
    """Normalisation layer for feature maps [B, channels, H, W].

    ``instancenorm`` is GroupNorm(channels, channels) (the field's convention, per-sample statistics);
    ``groupnorm`` uses gcd(channels, groups) groups; ``layernorm`` normalises over [channels, H, W]
    and needs ``spatial`` = (H, W); ``none`` is the identity.
    """
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(math.gcd(channels, groups), channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "layernorm":
        if spatial is None:
            raise ValueError("make_norm: layernorm needs the spatial size (H, W)")
        return nn.LayerNorm([channels, *spatial], elementwise_affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


def _make_act(act: str) -> nn.Module:
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}; valid: {', '.join(_ACTS)}")
    return _ACTS[act]()


def _check_input(x: torch.Tensor, channels: int, im_size: Tuple[int, int], who: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != im_size:
        raise ValueError(f"{who} expects input [B, {channels}, {im_size[0]}, {im_size[1]}], "
                         f"got {tuple(x.shape)}")


class ConvNet(nn.Module):
    """depth x [Conv2d 3x3 (padding 1) -> norm -> act -> 2x2 pool], flatten, Linear head.

    Spatial size after each pooled block is floor(H / 2): 32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 3,
    8 -> 4 -> 2 -> 1. Input [B, channels, H, W]; logits [B, num_classes]; features [B, width * h * w].
    """

    def __init__(self, channels: int, num_classes: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", act: str = "relu", pooling: str = "avgpool",
                 im_size: Size = (32, 32)):
        super().__init__()
        if channels < 1 or num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"ConvNet: channels, num_classes, width and depth must be >= 1, got "
                             f"{channels}, {num_classes}, {width}, {depth}")
        if pooling not in _POOLS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(_POOLS)}")
        self.channels, self.num_classes, self.im_size = channels, num_classes, _pair(im_size)
        h, w = self.im_size
        layers = []
        in_c = channels
        for d in range(depth):
            layers += [nn.Conv2d(in_c, width, kernel_size=3, padding=1), make_norm(norm, width, (h, w)),
                       _make_act(act)]
            if pooling != "none":
                if h < 2 or w < 2:
                    raise ValueError(f"ConvNet: image size {self.im_size} is too small for depth {depth} "
                                     f"with 2x2 pooling (feature map {h}x{w} at block {d + 1})")
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpool" else nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            in_c = width
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, h, w)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> flattened features [B, width * h * w]."""
        _check_input(x, self.channels, self.im_size, "ConvNet")
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """Flatten, (depth - 1) x [Linear(width) -> act], Linear head: ``depth`` Linear layers in all.

    Input [B, channels, H, W]; features [B, width] (the flattened input when depth == 1).
    """

    def __init__(self, channels: int, num_classes: int, im_size: Size, width: int = 128, depth: int = 3,
                 act: str = "relu"):
        super().__init__()
        if channels < 1 or num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP: channels, num_classes, width and depth must be >= 1, got "
                             f"{channels}, {num_classes}, {width}, {depth}")
        self.channels, self.num_classes, self.im_size = channels, num_classes, _pair(im_size)
        in_f = channels * self.im_size[0] * self.im_size[1]
        layers = []
        for _ in range(depth - 1):
            layers += [nn.Linear(in_f, width), _make_act(act)]
            in_f = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_f, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> features [B, width]."""
        _check_input(x, self.channels, self.im_size, "MLP")
        return self.features(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm, plus a (1x1 conv + norm) shortcut when the
    shape changes, then ReLU. [B, in_planes, H, W] -> [B, planes, H / stride, W / stride]."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "instancenorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes, groups=32)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes, groups=32)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          make_norm(norm, planes, groups=32))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem conv (no max-pool), four stages of BasicBlocks with widths
    (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pool, Linear head.

    Input [B, channels, H, W]; features [B, 8w]; logits [B, num_classes]. ``norm`` is one of
    instancenorm (GroupNorm(c, c), the field's default), groupnorm (gcd(c, 32) groups) or batchnorm.
    """

    def __init__(self, blocks: Sequence[int], channels: int, num_classes: int, im_size: Size = (32, 32),
                 width: int = 64, norm: str = "instancenorm"):
        super().__init__()
        if norm not in ("instancenorm", "groupnorm", "batchnorm"):
            raise ValueError(f"ResNet: unknown norm {norm!r}; valid: instancenorm, groupnorm, batchnorm")
        if len(blocks) != 4 or min(blocks) < 1 or channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(f"ResNet: need 4 stages of >= 1 blocks and positive sizes, got blocks={blocks}, "
                             f"channels={channels}, num_classes={num_classes}, width={width}")
        self.channels, self.num_classes, self.im_size = channels, num_classes, _pair(im_size)
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False),
                                  make_norm(norm, width, groups=32), nn.ReLU())
        stages, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stage = []
            for s in strides:
                stage.append(BasicBlock(in_planes, planes, s, norm))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> pooled features [B, 8 * width]."""
        _check_input(x, self.channels, self.im_size, "ResNet")
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.pool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.embed(x))


def resnet10(channels: int, num_classes: int, im_size: Size = (32, 32), width: int = 64,
             norm: str = "instancenorm") -> ResNet:
    """ResNet-10 (BasicBlocks [1, 1, 1, 1]), CIFAR variant."""
    return ResNet([1, 1, 1, 1], channels, num_classes, im_size, width, norm)


def resnet18(channels: int, num_classes: int, im_size: Size = (32, 32), width: int = 64,
             norm: str = "instancenorm") -> ResNet:
    """ResNet-18 (BasicBlocks [2, 2, 2, 2]), CIFAR variant."""
    return ResNet([2, 2, 2, 2], channels, num_classes, im_size, width, norm)


def build_network(name: str, channels: int, num_classes: int, im_size: Size, width: Optional[int] = None,
                  depth: int = 3, norm: Optional[str] = None, act: str = "relu",
                  pooling: str = "avgpool") -> nn.Module:
    """Build a network by name (one of :data:`NETWORK_NAMES`, or a factory ``package.module:function``).

    ``width=None`` is the architecture's default: 128 for convnet/mlp, 64 (first stage) for ResNets.
    ``norm=None`` is the name's default: instancenorm, batchnorm for convnet_bn; the MLP takes none.
    ``depth``, ``act`` and ``pooling`` apply to convnet / convnet_bn (depth and act also to mlp).
    """
    if is_factory(name):
        return build_factory_network(name, channels, num_classes, im_size)
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORK_NAMES)} or package.module:factory")
    if name == "convnet_bn":
        if norm not in (None, "batchnorm"):
            raise ValueError(f"convnet_bn is the batchnorm ConvNet; got norm={norm!r} (use 'convnet')")
        norm = "batchnorm"
    if name in ("convnet", "convnet_bn"):
        return ConvNet(channels, num_classes, width or 128, depth, norm or "instancenorm", act, pooling,
                       im_size)
    if name == "mlp":
        if norm not in (None, "none"):
            raise ValueError(f"mlp has no normalisation layers; got norm={norm!r}")
        return MLP(channels, num_classes, im_size, width or 128, depth, act)
    make = resnet10 if name == "resnet10" else resnet18
    return make(channels, num_classes, im_size, width or 64, norm or "instancenorm")


def is_factory(name: str) -> bool:
    """Whether a network name is a user factory ``package.module:function`` (not a built-in name)."""
    return isinstance(name, str) and ":" in name


def _where(err: BaseException) -> str:
    """" (raised at FILE:LINE)" for the innermost frame of ``err`` outside the import machinery, else ""."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" (at {err.filename}:{err.lineno})"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "importlib" not in f.filename]
    return f" (raised at {frames[-1].filename}:{frames[-1].lineno})" if frames and frames[-1].filename != __file__ else ""


def build_factory_network(spec: str, channels: int, num_classes: int, im_size: Size) -> nn.Module:
    """The network a user factory ``package.module:function`` returns.

    The function is called with whichever of ``channels``, ``num_classes`` and ``im_size`` ((H, W)) its
    signature names (all three, by keyword, when it takes ``**kwargs``); it must return an ``nn.Module``
    mapping [B, channels, H, W] to logits [B, num_classes]. Errors are one line naming ``spec``.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"network {spec!r}: give a built-in name ({', '.join(NETWORK_NAMES)}) or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module's
        raise ValueError(f"network {spec}: cannot import {module_name} ({type(err).__name__}: {err})"
                         f"{_where(err)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"network {spec}: {module_name} has no callable {attr!r}")
    offered = {"channels": int(channels), "num_classes": int(num_classes), "im_size": _pair(im_size)}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory failed: say which and why, on one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"network {spec}: the factory failed for channels={channels}, num_classes={num_classes}, "
                         f"im_size={_pair(im_size)} ({type(err).__name__}: {first})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"network {spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model
