"""Triton kernels of iwd_fast, shipped as the subpackage ``iwd_fast.kernels``.

Importing this package imports triton. Each module holds one op: the ``@triton.jit`` kernel
(``_<name>_kernel``) and its launcher, which validates shapes, picks block sizes, launches, and
finishes the per-tile partial sums in a fixed order. Launchers share the signatures of the eager
specifications in ``iwd_fast.scoring.eager_ops`` and run on CUDA tensors, or on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1 set before triton is imported).

Launchers:
    conv_dot(x, v, delta, stride, padding, dilation, groups) -> [B, K]   (conv1d and conv2d)
    linear_dot(a, v, delta) -> [B, K]
    affine_dot(delta, v_bias, xhat=None, v_weight=None) -> [B, K]
    linear_grad_norm_sq(a, delta, method) -> [B]   (method: "ghost" | "materialize" | "auto")
"""
from .affine_dot import affine_dot
from .conv_dot import conv_dot
from .linear_grad_norm_sq import linear_grad_norm_sq
from .linear_dot import linear_dot
from ._common import is_interpreted

__all__ = ["conv_dot", "linear_dot", "affine_dot", "linear_grad_norm_sq", "interpreted"]


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (they then take CPU tensors)."""
    from .conv_dot import _conv_dot_kernel

    return is_interpreted(_conv_dot_kernel)
