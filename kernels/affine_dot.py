"""Per-sample dots for per-channel affine parameters (biases, norm-layer gamma/beta).

s[b, k] = sum_c (sum_pos delta[b, c, pos]) v_bias[k, c] + (sum_pos xhat[b, c, pos] delta[b, c, pos]) v_weight[k, c]
(spec: ``iwd_fast.scoring.eager_ops.affine_dot``)

One program owns one sample and BLOCK_C channels: it sums delta (and xhat * delta) over positions in
BLOCK_P chunks, then dots these per-channel sums with BLOCK_K directions at a time and writes one
number per direction into partials [B, K, n_channel_tiles]; a fixed-order torch sum finishes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import block, cdiv, is_interpreted, launch, launch_options, prepare


@triton.jit
def _affine_dot_kernel(
    delta_ptr, xhat_ptr, vb_ptr, vw_ptr, part_ptr,
    C, P, N_DIRS, N_C_TILES,
    stride_db, stride_dc, stride_dp,
    stride_xb, stride_xc, stride_xp,
    stride_vbk, stride_vbc,
    stride_vwk, stride_vwc,
    stride_pb, stride_pk,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N_C_TILES
    ct = pid % N_C_TILES
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    acc_ty = part_ptr.dtype.element_ty

    d_rows = delta_ptr + b * stride_db + offs_c * stride_dc
    x_rows = xhat_ptr + b * stride_xb + offs_c * stride_xc
    sum_d = tl.zeros((BLOCK_C,), dtype=acc_ty)
    sum_xd = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (offs_p < P)[None, :]
        d = tl.load(d_rows[:, None] + offs_p[None, :] * stride_dp, mask=mask, other=0.0).to(acc_ty)
        if HAS_BIAS:
            sum_d += tl.sum(d, axis=1)
        if HAS_WEIGHT:
            xh = tl.load(x_rows[:, None] + offs_p[None, :] * stride_xp, mask=mask, other=0.0).to(acc_ty)
            sum_xd += tl.sum(xh * d, axis=1)

    for k0 in range(0, N_DIRS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < N_DIRS
        vmask = k_mask[:, None] & c_mask[None, :]
        s = tl.zeros((BLOCK_K,), dtype=acc_ty)
        if HAS_BIAS:
            vb = tl.load(vb_ptr + offs_k[:, None] * stride_vbk + offs_c[None, :] * stride_vbc,
                         mask=vmask, other=0.0).to(acc_ty)
            s += tl.sum(vb * sum_d[None, :], axis=1)
        if HAS_WEIGHT:
            vw = tl.load(vw_ptr + offs_k[:, None] * stride_vwk + offs_c[None, :] * stride_vwc,
                         mask=vmask, other=0.0).to(acc_ty)
            s += tl.sum(vw * sum_xd[None, :], axis=1)
        tl.store(part_ptr + b * stride_pb + offs_k * stride_pk + ct, s, mask=k_mask)


def _blocks(interpreted: bool, c: int, p: int, k: int):
    if interpreted:
        return 16, 16, 16, 4
    return block(c, 16, 32), block(p, 16, 128), block(k, 16, 16), 4


def affine_dot(
    delta: torch.Tensor,
    v_bias: Optional[torch.Tensor],
    xhat: Optional[torch.Tensor] = None,
    v_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample dot for per-channel affine parameters: the arguments and shapes of ``eager_ops.affine_dot``
    (delta [B, C, P], v_bias / v_weight [K, C] or None, xhat [B, C, P] with v_weight).

    Returns [B, K]: float32 for float16/bfloat16 inputs, else the input dtype.
    """
    name = "affine_dot"
    if v_bias is None and v_weight is None:
        raise ValueError(f"{name}: give v_bias or v_weight")
    if v_weight is not None and xhat is None:
        raise ValueError(f"{name}: v_weight needs xhat")
    if delta.dim() != 3:
        raise ValueError(f"{name}: expected delta [B, C, P], got {tuple(delta.shape)}")
    bsz, c, p = delta.shape
    dirs = [t for t in (v_bias, v_weight) if t is not None]
    k_dirs = dirs[0].shape[0] if dirs[0].dim() == 2 else -1
    for t in dirs:
        if t.dim() != 2 or tuple(t.shape) != (k_dirs, c):
            raise ValueError(f"{name}: directions must be [K, C] = [{k_dirs}, {c}] "
                             f"(one shape for v_bias and v_weight), got {tuple(t.shape)}")
    if v_weight is not None and tuple(xhat.shape) != (bsz, c, p):
        raise ValueError(f"{name}: xhat {tuple(xhat.shape)} must match delta {tuple(delta.shape)}")
    if v_weight is None:
        xhat = None  # unused without v_weight; keep it out of dtype promotion
    (delta, v_bias, xhat, v_weight), acc_dtype, out_dtype, _ = prepare(
        name, _affine_dot_kernel, delta, v_bias, xhat, v_weight)
    bc, bp, bk, warps = _blocks(is_interpreted(_affine_dot_kernel), c, p, k_dirs)
    n_c = cdiv(c, bc)
    if bsz * n_c * k_dirs == 0:
        return torch.zeros(bsz, k_dirs, dtype=out_dtype, device=delta.device)
    part = torch.empty(bsz, k_dirs, n_c, dtype=acc_dtype, device=delta.device)
    has_bias, has_weight = v_bias is not None, v_weight is not None
    # Absent operands: pass delta as a placeholder pointer; the constexpr flags skip every access.
    vb = v_bias if has_bias else delta
    vw = v_weight if has_weight else delta
    xh = xhat if has_weight else delta
    launch(
        _affine_dot_kernel, (bsz * n_c,),
        delta_ptr=delta, xhat_ptr=xh, vb_ptr=vb, vw_ptr=vw, part_ptr=part,
        C=c, P=p, N_DIRS=k_dirs, N_C_TILES=n_c,
        stride_db=delta.stride(0), stride_dc=delta.stride(1), stride_dp=delta.stride(2),
        stride_xb=xh.stride(0), stride_xc=xh.stride(1), stride_xp=xh.stride(2),
        stride_vbk=vb.stride(0), stride_vbc=vb.stride(1),
        stride_vwk=vw.stride(0), stride_vwc=vw.stride(1),
        stride_pb=part.stride(0), stride_pk=part.stride(1),
        HAS_BIAS=has_bias, HAS_WEIGHT=has_weight,
        BLOCK_C=bc, BLOCK_P=bp, BLOCK_K=bk,
        **launch_options(_affine_dot_kernel, warps),
    )
    return part.sum(dim=-1).to(out_dtype)
