"""The layer ops in eager PyTorch: the specification of every kernel and the ``"torch"`` backend.

Given what one layer saw during a forward (its input, or its normalised input) and the gradient of a
sum of per-sample losses at its output, each op returns per-sample dot products of the layer's
per-sample parameter gradient with K directions, or per-sample squared gradient norms. The Triton,
C++ and CUDA kernels implement the same signatures and are tested against these functions in float64.
The model-level oracle (vmap(grad), materialising) is ``iwd_fast.scoring.oracle``.

Shapes: B samples, K directions, T positions (sequence or flattened spatial), d input features,
p output features, C channels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "conv_dot",
    "linear_dot",
    "affine_dot",
    "embedding_dot",
    "linear_grad_norm_sq",
    "conv_unfold",
    "choose_norm_method",
    "conv_hyperparameters",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_dot(
    x: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample <dL_i/dW, V_k> of a convolution, without materialising per-sample gradients.

    s[i, k] = sum_{c, pos} conv(x_i; V_k)[c, pos] * delta_i[c, pos]

    Args:
        x: layer input [B, Cin, *spatial] (1, 2 or 3 spatial dims).
        v: directions for the weight [K, Cout, Cin / groups, *kernel].
        delta: gradient at the layer output [B, Cout, *out_spatial].
        stride, padding, dilation: per spatial dim, as the layer used them (ints, not strings).
        groups: the layer's groups.
    Returns:
        [B, K] in the dtype of ``x``.
    """
    nd = x.dim() - 2
    k, cout = v.shape[0], v.shape[1]
    b = x.shape[0]
    # Stack the K directions along the output channels, keeping each group's channels together:
    # weight [groups, K, Cout/g, Cin/g, *kernel] -> [groups*K*Cout/g, Cin/g, *kernel].
    cpg = cout // groups
    w = v.reshape(k, groups, cpg, *v.shape[2:]).transpose(0, 1).reshape(groups * k * cpg, *v.shape[2:])
    y = _CONV[nd](x, w, None, stride, padding, dilation, groups)  # [B, g*K*cpg, *out]
    positions = math.prod(y.shape[2:])
    y = y.reshape(b, groups, k, cpg, positions)
    d = delta.reshape(b, groups, 1, cpg, positions)
    return (y * d).sum(dim=(1, 3, 4))


def conv_hyperparameters(stride, padding, dilation, nd: int, op: str = "conv_dot") -> tuple:
    """(stride, padding, dilation) of a convolution with ``nd`` spatial dims as tuples of ``nd`` ints.

    Each may be an int or a sequence of ints (one entry is broadcast); padding must be numeric (a layer's
    "same"/"valid" are resolved by the rule first). Shared by every backend's ``conv_dot``.
    """
    def per_dim(value, what: str) -> tuple:
        if isinstance(value, str):
            raise ValueError(f"{op}: {what} must be numeric, got {value!r} (resolve string padding first)")
        if isinstance(value, int):
            return (int(value),) * nd
        try:
            vals = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{op}: {what} must be an int or a sequence of ints, got {value!r}") from None
        if len(vals) == 1:
            vals = vals * nd
        if len(vals) != nd:
            raise ValueError(f"{op}: {what} needs {nd} values for a {nd}d convolution, got {value!r}")
        return vals

    stride, padding, dilation = per_dim(stride, "stride"), per_dim(padding, "padding"), per_dim(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    return stride, padding, dilation


def linear_dot(a: torch.Tensor, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample <dL_i/dW, V_k> of a Linear layer: s[i, k] = sum_t delta[i, t] . (V_k a[i, t]).

    Args:
        a: layer input [B, T, d].
        v: weight directions [K, p, d].
        delta: output gradient [B, T, p].
    Returns:
        [B, K].
    """
    b, t, _ = a.shape
    k, p, _ = v.shape
    y = torch.matmul(a, v.reshape(k * p, -1).transpose(0, 1))  # [B, T, K*p]
    return (y.reshape(b, t, k, p) * delta.unsqueeze(2)).sum(dim=(1, 3))


def affine_dot(
    delta: torch.Tensor,
    v_bias: torch.Tensor | None,
    xhat: torch.Tensor | None = None,
    v_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample dot for per-channel affine parameters (biases of Linear/Conv, norm-layer gamma/beta).

    For y = gamma * xhat + beta per channel: dL_i/dgamma_c = sum_pos xhat * delta, dL_i/dbeta_c = sum_pos delta.

    Args:
        delta: output gradient [B, C, P] (P positions; any strides).
        v_bias: directions for the bias/beta [K, C], or None.
        xhat: the normalised input [B, C, P] (needed only with ``v_weight``).
        v_weight: directions for gamma [K, C], or None.
    Returns:
        [B, K].
    """
    out = None
    if v_bias is not None:
        out = delta.sum(dim=2) @ v_bias.transpose(0, 1)
    if v_weight is not None:
        if xhat is None:
            raise ValueError("affine_dot: v_weight needs xhat")
        term = (xhat * delta).sum(dim=2) @ v_weight.transpose(0, 1)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("affine_dot: give v_bias or v_weight")
    return out


def embedding_dot(indices: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
                  padding_idx: int | None = None) -> torch.Tensor:
    """Per-sample dot for an Embedding table: s[i, k] = sum_t delta[i, t] . V_k[idx[i, t]].

    Args:
        indices: int64 [B, T].
        v: table directions [K, num_embeddings, dim].
        delta: output gradient [B, T, dim].
        padding_idx: rows that receive no gradient.
    Returns:
        [B, K].
    """
    rows = v[:, indices]  # [K, B, T, dim]
    prod = (rows * delta.unsqueeze(0)).sum(dim=-1)  # [K, B, T]
    if padding_idx is not None:
        prod = prod * (indices != padding_idx).to(prod.dtype)
    return prod.sum(dim=-1).transpose(0, 1)


def linear_grad_norm_sq(a: torch.Tensor, delta: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample ||dL_i/dW||_F^2 for a Linear-shaped product G_i = delta_i^T a_i.

    Args:
        a: [B, T, d]; delta: [B, T, p].
        method: "ghost" (sum of (A A^T) * (D D^T), O(T^2 (d + p))), "materialize" (O(T p d) per sample),
            or "auto" (ghost iff T^2 (d + p) < p d (T + 1), METHOD.md section 3).
    Returns:
        [B].
    """
    method = choose_norm_method(a.shape[1], a.shape[2], delta.shape[2]) if method == "auto" else method
    if method == "ghost":
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_d = torch.bmm(delta, delta.transpose(1, 2))
        return (gram_a * gram_d).sum(dim=(1, 2))
    if method == "materialize":
        g = torch.bmm(delta.transpose(1, 2), a)  # [B, p, d]
        return g.pow(2).sum(dim=(1, 2))
    raise ValueError(f"linear_grad_norm_sq: unknown method {method!r} (ghost, materialize, auto)")


def choose_norm_method(t: int, d: int, p: int) -> str:
    """Ghost norm iff it moves fewer numbers than materialising one per-sample gradient."""
    return "ghost" if t * t * (d + p) < p * d * (t + 1) else "materialize"


def conv_unfold(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """im2col of a 1d/2d conv input: [B, Cin, *S] -> [B, T, Cin * prod(kernel)] (T output positions)."""
    if x.dim() == 3:  # conv1d as a conv2d of height 1
        x = x.unsqueeze(2)
        kernel_size, stride, padding, dilation = ((1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation))
    if x.dim() != 4:
        raise ValueError(f"conv_unfold: only 1d and 2d convolutions, got input of shape {tuple(x.shape)}")
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)
