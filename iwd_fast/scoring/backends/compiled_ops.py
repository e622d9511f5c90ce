"""Python face of the compiled ops ``torch.ops.iwd_fast.*``: fake kernels and wrappers.

The wrappers take the signatures of the layer ops in ``iwd_fast.scoring.eager_ops`` (the specification) and
call the compiled kernels of ``iwd_fast._C`` (CPU: float32/float64; CUDA: float32/float16/bfloat16,
results in float32 for the half types). Importing this module never fails; calling a wrapper when
the extension is not built raises RuntimeError with the reason from ``compiled_ext.status()``.

The fake kernels (``torch.library.register_fake``) give torch.compile / FakeTensor the output shape
and dtype of each op, so the wrappers compile with ``fullgraph=True``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import compiled_ext as _ext
from ..eager_ops import choose_norm_method, conv_hyperparameters

__all__ = ["available", "conv_dot", "linear_dot", "affine_dot", "linear_grad_norm_sq"]

_HALF = (torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether the compiled ops are registered (``iwd_fast._C`` loaded)."""
    return _ext.load() is not None


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _require(name: str) -> None:
    if not available():
        raise RuntimeError(f"iwd_fast.scoring.backends.compiled_ops.{name}: the compiled ops are unavailable: {_ext.status()['cpu'][1]}")


if available():

    @torch.library.register_fake("iwd_fast::conv_dot")
    def _conv_dot_fake(x, v, delta, stride, padding, dilation, groups):
        torch._check(x.dim() == 4 and v.dim() == 5 and delta.dim() == 4,
                     lambda: "iwd_fast::conv_dot: x, v, delta must be 4-d, 5-d, 4-d")
        torch._check(x.dtype == v.dtype == delta.dtype, lambda: "iwd_fast::conv_dot: dtype mismatch")
        return x.new_empty((x.shape[0], v.shape[0]), dtype=_result_dtype(x.dtype))

    @torch.library.register_fake("iwd_fast::linear_dot")
    def _linear_dot_fake(a, v, delta):
        torch._check(a.dim() == 3 and v.dim() == 3 and delta.dim() == 3,
                     lambda: "iwd_fast::linear_dot: a, v, delta must be 3-d")
        torch._check(a.dtype == v.dtype == delta.dtype, lambda: "iwd_fast::linear_dot: dtype mismatch")
        return a.new_empty((a.shape[0], v.shape[0]), dtype=_result_dtype(a.dtype))

    @torch.library.register_fake("iwd_fast::affine_dot")
    def _affine_dot_fake(delta, v_bias, xhat, v_weight):
        torch._check(delta.dim() == 3, lambda: "iwd_fast::affine_dot: delta must be [B, C, P]")
        torch._check(v_bias is not None or v_weight is not None,
                     lambda: "iwd_fast::affine_dot: give v_bias or v_weight")
        k = v_bias.shape[0] if v_bias is not None else v_weight.shape[0]
        return delta.new_empty((delta.shape[0], k), dtype=_result_dtype(delta.dtype))

    @torch.library.register_fake("iwd_fast::linear_grad_norm_sq")
    def _linear_grad_norm_sq_fake(a, delta, method):
        torch._check(a.dim() == 3 and delta.dim() == 3, lambda: "iwd_fast::linear_grad_norm_sq: a, delta must be 3-d")
        return a.new_empty((a.shape[0],), dtype=_result_dtype(a.dtype))


def conv_dot(x: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, stride: Union[int, Sequence[int]],
             padding: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]], groups: int = 1) -> torch.Tensor:
    """Per-sample <dL_i/dW, V_k> of a 1d or 2d convolution (see ``reference.conv_dot``).

    Args:
        x: layer input [B, Cin, *spatial] (1 or 2 spatial dims).
        v: weight directions [K, Cout, Cin / groups, *kernel].
        delta: gradient at the layer output [B, Cout, *out_spatial].
        stride, padding, dilation: ints or one int per spatial dim.
        groups: the layer's groups.
    Returns:
        [B, K]; float32 for float16/bfloat16 inputs, else the input dtype.
    """
    _require("conv_dot")
    nd = x.dim() - 2
    if nd not in (1, 2):
        raise ValueError(f"conv_dot: the compiled op supports 1d and 2d convolutions, got input of shape "
                         f"{tuple(x.shape)} ({nd} spatial dims); use iwd_fast.scoring.eager_ops.conv_dot")
    stride, padding, dilation = conv_hyperparameters(stride, padding, dilation, nd)
    if nd == 1:  # a conv1d is a conv2d of height 1
        x, v, delta = x.unsqueeze(2), v.unsqueeze(3), delta.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    return torch.ops.iwd_fast.conv_dot(x, v, delta, list(stride), list(padding), list(dilation), groups)


def linear_dot(a: torch.Tensor, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample <dL_i/dW, V_k> of a Linear layer: a [B, T, d], v [K, p, d], delta [B, T, p] -> [B, K]."""
    _require("linear_dot")
    return torch.ops.iwd_fast.linear_dot(a, v, delta)


def affine_dot(delta: torch.Tensor, v_bias: Optional[torch.Tensor], xhat: Optional[torch.Tensor] = None,
               v_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample dot for per-channel affine parameters: delta/xhat [B, C, P], v_* [K, C] -> [B, K]."""
    _require("affine_dot")
    return torch.ops.iwd_fast.affine_dot(delta, v_bias, xhat, v_weight)


def linear_grad_norm_sq(a: torch.Tensor, delta: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample ||delta_i^T a_i||_F^2: a [B, T, d], delta [B, T, p] -> [B].

    ``method``: "ghost", "materialize" or "auto" (``reference.choose_norm_method``).
    """
    _require("linear_grad_norm_sq")
    if method == "auto":
        method = choose_norm_method(a.shape[1], a.shape[2], delta.shape[2])
    if method not in ("ghost", "materialize"):
        raise ValueError(f"linear_grad_norm_sq: unknown method {method!r} (ghost, materialize, auto)")
    return torch.ops.iwd_fast.linear_grad_norm_sq(a, delta, method)
