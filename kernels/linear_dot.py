"""Per-sample Linear weight-gradient dots: a GEMM with a fused delta epilogue.

s[b, k] = sum_t delta[b, t] . (V_k a[b, t])   (spec: ``iwd_fast.scoring.eager_ops.linear_dot``)

The rows of the GEMM are the (sample, position) pairs of ``a`` [B, T, d]; the columns are the output
features of one direction V_k [p, d]. One program owns BLOCK_M rows, one direction k and BLOCK_N
output features; it accumulates a [BLOCK_M, BLOCK_N] tile of a @ V_k^T over d in BLOCK_K chunks
(``tl.dot``, fp32 accumulation), multiplies it by the matching delta tile and reduces it. All K
directions run in one launch.

Two row layouts, chosen by the launcher:

* per-sample tiles (T >= BLOCK_M): a tile's rows all belong to one sample, so the program reduces its
  tile to one number: partials [B * n_t_tiles, K * n_n_tiles].
* flat rows (T < BLOCK_M, e.g. an MLP with T = 1): rows of several samples share a tile, so the
  program reduces over features only and writes one number per row: partials [B * T, K * n_n_tiles].

Either way a fixed-order torch sum finishes the reduction (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, cdiv, is_interpreted, launch, launch_options, prepare


@triton.jit
def _linear_dot_kernel(
    a_ptr, v_ptr, delta_ptr, part_ptr,
    T, D, P, N_ROWS, N_DIRS, N_M_TILES, N_N_TILES,
    stride_ab, stride_at, stride_ad,
    stride_vk, stride_vp, stride_vd,
    stride_db, stride_dt, stride_dp,
    stride_pr,
    FLAT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_inner = N_DIRS * N_N_TILES
    pm = pid // n_inner
    inner = pid % n_inner
    k = inner // N_N_TILES
    nt = inner % N_N_TILES

    if FLAT_M:
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)  # global (sample, position) rows
        m_mask = rows < N_ROWS
        bi = rows // T
        ti = rows % T
    else:
        b = pm // N_M_TILES
        ti = (pm % N_M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = ti < T
        bi = b + ti * 0
    a_rows = a_ptr + bi * stride_ab + ti * stride_at
    d_rows = delta_ptr + bi * stride_db + ti * stride_dt

    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < P
    v_cols = v_ptr + k * stride_vk + offs_n * stride_vp

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        a = tl.load(a_rows[:, None] + offs_k[None, :] * stride_ad,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(v_cols[None, :] + offs_k[:, None] * stride_vd,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")

    d = tl.load(d_rows[:, None] + offs_n[None, :] * stride_dp,
                mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    row_sums = tl.sum(acc * d.to(acc.dtype), axis=1)
    col = k * N_N_TILES + nt
    if FLAT_M:
        tl.store(part_ptr + rows * stride_pr + col, row_sums, mask=m_mask)
    else:
        tl.store(part_ptr + pm * stride_pr + col, tl.sum(row_sums, axis=0))


def _blocks(interpreted: bool, t: int, p: int, d: int, half: bool):
    if interpreted:
        return 16, 16, 16, 4
    return 64, block(p, 16, 64), block(d, 16, 64 if half else 32), 4


def linear_dot(a: torch.Tensor, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample <dL_b/dW, V_k> of a Linear layer (same contract as ``eager_ops.linear_dot``).

    Args:
        a: layer input [B, T, d]; any strides.
        v: weight directions [K, p, d].
        delta: output gradient [B, T, p].
    Returns:
        [B, K]: float32 for float16/bfloat16 inputs, else the input dtype.
    """
    name = "linear_dot"
    if a.dim() != 3 or v.dim() != 3 or delta.dim() != 3:
        raise ValueError(f"{name}: expected a [B,T,d], v [K,p,d], delta [B,T,p]; got a {tuple(a.shape)}, "
                         f"v {tuple(v.shape)}, delta {tuple(delta.shape)}")
    bsz, t, d = a.shape
    k_dirs, p, d_v = v.shape
    if d_v != d or tuple(delta.shape) != (bsz, t, p):
        raise ValueError(f"{name}: shapes disagree: a {tuple(a.shape)}, v {tuple(v.shape)}, "
                         f"delta {tuple(delta.shape)} (want delta [{bsz}, {t}, {p}], v [K, {p}, {d}])")
    (a, v, delta), acc_dtype, out_dtype, dot_fp32 = prepare(name, _linear_dot_kernel, a, v, delta)
    bm, bn, bk, warps = _blocks(is_interpreted(_linear_dot_kernel), t, p, d, a.dtype != torch.float32)
    flat = t < bm
    n_n = cdiv(p, bn)
    n_m = cdiv(bsz * t, bm) if flat else cdiv(t, bm)
    n_row_tiles = n_m if flat else bsz * n_m
    n_programs = n_row_tiles * k_dirs * n_n
    if n_programs == 0:
        return torch.zeros(bsz, k_dirs, dtype=out_dtype, device=a.device)
    part_rows = bsz * t if flat else bsz * n_m
    part = torch.empty(part_rows, k_dirs * n_n, dtype=acc_dtype, device=a.device)
    launch(
        _linear_dot_kernel, (n_programs,),
        a_ptr=a, v_ptr=v, delta_ptr=delta, part_ptr=part,
        T=t, D=d, P=p, N_ROWS=bsz * t, N_DIRS=k_dirs, N_M_TILES=n_m, N_N_TILES=n_n,
        stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2),
        stride_vk=v.stride(0), stride_vp=v.stride(1), stride_vd=v.stride(2),
        stride_db=delta.stride(0), stride_dt=delta.stride(1), stride_dp=delta.stride(2),
        stride_pr=part.stride(0),
        FLAT_M=flat, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=dot_fp32,
        **launch_options(_linear_dot_kernel, warps),
    )
    return part.view(bsz, -1, k_dirs, n_n).sum(dim=(1, 3)).to(out_dtype)
