"""What a run checks on its pool and networks before any long work, each refusal one line naming the culprit:
enough real images in every class for the initial synthetic set, and networks the method can use (logits
of the right shape; DM's ``embed``; a student trajectory matching can run functionally; hookable layers
for in-loop scoring). Built-in networks pass; the checks matter for ``package.module:factory`` networks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.user_data import check_class_sizes
from ..evaluate import build_eval_network
from ..networks import NetSpec
from ..scoring.dispatch import hook_path_problem
from ..scoring.rules import SUPPORTED_TYPES
from .base import RealPool
from .trajectory.student import FlatNet

__all__ = ["images_needed", "check_pool", "check_networks"]

TRAJECTORY_METHODS = ("mtt", "datm")
_HOOK_SCORED_METHODS = ("dc", "dsa", "idc")  # in-loop scores from a captured backward (DM: validation, self only)


def images_needed(cfg) -> int:
    """Real images per class the initial synthetic set draws: ipc, or ipc x factor**2 for IDC's mix start."""
    if cfg.method == "idc" and cfg.idc.init == "mix" and cfg.idc.factor > 1:
        return cfg.ipc * cfg.idc.factor ** 2
    return cfg.ipc


def check_pool(cfg, pool: RealPool, class_names: Optional[Sequence[str]] = None) -> None:
    """Refuse a pool with a class holding fewer real images than the initial synthetic set draws from it."""
    need = images_needed(cfg)
    why = f" (ipc={cfg.ipc})" if need == cfg.ipc else f" (ipc={cfg.ipc} x {need // cfg.ipc} tiles of IDC's mix start)"
    check_class_sizes(pool.labels.cpu(), pool.num_classes, need,
                      "the training pool (training set less its held-out split)", class_names, why)


def check_networks(cfg, channels: int, num_classes: int, im_size) -> None:
    """Build the distillation network (and a separate evaluation network) on the CPU and try what the run
    will ask of them on a batch of two images; refuse in one line saying what is missing."""
    with torch.random.fork_rng(devices=[]):
        _check_one(cfg, cfg.net, "distillation", channels, num_classes, im_size)
        if cfg.eval.net is not None:
            _check_one(cfg, cfg.eval.net, "evaluation", channels, num_classes, im_size)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _check_one(cfg, spec: NetSpec, role: str, channels: int, num_classes: int, im_size) -> None:
    who = f"{role} network {spec.name!r}"
    try:
        net = build_eval_network(spec, channels, num_classes, tuple(im_size), seed=0)
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    shape = (2, channels, *im_size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    net.train()
    try:
        out = net(x)
    except Exception as err:  # noqa: BLE001 - the user's forward failed on the data's shape
        raise ValueError(f"{who} fails on a batch of shape {list(shape)} ({_first_line(err)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{who} must map [B, {channels}, {im_size[0]}, {im_size[1]}] to logits [B, {num_classes}]; "
                         f"it returned {got} for B=2")
    params = [n for n, p in net.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{who} has no trainable parameters")
    if role != "distillation":
        return
    if cfg.method == "dm":
        _check_embed(net, x, who)
    if cfg.method in TRAJECTORY_METHODS:
        _check_functional(net, x, num_classes, who, cfg.method)
    in_loop = cfg.weighting == "iwd" or (cfg.weighting == "auto" and cfg.iwd.auto_refresh)
    hooked = cfg.method in _HOOK_SCORED_METHODS or (cfg.method == "dm" and cfg.iwd.influence in ("validation", "self"))
    if in_loop and hooked:
        problem = hook_path_problem(net, params)
        if problem is not None:
            kinds = ", ".join(sorted({t.__name__ for t in SUPPORTED_TYPES}))
            raise ValueError(f"{who}: weighting {cfg.weighting!r} scores real batches inside the loop with per-layer "
                             f"hooks, and {problem} (layers with rules: {kinds}); use weighting 'auto', 'static' or "
                             f"'none', or such layers")


def _check_embed(net: nn.Module, x: torch.Tensor, who: str) -> None:
    if not callable(getattr(net, "embed", None)):
        raise ValueError(f"{who}: DM matches feature means and needs an embed(x) method returning features [B, F]; "
                         f"{type(net).__name__} has none")
    try:
        feats = net.embed(x)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{who}: its embed(x) fails on a batch of shape {list(x.shape)} ({_first_line(err)})") from None
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != x.shape[0]:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{who}: DM needs embed(x) to return features [B, F]; it returned {got} for B={x.shape[0]}")


def _check_functional(net: nn.Module, x: torch.Tensor, num_classes: int, who: str, method: str) -> None:
    """Trajectory matching runs the network at a flat parameter vector (torch.func.functional_call) and
    differentiates through the student's SGD steps: the forward must use the parameters passed to it and
    be twice differentiable."""
    head = (f"{who}: {method.upper()} runs its student at a flat parameter vector (torch.func.functional_call) and "
            f"differentiates through its SGD steps, but")
    student = FlatNet(net)
    theta = student.flatten().requires_grad_(True)
    y = torch.arange(x.shape[0]) % num_classes
    images = x.clone().requires_grad_(True)
    try:
        out = student(images, theta)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (reach,) = torch.autograd.grad((out * probe).sum(), theta, retain_graph=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{head} the functional call fails ({_first_line(err)})") from None
    unused = [name for (name, _), chunk in zip(student.layout, reach.split(student.sizes)) if not bool(chunk.any())]
    if unused:
        raise ValueError(f"{head} its forward ignores the parameters {unused[:4]} passed to it (does it read .data or "
                         f"its own copies of the weights?)")
    try:
        grad = torch.autograd.grad(F.cross_entropy(out, y), theta, create_graph=True)[0]
        (second,) = torch.autograd.grad(grad.pow(2).sum(), images)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{head} differentiating its parameter gradient again fails ({_first_line(err)})") from None
    if not bool(torch.isfinite(second).all()):
        raise ValueError(f"{head} the second derivative through it is not finite")
