"""The Triton backend as torch ops: ``torch.ops.iwd_fast_triton.*``.

Each launcher of ``iwd_fast.kernels`` is registered with ``torch.library.triton_op`` (torch >= 2.6),
so torch.compile and torch.export see the kernel launches (the launchers call ``wrap_triton``);
on older torch the launchers are called directly. Triton is imported lazily: importing this module
never imports triton; the first call of an op (or ``ops()``) does.

``available()`` says whether the backend can run here and, if not, why.
"""
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..eager_ops import conv_hyperparameters

__all__ = ["available", "ops", "conv_dot", "linear_dot", "affine_dot", "linear_grad_norm_sq"]

NAMESPACE = "iwd_fast_triton"
_OPS: Optional[Dict[str, Callable]] = None


def available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(usable, reason): triton imports, and tensors will be on CUDA or TRITON_INTERPRET=1.

    Args:
        device: where the tensors will live, if known (a CPU device needs the interpreter).
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # broken install, missing driver libraries, ...
        return False, f"triton failed to import: {type(exc).__name__}: {exc}"
    dev = None if device is None else torch.device(device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from ... import kernels
        except Exception as exc:
            return False, f"iwd_fast.kernels failed to import: {type(exc).__name__}: {exc}"
        if not kernels.interpreted():
            return False, ("TRITON_INTERPRET=1 was set after iwd_fast.kernels was imported; "
                           "set it before importing triton")
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if dev is not None and dev.type != "cuda":
        return False, f"tensors on {dev.type} need CUDA or TRITON_INTERPRET=1 (set before triton is imported)"
    if not torch.cuda.is_available():
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    return True, "triton on CUDA"


def _register() -> Dict[str, Callable]:
    from ... import kernels as k

    if not hasattr(torch.library, "triton_op"):  # torch < 2.6: plain launchers
        return {"conv_dot": k.conv_dot, "linear_dot": k.linear_dot, "affine_dot": k.affine_dot,
                "linear_grad_norm_sq": k.linear_grad_norm_sq}

    triton_op = torch.library.triton_op

    @triton_op(f"{NAMESPACE}::conv_dot", mutates_args=())
    def conv_dot_op(x: Tensor, v: Tensor, delta: Tensor, stride: List[int], padding: List[int],
                      dilation: List[int], groups: int) -> Tensor:
        return k.conv_dot(x, v, delta, stride, padding, dilation, groups)

    @triton_op(f"{NAMESPACE}::linear_dot", mutates_args=())
    def linear_dot_op(a: Tensor, v: Tensor, delta: Tensor) -> Tensor:
        return k.linear_dot(a, v, delta)

    @triton_op(f"{NAMESPACE}::affine_dot", mutates_args=())
    def affine_dot_op(delta: Tensor, v_bias: Optional[Tensor], xhat: Optional[Tensor] = None,
                      v_weight: Optional[Tensor] = None) -> Tensor:
        return k.affine_dot(delta, v_bias, xhat, v_weight)

    @triton_op(f"{NAMESPACE}::linear_grad_norm_sq", mutates_args=())
    def linear_grad_norm_sq_op(a: Tensor, delta: Tensor, method: str = "auto") -> Tensor:
        return k.linear_grad_norm_sq(a, delta, method)

    return {"conv_dot": conv_dot_op, "linear_dot": linear_dot_op, "affine_dot": affine_dot_op,
            "linear_grad_norm_sq": linear_grad_norm_sq_op}


def ops() -> Dict[str, Callable]:
    """Name -> callable (the registered torch op, or the launcher on torch < 2.6); registers once."""
    global _OPS
    if _OPS is None:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"iwd_fast triton backend unavailable: {why}")
        _OPS = _register()
    return _OPS


def conv_dot(x: Tensor, v: Tensor, delta: Tensor, stride, padding, dilation, groups: int = 1) -> Tensor:
    """Triton ``reference.conv_dot`` for conv1d/conv2d: [B, K]. See ``iwd_fast.kernels.conv_dot``."""
    stride, padding, dilation = conv_hyperparameters(stride, padding, dilation, x.dim() - 2)
    return ops()["conv_dot"](x, v, delta, list(stride), list(padding), list(dilation), int(groups))


def linear_dot(a: Tensor, v: Tensor, delta: Tensor) -> Tensor:
    """Triton ``reference.linear_dot``: [B, K]."""
    return ops()["linear_dot"](a, v, delta)


def affine_dot(delta: Tensor, v_bias: Optional[Tensor], xhat: Optional[Tensor] = None,
               v_weight: Optional[Tensor] = None) -> Tensor:
    """Triton ``reference.affine_dot``: [B, K]."""
    return ops()["affine_dot"](delta, v_bias, xhat, v_weight)


def linear_grad_norm_sq(a: Tensor, delta: Tensor, method: str = "auto") -> Tensor:
    """Triton ``reference.linear_grad_norm_sq``: [B]; method "ghost" | "materialize" | "auto"."""
    return ops()["linear_grad_norm_sq"](a, delta, method)
