"""Per-sample conv weight-gradient dots: implicit-GEMM convolution with a fused delta epilogue.

s[b, k] = sum_{c, pos} conv2d(x_b; V_k)[c, pos] * delta_b[c, pos]   (spec: ``iwd_fast.scoring.eager_ops.conv_dot``)

One program owns one sample b, one direction k, one group g, a tile of BLOCK_M output positions and
a tile of BLOCK_N output channels of that group. It walks the reduction axis r = (ci, kh, kw) of
length Cin/g * KH * KW in BLOCK_K chunks, gathering the input pixels each output position needs
(implicit im2col; zero padding and tile edges are masked loads), multiplies them with the matching
block of V_k with ``tl.dot`` (fp32 accumulation), then multiplies the [BLOCK_M, BLOCK_N] conv tile by
the matching delta tile and reduces it to one number. The conv output never reaches memory. Each
program writes its own slot of a partials buffer [B, K, n_tiles]; a fixed-order torch sum finishes
the reduction, so results are bit-identical from run to run (no atomics).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from ..scoring.eager_ops import conv_hyperparameters
from ._common import block, cdiv, is_interpreted, launch, launch_options, prepare

IntOrSeq = Union[int, Sequence[int]]


@triton.jit
def _conv_dot_kernel(
    x_ptr, v_ptr, delta_ptr, part_ptr,
    C_IN_G, H, W, C_OUT_G, HO, WO,
    N_DIRS, GROUPS, N_M_TILES, N_N_TILES,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_vk, stride_vo, stride_vi, stride_vh, stride_vw,
    stride_db, stride_dc, stride_dh, stride_dw,
    stride_pb, stride_pk,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Program -> (sample b, position tile mt) x (direction k, group g, channel tile nt).
    pid = tl.program_id(0).to(tl.int64)
    n_inner = N_DIRS * GROUPS * N_N_TILES
    outer = pid // n_inner
    inner = pid % n_inner
    b = outer // N_M_TILES
    mt = outer % N_M_TILES
    k = inner // (GROUPS * N_N_TILES)
    gn = inner % (GROUPS * N_N_TILES)
    g = gn // N_N_TILES
    nt = gn % N_N_TILES

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # output positions (int64)
    m_mask = offs_m < HO * WO
    oh = offs_m // WO
    ow = offs_m % WO
    ih0 = oh * conv_stride_h - pad_h
    iw0 = ow * conv_stride_w - pad_w

    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group (int64)
    n_mask = offs_n < C_OUT_G
    co = g * C_OUT_G + offs_n

    x_base = x_ptr + b * stride_xb + (g * C_IN_G) * stride_xc
    v_base = v_ptr + k * stride_vk
    red = C_IN_G * (KH * KW)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for r0 in range(0, red, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < red
        ci = (offs_r // (KH * KW)).to(tl.int64)
        kk = offs_r % (KH * KW)
        kh = kk // KW
        kw = kk % KW
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        a_mask = (m_mask[:, None] & r_mask[None, :]
                  & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        a = tl.load(x_base + ci[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
                    mask=a_mask, other=0.0)
        w = tl.load(v_base + co[None, :] * stride_vo + ci[:, None] * stride_vi
                    + kh[:, None] * stride_vh + kw[:, None] * stride_vw,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")

    # Fused epilogue: multiply the conv tile by delta and reduce it to one number.
    d = tl.load(delta_ptr + b * stride_db + co[None, :] * stride_dc
                + oh[:, None] * stride_dh + ow[:, None] * stride_dw,
                mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    total = tl.sum(tl.sum(acc * d.to(acc.dtype), axis=1), axis=0)
    tile = (g * N_N_TILES + nt) * N_M_TILES + mt
    tl.store(part_ptr + b * stride_pb + k * stride_pk + tile, total)


def _blocks(interpreted: bool, positions: int, cout_g: int, red: int, half: bool):
    if interpreted:
        return 16, 16, 16, 4
    return block(positions, 16, 64), block(cout_g, 16, 64), block(red, 16, 64 if half else 32), 4


def conv_dot(
    x: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample <dL_b/dW, V_k> of a conv1d/conv2d layer (same contract as ``eager_ops.conv_dot``).

    Args:
        x: layer input [B, Cin, H, W] (or [B, Cin, L] for conv1d); any strides.
        v: weight directions [K, Cout, Cin/groups, kh, kw] (or [K, Cout, Cin/groups, kl]).
        delta: output gradient [B, Cout, Ho, Wo] (or [B, Cout, Lo]).
        stride, padding, dilation: ints or one int per spatial dim (numeric padding only).
        groups: the layer's groups.
    Returns:
        [B, K]: float32 for float16/bfloat16 inputs, else the input dtype.
    """
    name = "conv_dot"
    if x.dim() != delta.dim() or x.dim() + 1 != v.dim() or x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected x [B,C,H,W], v [K,Cout,Cin/g,kh,kw], delta [B,Cout,Ho,Wo] "
                         f"(or their 1d forms); got x {tuple(x.shape)}, v {tuple(v.shape)}, "
                         f"delta {tuple(delta.shape)}")
    nd = x.dim() - 2
    stride_, padding_, dilation_ = conv_hyperparameters(stride, padding, dilation, nd, name)
    if nd == 1:  # conv1d == conv2d of height 1
        x, v, delta = x.unsqueeze(2), v.unsqueeze(3), delta.unsqueeze(2)
        stride_, padding_, dilation_ = (1, *stride_), (0, *padding_), (1, *dilation_)
    bsz, cin, h, w = x.shape
    k_dirs, cout, cin_g, kh, kw = v.shape
    groups = int(groups)
    if groups < 1 or cin % groups or cout % groups or cin_g != cin // groups:
        raise ValueError(f"{name}: groups={groups} does not fit Cin={cin}, Cout={cout}, v {tuple(v.shape)}")
    ho = (h + 2 * padding_[0] - dilation_[0] * (kh - 1) - 1) // stride_[0] + 1
    wo = (w + 2 * padding_[1] - dilation_[1] * (kw - 1) - 1) // stride_[1] + 1
    if delta.shape[0] != bsz or delta.shape[1] != cout or tuple(delta.shape[2:]) != (ho, wo):
        raise ValueError(f"{name}: delta {tuple(delta.shape)} does not match the conv output "
                         f"[{bsz}, {cout}, {ho}, {wo}]")

    (x, v, delta), acc_dtype, out_dtype, dot_fp32 = prepare(name, _conv_dot_kernel, x, v, delta)
    cout_g = cout // groups
    bm, bn, bk, warps = _blocks(is_interpreted(_conv_dot_kernel), ho * wo, cout_g, cin_g * kh * kw,
                                x.dtype != torch.float32)
    n_m, n_n = cdiv(ho * wo, bm), cdiv(cout_g, bn)
    n_programs = bsz * n_m * k_dirs * groups * n_n
    if n_programs == 0:
        return torch.zeros(bsz, k_dirs, dtype=out_dtype, device=x.device)
    part = torch.empty(bsz, k_dirs, groups * n_n * n_m, dtype=acc_dtype, device=x.device)
    launch(
        _conv_dot_kernel, (n_programs,),
        x_ptr=x, v_ptr=v, delta_ptr=delta, part_ptr=part,
        C_IN_G=cin_g, H=h, W=w, C_OUT_G=cout_g, HO=ho, WO=wo,
        N_DIRS=k_dirs, GROUPS=groups, N_M_TILES=n_m, N_N_TILES=n_n,
        conv_stride_h=stride_[0], conv_stride_w=stride_[1], pad_h=padding_[0], pad_w=padding_[1],
        dil_h=dilation_[0], dil_w=dilation_[1],
        stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_vk=v.stride(0), stride_vo=v.stride(1), stride_vi=v.stride(2), stride_vh=v.stride(3),
        stride_vw=v.stride(4),
        stride_db=delta.stride(0), stride_dc=delta.stride(1), stride_dh=delta.stride(2),
        stride_dw=delta.stride(3),
        stride_pb=part.stride(0), stride_pk=part.stride(1),
        KH=kh, KW=kw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=dot_fp32,
        **launch_options(_conv_dot_kernel, warps),
    )
    return part.sum(dim=-1).to(out_dtype)
