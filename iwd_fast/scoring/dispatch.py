"""Implementation selection: which backend computes the layer products, and why others cannot.

impl values:
  "reference"  torch.func vmap(grad): materialises per-sample gradients (the oracle; model level)
  "jvp"        torch.func.jvp forward mode (model level; any layer, train-mode BatchNorm included)
  "torch"      hooks + eager per-layer formulas (eager_ops.py)
  "cpu"        hooks + compiled C++ ops (iwd_fast._C, CPU tensors)
  "cuda"       hooks + compiled CUDA ops (iwd_fast._C built with CUDA, CUDA tensors)
  "triton"     hooks + Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "auto"       CPU tensors: cpu, then torch. CUDA tensors: triton, then cuda, then torch.
               (functional grad_dot: jvp when a layer is outside the hook path, with a warning)

An explicitly requested impl never falls back: if it cannot run, ImplUnavailableError lists why.
This module is the one place an impl is resolved: ``resolve_model_impl`` for the functional
``grad_dot`` / ``grad_norm_sq`` (which may fall back to a model-level impl under "auto"), and
``layer_ops`` for a capture (hook impls only).
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from . import eager_ops
from .params import group_by_module, param_owners
from .rules import UnsupportedLayerError, rule_for

__all__ = ["IMPLS", "HOOK_IMPLS", "ImplUnavailableError", "why_not", "layer_ops", "auto_hook_impl", "availability",
           "require", "resolve_model_impl", "hook_path_problem"]

IMPLS = ("auto", "reference", "jvp", "torch", "cpu", "cuda", "triton")
HOOK_IMPLS = ("torch", "cpu", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


class ImplUnavailableError(RuntimeError):
    """The requested implementation cannot run here; the message says why."""


def _torch_ops():
    return SimpleNamespace(
        conv_dot=eager_ops.conv_dot,
        linear_dot=eager_ops.linear_dot,
        affine_dot=eager_ops.affine_dot,
        linear_grad_norm_sq=eager_ops.linear_grad_norm_sq,
    )


def why_not(impl: str, device: torch.device) -> Optional[str]:
    """None if ``impl`` can run on tensors of ``device``, else a one-line reason."""
    if impl not in IMPLS:
        return f"unknown impl {impl!r}; choose from {IMPLS}"
    if impl in ("auto", "reference", "jvp", "torch"):
        return None
    if impl in ("cpu", "cuda"):
        from .backends import compiled_ext as _ext

        ok, reason = _ext.status()[impl]
        if not ok:
            return reason
        if device.type != impl:
            return f"impl={impl!r} runs on {impl} tensors, got tensors on {device.type}"
        return None
    from .backends import triton_ops as _triton_ops

    ok, reason = _triton_ops.available(device)
    return None if ok else reason


def availability(device: torch.device) -> Dict[str, Optional[str]]:
    """{impl: None if usable else the reason} for every concrete impl."""
    return {impl: why_not(impl, device) for impl in IMPLS if impl != "auto"}


def auto_hook_impl(device: torch.device) -> str:
    """The first usable hook impl for ``device`` in AUTO_ORDER."""
    for impl in AUTO_ORDER.get(device.type, ("torch",)):
        if why_not(impl, device) is None:
            return impl
    return "torch"


def require(impl: str, device: torch.device) -> None:
    reason = why_not(impl, device)
    if reason is not None:
        table = "; ".join(f"{k}: {'ok' if v is None else v}" for k, v in availability(device).items())
        raise ImplUnavailableError(f"impl={impl!r} cannot run: {reason}. Backends here: {table}")


def layer_ops(impl: str, device: torch.device) -> SimpleNamespace:
    """Backend namespace (conv_dot, linear_dot, affine_dot, linear_grad_norm_sq) for a hook impl or "auto"."""
    if impl in ("reference", "jvp"):
        raise ImplUnavailableError(
            f"impl={impl!r} recomputes the model and cannot work from captured tensors; use "
            "iwd_fast.grad_dot(model, inputs, labels, ..., impl=...) instead")
    if impl == "auto":
        impl = auto_hook_impl(device)
    if impl not in HOOK_IMPLS:
        raise ImplUnavailableError(f"impl={impl!r} is not a per-layer backend; choose from {HOOK_IMPLS}")
    require(impl, device)
    if impl == "torch":
        return _torch_ops()
    if impl in ("cpu", "cuda"):
        from .backends import compiled_ops as _ops

        return SimpleNamespace(conv_dot=_ops.conv_dot, linear_dot=_ops.linear_dot,
                               affine_dot=_ops.affine_dot, linear_grad_norm_sq=_ops.linear_grad_norm_sq)
    from .backends import triton_ops as t

    return SimpleNamespace(conv_dot=t.conv_dot, linear_dot=t.linear_dot, affine_dot=t.affine_dot,
                           linear_grad_norm_sq=t.linear_grad_norm_sq)


def hook_path_problem(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    """Why the hook path cannot score these parameters of this model, or None."""
    for owner, pairs in group_by_module(names, param_owners(model)).values():
        label = owner.module_name or "<root>"
        rule = rule_for(owner.module)
        if rule is None:
            return f"module {label!r} ({type(owner.module).__name__}) has no per-layer rule"
        try:
            rule.check(label, owner.module)
        except UnsupportedLayerError as err:
            return str(err)
    return None


_warned: set = set()


def resolve_model_impl(impl: str, model: nn.Module, names: Sequence[str], device: torch.device,
                       allow_jvp: bool) -> str:
    """The concrete impl for a functional call on ``model``'s parameters ``names``.

    "auto" takes the first usable hook impl of AUTO_ORDER, or, when a layer is outside the hook path,
    "jvp" (``allow_jvp``) or "reference", warning once per problem. An explicit impl is checked and
    returned, or refused with the reason.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    if impl in ("reference", "jvp"):
        return impl
    problem = hook_path_problem(model, names)
    if impl != "auto":
        if problem is not None:
            raise UnsupportedLayerError(f"impl={impl!r}: {problem}")
        require(impl, device)
        return impl
    if problem is None:
        return auto_hook_impl(device)
    fallback = "jvp" if allow_jvp else "reference"
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"iwd_fast: {problem}; impl='auto' uses impl={fallback!r} for the whole model", stacklevel=4)
    return fallback
