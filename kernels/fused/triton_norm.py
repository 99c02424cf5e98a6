"""RMSNorm, optionally followed by RoPE, in one Triton pass: the q/k (and cross-attention q) norms of the DiT.

`rms_norm(x, weight, eps, cos, sin, head_dim)` computes `engine.model.layers.RMSNorm` (fp32 statistics, weight
applied in fp32, one rounding to x's dtype) and, given fp32 cos / sin tables, then `apply_rope`'s fast mode on
the rounded result (each head's channel pairs (2i, 2i+1) rotated in fp32, rounded again): the softmax layers'
`q_norm -> RoPE`. The plain-PyTorch reference is `kernels.fused.naive.rms_norm`. A program holds ROWS whole
tokens, as (even, odd) channel pairs with RoPE (the rotation then needs no shuffles), as plain rows without.
Inference only; CUDA, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.fused.triton_fused import _check_device, _code, _empty, _inner, _interpreting, _out, _rnd
from kernels.pdl import pdl_options, wait_previous

__all__ = ["rms_norm"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    M, N, C, HALF_D, eps,
    s_xb, s_xn, s_ob, s_on, s_cb, s_cn,
    ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    R_Y: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    """ROWS tokens per program; a token's C channels as BLOCK_P (even, odd) pairs (RoPE rotates pairs)."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b, n = rows // N, rows % N
    if not ROPE:  # plain RMSNorm: whole rows, contiguous loads (the pair split below reads every other element)
        c = tl.arange(0, 2 * BLOCK_P)
        cm = (rows < M)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + b[:, None] * s_xb + n[:, None] * s_xn + c[None, :], mask=cm, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = w[None, :] * (x * rstd[:, None])
        tl.store(out_ptr + b[:, None] * s_ob + n[:, None] * s_on + c[None, :], _out(y, out_ptr, R_Y, INTERP), mask=cm)
    else:
        p = tl.arange(0, BLOCK_P)
        mask = (rows < M)[:, None] & (p < C // 2)[None, :]
        src = x_ptr + b[:, None] * s_xb + n[:, None] * s_xn + 2 * p[None, :]
        xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xe * xe + xo * xo, axis=1) / C + eps)
        we = tl.load(w_ptr + 2 * p, mask=p < C // 2, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + 2 * p + 1, mask=p < C // 2, other=0.0).to(tl.float32)
        ye = we[None, :] * (xe * rstd[:, None])
        yo = wo[None, :] * (xo * rstd[:, None])
        # the reference rounds the norm's output, then rotates in fp32
        ye = _rnd(ye, R_Y, INTERP)
        yo = _rnd(yo, R_Y, INTERP)
        j = p % HALF_D
        tab = b[:, None] * s_cb + n[:, None] * s_cn + j[None, :]
        cs = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        ye, yo = ye * cs - yo * sn, ye * sn + yo * cs
        dst = out_ptr + b[:, None] * s_ob + n[:, None] * s_on + 2 * p[None, :]
        tl.store(dst, _out(ye, out_ptr, R_Y, INTERP), mask=mask)
        tl.store(dst + 1, _out(yo, out_ptr, R_Y, INTERP), mask=mask)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None, head_dim: int = 0
) -> Tensor:
    """RMSNorm over the last dim of x (B, N, C) in fp32 statistics, times weight, in x's dtype; with cos / sin
    ((N, D/2) or per sample (B, N, D/2), fp32) also the RoPE rotation of each head's channel pairs (2i, 2i+1)
    (`engine.model.layers.apply_rope`'s fast mode) after rounding the norm to x's dtype. See naive.py."""
    _check_device(x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got {tuple(x.shape)}")
    B, N, C = x.shape
    if weight.shape != (C,):
        raise ValueError(f"weight must be ({C},), got {tuple(weight.shape)}")
    rope = cos is not None
    if rope:
        if sin is None or head_dim <= 0 or head_dim % 2 or C % head_dim:
            raise ValueError("RoPE needs cos and sin and an even head_dim dividing C")
        if cos.shape[-2:] != (N, head_dim // 2) or sin.shape != cos.shape:
            raise ValueError(f"cos / sin must be (N, D/2) = ({N}, {head_dim // 2}) or (B, N, D/2)")
        cos, sin = _inner(cos), _inner(sin)
        s_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
        s_cn = cos.stride(-2)
    else:
        cos = sin = weight
        s_cb = s_cn = 0
    if C % 2:
        raise ValueError(f"C must be even, got {C}")
    x = _inner(x)
    out = _empty((B, N, C), x.dtype, x.device)
    rows = 2
    _rms_norm_kernel[(triton.cdiv(B * N, rows),)](
        x, weight.contiguous(), cos, sin, out,
        B * N, N, C, max(head_dim // 2, 1), float(eps),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), s_cb, s_cn,
        ROPE=rope, ROWS=rows, BLOCK_P=triton.next_power_of_2(C // 2),
        R_Y=_code(x.dtype), INTERP=_interpreting(), num_warps=4, **pdl_options(),
    )  # fmt: skip
    return out
