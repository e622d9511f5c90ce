"""Per-sample squared gradient norms of a Linear-shaped product G_b = delta_b^T a_b.

||G_b||_F^2   (spec: ``iwd_fast.scoring.eager_ops.linear_grad_norm_sq``), two kernels:

* ghost: ||G_b||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s). A program owns one [BLOCK_T, BLOCK_T]
  tile (ti, tj) of the T x T Gram matrices of one sample, builds both Gram tiles with ``tl.dot``
  (reducing over d and over p) and writes sum(Ga * Gd). Both Grams are symmetric, so only tiles with
  ti <= tj do work; off-diagonal tiles count twice. Cost O(T^2 (d + p)).
* materialize: a program owns a [BLOCK_P, BLOCK_D] tile of G_b, accumulates delta^T a over T in
  BLOCK_T chunks and writes the tile's sum of squares. Cost O(T p d), never stores G.

Partials [B, n_tiles] per method, then a fixed-order torch sum (deterministic, no atomics).
Conv layers reach this op through im2col (``eager_ops.conv_unfold``) in the caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scoring.eager_ops import choose_norm_method
from ._common import block, cdiv, is_interpreted, launch, launch_options, prepare


@triton.jit
def _ghost_norm_kernel(
    a_ptr, delta_ptr, part_ptr,
    T, D, P, N_T_TILES,
    stride_ab, stride_at, stride_ad,
    stride_db, stride_dt, stride_dp,
    stride_pb,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_pairs = N_T_TILES * N_T_TILES
    b = pid // n_pairs
    pair = pid % n_pairs
    ti = pair // N_T_TILES
    tj = pair % N_T_TILES
    offs_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    i_mask = offs_i < T
    j_mask = offs_j < T
    acc_ty = part_ptr.dtype.element_ty

    gram_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty)
    gram_d = tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty)
    if ti <= tj:
        a_i = a_ptr + b * stride_ab + offs_i * stride_at
        a_j = a_ptr + b * stride_ab + offs_j * stride_at
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            lhs = tl.load(a_i[:, None] + offs_k[None, :] * stride_ad,
                          mask=i_mask[:, None] & k_mask[None, :], other=0.0)
            rhs = tl.load(a_j[None, :] + offs_k[:, None] * stride_ad,
                          mask=k_mask[:, None] & j_mask[None, :], other=0.0)
            if DOT_FP32:
                lhs = lhs.to(tl.float32)
                rhs = rhs.to(tl.float32)
            gram_a = tl.dot(lhs, rhs, gram_a, input_precision="ieee")
        d_i = delta_ptr + b * stride_db + offs_i * stride_dt
        d_j = delta_ptr + b * stride_db + offs_j * stride_dt
        for k0 in range(0, P, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < P
            lhs = tl.load(d_i[:, None] + offs_k[None, :] * stride_dp,
                          mask=i_mask[:, None] & k_mask[None, :], other=0.0)
            rhs = tl.load(d_j[None, :] + offs_k[:, None] * stride_dp,
                          mask=k_mask[:, None] & j_mask[None, :], other=0.0)
            if DOT_FP32:
                lhs = lhs.to(tl.float32)
                rhs = rhs.to(tl.float32)
            gram_d = tl.dot(lhs, rhs, gram_d, input_precision="ieee")
    total = tl.sum(tl.sum(gram_a * gram_d, axis=1), axis=0)
    weight = tl.where(ti == tj, 1.0, tl.where(ti < tj, 2.0, 0.0)).to(acc_ty)
    tl.store(part_ptr + b * stride_pb + pair, total * weight)


@triton.jit
def _materialize_norm_kernel(
    a_ptr, delta_ptr, part_ptr,
    T, D, P, N_P_TILES, N_D_TILES,
    stride_ab, stride_at, stride_ad,
    stride_db, stride_dt, stride_dp,
    stride_pb,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = N_P_TILES * N_D_TILES
    b = pid // n_tiles
    tile = pid % n_tiles
    offs_p = (tile // N_D_TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = (tile % N_D_TILES) * BLOCK_D + tl.arange(0, BLOCK_D)
    p_mask = offs_p < P
    d_mask = offs_d < D
    d_cols = delta_ptr + b * stride_db + offs_p * stride_dp
    a_cols = a_ptr + b * stride_ab + offs_d * stride_ad

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=part_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        lhs = tl.load(d_cols[:, None] + offs_t[None, :] * stride_dt,  # delta^T tile [BLOCK_P, BLOCK_T]
                      mask=p_mask[:, None] & t_mask[None, :], other=0.0)
        rhs = tl.load(a_cols[None, :] + offs_t[:, None] * stride_at,  # a tile [BLOCK_T, BLOCK_D]
                      mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
    total = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(part_ptr + b * stride_pb + tile, total)


def linear_grad_norm_sq(a: torch.Tensor, delta: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample ||delta_b^T a_b||_F^2 (same contract as ``eager_ops.linear_grad_norm_sq``).

    Args:
        a: [B, T, d]; delta: [B, T, p]; any strides.
        method: "ghost", "materialize" or "auto" (the reference's cost rule).
    Returns:
        [B]: float32 for float16/bfloat16 inputs, else the input dtype.
    """
    name = "linear_grad_norm_sq"
    if a.dim() != 3 or delta.dim() != 3 or a.shape[:2] != delta.shape[:2]:
        raise ValueError(f"{name}: expected a [B, T, d] and delta [B, T, p]; got a {tuple(a.shape)}, "
                         f"delta {tuple(delta.shape)}")
    if method not in ("ghost", "materialize", "auto"):
        raise ValueError(f"{name}: unknown method {method!r} (ghost, materialize, auto)")
    bsz, t, d = a.shape
    p = delta.shape[2]
    if method == "auto":
        method = choose_norm_method(t, d, p)
    kernel = _ghost_norm_kernel if method == "ghost" else _materialize_norm_kernel
    (a, delta), acc_dtype, out_dtype, dot_fp32 = prepare(name, kernel, a, delta)
    interpreted = is_interpreted(kernel)
    half = a.dtype != torch.float32
    common = dict(
        a_ptr=a, delta_ptr=delta, T=t, D=d, P=p,
        stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2),
        stride_db=delta.stride(0), stride_dt=delta.stride(1), stride_dp=delta.stride(2),
        DOT_FP32=dot_fp32, **launch_options(kernel, 4),
    )
    if method == "ghost":
        bt = 16 if interpreted else block(t, 16, 64)
        bk = 16 if interpreted else block(max(d, p), 16, 64 if half else 32)
        n_t = cdiv(t, bt)
        n_tiles = n_t * n_t
        extra = dict(N_T_TILES=n_t, BLOCK_T=bt, BLOCK_K=bk)
    else:
        bp = 16 if interpreted else block(p, 16, 64)
        bd = 16 if interpreted else block(d, 16, 64)
        bt = 16 if interpreted else block(t, 16, 64 if half else 32)
        n_p, n_d = cdiv(p, bp), cdiv(d, bd)
        n_tiles = n_p * n_d
        extra = dict(N_P_TILES=n_p, N_D_TILES=n_d, BLOCK_P=bp, BLOCK_D=bd, BLOCK_T=bt)
    if bsz * n_tiles == 0:
        return torch.zeros(bsz, dtype=out_dtype, device=a.device)
    part = torch.empty(bsz, n_tiles, dtype=acc_dtype, device=a.device)
    launch(kernel, (bsz * n_tiles,), part_ptr=part, stride_pb=part.stride(0), **common, **extra)
    return part.sum(dim=-1).to(out_dtype)
