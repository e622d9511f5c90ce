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
    "choose_conv_route",
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
    route: str = "auto",
) -> torch.Tensor:
    """Per-sample <dL_i/dW, V_k> of a convolution.

    Two exact routes (``choose_conv_route``):

    - "forward": s[i, k] = sum_{c, pos} conv(x_i; V_k)[c, pos] * delta_i[c, pos], one forward-sized
      convolution per direction (K of them stacked along the output channels); no per-sample gradient.
    - "gradient": the layer's per-sample weight gradient G_i = delta_i cols(x_i)^T (one batched GEMM over
      chunks of samples, cols = im2col), then s[i, k] = <G_i, V_k>: the K directions cost one small GEMM
      instead of K convolutions. 1d and 2d convolutions only.

    Args:
        x: layer input [B, Cin, *spatial] (1, 2 or 3 spatial dims).
        v: directions for the weight [K, Cout, Cin / groups, *kernel].
        delta: gradient at the layer output [B, Cout, *out_spatial].
        stride, padding, dilation: per spatial dim, as the layer used them (ints, not strings).
        groups: the layer's groups.
        route: "forward", "gradient" or "auto".
    Returns:
        [B, K] in the dtype of ``x``.
    """
    nd = x.dim() - 2
    positions = math.prod(delta.shape[2:])
    if route == "auto":
        route = choose_conv_route(v.shape[0], positions) if nd <= 2 else "forward"
    if route == "gradient":
        return _conv_dot_by_gradient(x, v, delta, stride, padding, dilation, groups)
    if route != "forward":
        raise ValueError(f"conv_dot: unknown route {route!r} (forward, gradient, auto)")
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


def choose_conv_route(k: int, positions: int) -> str:
    """"gradient" iff its work per weight entry and sample, P (the GEMM) + K (the dots) + 16 (writing and
    reading the per-sample gradient once), is below the forward route's K * P (K convolutions). K = 1
    always takes "forward"."""
    return "gradient" if k * positions > positions + k + 16 else "forward"


# Samples per chunk of the gradient route: its per-sample gradients and im2col buffer stay near this size.
_GRADIENT_ROUTE_BYTES = 32 * 2 ** 20


def _conv_dot_by_gradient(x, v, delta, stride, padding, dilation, groups: int) -> torch.Tensor:
    """conv_dot's "gradient" route (1d/2d): chunked per-sample weight gradients contracted with V."""
    k, cout = v.shape[0], v.shape[1]
    b = x.shape[0]
    cpg = cout // groups
    width = v[0, 0].numel()  # Cin/groups * prod(kernel)
    vk = v.reshape(k, groups * cpg * width).transpose(0, 1)  # [Cout * width, K]
    out = x.new_zeros(b, k)
    per_sample = (cout * width + x.shape[1] * math.prod(v.shape[3:]) * math.prod(delta.shape[2:])) * x.element_size()
    chunk = max(1, _GRADIENT_ROUTE_BYTES // max(per_sample, 1))
    for first in range(0, b, chunk):
        xs, ds = x[first:first + chunk], delta[first:first + chunk]
        n = xs.shape[0]
        cols = conv_unfold(xs, tuple(v.shape[3:]), stride, padding, dilation)  # [n, P, Cin * kernel]
        cols = cols.reshape(n, -1, groups, width).permute(0, 2, 3, 1).reshape(n * groups, width, -1)
        d = ds.reshape(n * groups, cpg, -1)  # [n * groups, cpg, P]
        grads = torch.bmm(d, cols.transpose(1, 2))  # [n * groups, cpg, width]
        out[first:first + n] = grads.reshape(n, -1) @ vk
    return out


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
