"""The DiT block's remaining small memory-bound ops in Triton, each one launch instead of several torch kernels.

- `gated_residual(x, gate, delta)`: x + gate * delta, computed in fp32 and rounded once (torch.addcmul's maths),
  gate per sample (B, 1, C). The self-attention residual of every block (the FFN residual is fused into the next
  block's LayerNorm, `residual_ln_modulate`).
- `silu_gate(out, gate)`: the softmax layers' output gate, out * SiLU(gate), from the attention output in its
  (B, N, heads, D) view (any strides) and the gate columns of the fused projection (B, N, C); one pass instead
  of a transpose copy, an fp32 cast, SiLU, a cast back and the product.
- `tconv_taps(y, ctx)`: the FFN temporal conv's input, [previous | current | next] frame features side by side
  (B, T, S, 3C), from the chunk's frames y (B, T, S, C) and the previous chunk's last frame ctx (B, C, 1, S) or
  zeros; the next frame after the chunk is zero. A program owns a (tokens x channels) tile of every frame and
  walks down the frames, loading each input element once. Replaces two concatenations (padding, then taps).
- `gdn_gates(p, heads, frames, a_log, dt_bias, col)`: the GDN layer's gates from its fused projection output p
  (B, N, >= col + 2 heads): beta = sigmoid(p[..., col : col + heads]) stored (B, T, S, heads) and returned as the
  (B, heads, T, S) view, and decay = exp(-exp(A_log) softplus(mean_S p[..., col + heads : col + 2 heads] +
  dt_bias)) (B, heads, T). Two launches: beta and per-block sums over (frame, 32-token block) programs, then one
  program per frame for the mean and the decay (one program per frame measured 25-35 us per layer on H100: a
  single SM walking the frame's strided rows); replaces about ten launches of slices, casts and reductions.
- `kv_append(k_buf, v_buf, k, v)`: the current chunk's keys and values into the free tail rows of the softmax
  window buffers (`engine.model.cache.LayerRead.kv_tail`), both in one launch (two device-to-device memcpys
  measured 32 us each at 2640 tokens: the copy engines are slower than a kernel).

Rounding follows the plain-PyTorch references in `kernels.fused.naive` (fp32 maths, one rounding to the output
dtype), through `_out` (round-to-nearest-even, also under TRITON_INTERPRET=1). Inference only; CUDA tensors, or
CPU tensors under TRITON_INTERPRET=1 (tests/kernels/test_block_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.fused.triton_fused import _check_device, _code, _empty, _interpreting, _out, _rnd
from kernels.pdl import pdl_options, wait_previous

__all__ = ["gated_residual", "gdn_gates", "kv_append", "silu_gate", "tconv_taps"]


@triton.jit
def _token_tile(M, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ROWS tokens (flat over batch x N) x BLOCK_C channels: (rows, channels, batch index, token
    index, in-bounds mask), from grid axes 0 (tokens) and 1 (channels)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, c, rows // N, rows % N, (rows < M)[:, None] & (c < C)[None, :]


@triton.jit
def _gated_residual_kernel(
    x_ptr, g_ptr, d_ptr, o_ptr, M, N, C,
    s_xb, s_xn, s_gb, s_db, s_dn,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, R_O: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows, c, b, n, m = _token_tile(M, N, C, ROWS, BLOCK_C)
    x = tl.load(x_ptr + b[:, None] * s_xb + n[:, None] * s_xn + c[None, :], mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + b[:, None] * s_db + n[:, None] * s_dn + c[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b[:, None] * s_gb + c[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows[:, None] * C + c[None, :], _out(x + g * d, o_ptr, R_O, INTERP), mask=m)


def _per_sample_gate(gate: Tensor, B: int, C: int) -> tuple[Tensor, int]:
    if gate.shape[-1] != C or gate.numel() not in (C, B * C):
        raise ValueError(f"gate must be (B, 1, C) or (1, 1, C) with B = {B}, C = {C}, got {tuple(gate.shape)}")
    gate = gate.reshape(-1, C)
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    return gate, gate.stride(0) if gate.shape[0] > 1 else 0


def gated_residual(x: Tensor, gate: Tensor, delta: Tensor) -> Tensor:
    """x + gate * delta in fp32, rounded once to x's dtype; x, delta (B, N, C) with unit channel stride (any row
    strides), gate (B, 1, C) / (B, C) per sample or (1, 1, C) for all. Returns a new contiguous tensor."""
    _check_device(x, gate, delta)
    if x.dim() != 3 or delta.shape != x.shape:
        raise ValueError(f"x and delta must be the same (B, N, C), got {tuple(x.shape)} and {tuple(delta.shape)}")
    B, N, C = x.shape
    x, delta = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, delta))
    g, s_gb = _per_sample_gate(gate, B, C)
    out = _empty((B, N, C), x.dtype, x.device)
    rows, block = 8, min(triton.next_power_of_2(C), 512)
    _gated_residual_kernel[(triton.cdiv(B * N, rows), triton.cdiv(C, block))](
        x, g, delta, out, B * N, N, C,
        x.stride(0), x.stride(1), s_gb, delta.stride(0), delta.stride(1),
        ROWS=rows, BLOCK_C=block, R_O=_code(x.dtype), INTERP=_interpreting(), num_warps=4,
        **pdl_options(),
    )  # fmt: skip
    return out


@triton.jit
def _silu_gate_kernel(
    o_ptr, g_ptr, y_ptr, M, N, C, D,
    s_ob, s_on, s_oh, s_gb, s_gn,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, R_O: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows, c, b, n, m = _token_tile(M, N, C, ROWS, BLOCK_C)
    src = o_ptr + b[:, None] * s_ob + n[:, None] * s_on + (c // D * s_oh + c % D)[None, :]
    o = tl.load(src, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b[:, None] * s_gb + n[:, None] * s_gn + c[None, :], mask=m, other=0.0).to(tl.float32)
    g = _rnd(g / (1.0 + tl.exp(-g)), R_O, INTERP)
    tl.store(y_ptr + rows[:, None] * C + c[None, :], _out(o * g, y_ptr, R_O, INTERP), mask=m)


def silu_gate(out: Tensor, gate: Tensor) -> Tensor:
    """out (B, N, heads, D) (unit last stride, any others) times SiLU(gate) (B, N, C = heads D) (unit channel
    stride): SiLU in fp32 rounded to gate's dtype, the product rounded to it too; new contiguous (B, N, C)."""
    _check_device(out, gate)
    if (
        out.dim() != 4
        or gate.dim() != 3
        or out.shape[:2] != gate.shape[:2]
        or out.shape[2] * out.shape[3] != gate.shape[2]
    ):
        raise ValueError(
            f"out must be (B, N, heads, D) and gate (B, N, heads * D), got {tuple(out.shape)}, {tuple(gate.shape)}"
        )
    B, N, heads, D = out.shape
    C = heads * D
    out, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (out, gate))
    y = _empty((B, N, C), gate.dtype, gate.device)
    rows, block = 8, min(triton.next_power_of_2(C), 512)
    _silu_gate_kernel[(triton.cdiv(B * N, rows), triton.cdiv(C, block))](
        out, gate, y, B * N, N, C, D,
        out.stride(0), out.stride(1), out.stride(2), gate.stride(0), gate.stride(1),
        ROWS=rows, BLOCK_C=block, R_O=_code(gate.dtype), INTERP=_interpreting(), num_warps=4,
        **pdl_options(),
    )  # fmt: skip
    return y


@triton.jit
def _tconv_taps_kernel(
    y_ptr, ctx_ptr, o_ptr, T, S, C,
    s_yb, s_yt, s_ys, s_cb, s_cc, s_cs,
    HAS_CTX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, R_O: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (s < S)[:, None] & (c < C)[None, :]
    src = y_ptr + b * s_yb + s[:, None] * s_ys + c[None, :]
    row = 3 * C  # output (B, T, S, 3C), contiguous
    dst = o_ptr + b * T * S * row + s[:, None] * row + c[None, :]
    if HAS_CTX:
        prev = tl.load(ctx_ptr + b * s_cb + c[None, :] * s_cc + s[:, None] * s_cs, mask=m, other=0.0)
        prev = _out(prev.to(tl.float32), o_ptr, R_O, INTERP)
    else:
        prev = tl.zeros((BLOCK_S, BLOCK_C), dtype=o_ptr.dtype.element_ty)
    cur = tl.load(src, mask=m, other=0.0)
    for t in range(T):
        if t + 1 < T:
            nxt = tl.load(src + (t + 1) * s_yt, mask=m, other=0.0)
        else:
            nxt = tl.zeros((BLOCK_S, BLOCK_C), dtype=cur.dtype)
        out = dst + t * S * row
        tl.store(out, prev, mask=m)
        tl.store(out + C, cur, mask=m)
        tl.store(out + 2 * C, nxt, mask=m)
        prev, cur = cur, nxt


def tconv_taps(y: Tensor, ctx: Tensor | None) -> Tensor:
    """(B, T, S, 3C) = [frame t-1 | frame t | frame t+1] of y (B, T, S, C) (unit channel stride), frame -1 being
    ctx (B, C, 1, S) (any strides, cast to y's dtype) or zeros, frame T zeros. New contiguous tensor."""
    _check_device(y, *(() if ctx is None else (ctx,)))
    if y.dim() != 4:
        raise ValueError(f"y must be (B, T, S, C), got {tuple(y.shape)}")
    B, T, S, C = y.shape
    if ctx is not None and ctx.shape != (B, C, 1, S):
        raise ValueError(f"ctx must be (B, C, 1, S) = ({B}, {C}, 1, {S}), got {tuple(ctx.shape)}")
    if y.stride(-1) != 1:
        y = y.contiguous()
    out = _empty((B, T, S, 3 * C), y.dtype, y.device)
    cs = (0, 0, 0) if ctx is None else (ctx.stride(0), ctx.stride(1), ctx.stride(3))
    bs, bc = 32, min(triton.next_power_of_2(C), 128)
    _tconv_taps_kernel[(B, triton.cdiv(S, bs), triton.cdiv(C, bc))](
        y, y if ctx is None else ctx, out, T, S, C,
        y.stride(0), y.stride(1), y.stride(2), *cs,
        HAS_CTX=ctx is not None, BLOCK_S=bs, BLOCK_C=bc, R_O=_code(y.dtype), INTERP=_interpreting(), num_warps=4,
        **pdl_options(),
    )  # fmt: skip
    return out


@triton.jit
def _gdn_beta_kernel(
    p_ptr, beta_ptr, part_ptr, T, S, H, col, s_pb, s_pn,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, R_O: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    """Program (frame, token block): beta of BLOCK_S tokens, and the block's sum of the decay-gate columns."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    bt, blk = tl.program_id(0), tl.program_id(1)
    b, t = bt // T, bt % T
    s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.arange(0, BLOCK_H)
    m = (s < S)[:, None] & (h < H)[None, :]
    tok = p_ptr + b * s_pb + (t * S + s)[:, None] * s_pn + col + h[None, :]
    z = tl.load(tok, mask=m, other=0.0).to(tl.float32)
    tl.store(beta_ptr + (bt * S + s)[:, None] * H + h[None, :], _out(1.0 / (1.0 + tl.exp(-z)), beta_ptr, R_O, INTERP),
             mask=m)  # fmt: skip
    part = tl.sum(tl.load(tok + H, mask=m, other=0.0).to(tl.float32), axis=0)
    tl.store(part_ptr + (bt * tl.num_programs(1) + blk) * BLOCK_H + h, part)


@triton.jit
def _log1p(u):
    """log(1 + u) for u in [0, 1], accurate also where 1 + u rounds away most of u."""
    return tl.where(u < 1e-4, u - 0.5 * u * u, tl.log(1.0 + u))


@triton.jit
def _gdn_decay_kernel(
    part_ptr, alog_ptr, dtb_ptr, decay_ptr, T, S, H, NBLK, s_db, s_dh,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, R_O: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    """Program (frame): the frame mean from the blocks' sums (in block order), then the decay of every head."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    i = tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    hm = h < H
    parts = tl.load(part_ptr + (bt * NBLK + i)[:, None] * BLOCK_H + h[None, :], mask=(i < NBLK)[:, None], other=0.0)
    a = tl.sum(parts, axis=0) / S + tl.load(dtb_ptr + h, mask=hm, other=0.0).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.maximum(a, 0.0) + _log1p(tl.exp(-tl.abs(a))))
    decay = tl.exp(-tl.exp(tl.load(alog_ptr + h, mask=hm, other=0.0).to(tl.float32)) * softplus)
    tl.store(decay_ptr + b * s_db + h * s_dh + t, _out(decay, decay_ptr, R_O, INTERP), mask=hm)


def gdn_gates(p: Tensor, heads: int, frames: int, a_log: Tensor, dt_bias: Tensor, col: int) -> tuple[Tensor, Tensor]:
    """From the GDN layer's fused projections p (B, N = T S, >= col + 2 heads) (unit last stride):
    beta (B, heads, T, S) = sigmoid(p[..., col : col + heads]) as a view of a (B, T, S, heads) tensor, and decay
    (B, heads, T) = exp(-exp(a_log) * softplus(frame mean of p[..., col + heads : col + 2 heads] + dt_bias)),
    both in p's dtype (fp32 maths, one rounding)."""
    _check_device(p, a_log, dt_bias)
    if p.dim() != 3 or p.shape[2] < col + 2 * heads or p.shape[1] % frames:
        raise ValueError(f"p must be (B, T*S, >= {col + 2 * heads}) with T = {frames}, got {tuple(p.shape)}")
    if a_log.shape != (heads,) or dt_bias.shape != (heads,):
        raise ValueError(f"a_log and dt_bias must be ({heads},)")
    if p.stride(-1) != 1:
        p = p.contiguous()
    B, N, _ = p.shape
    T, S = frames, N // frames
    beta = _empty((B, T, S, heads), p.dtype, p.device)
    decay = _empty((B, heads, T), p.dtype, p.device)
    block_s, block_h = 32, triton.next_power_of_2(heads)
    nblk = triton.cdiv(S, block_s)
    parts = torch.empty((B * T, nblk, block_h), dtype=torch.float32, device=p.device)
    common = dict(BLOCK_H=block_h, R_O=_code(p.dtype), INTERP=_interpreting(), **pdl_options())
    _gdn_beta_kernel[(B * T, nblk)](
        p, beta, parts, T, S, heads, col, p.stride(0), p.stride(1), BLOCK_S=block_s, num_warps=4, **common
    )  # fmt: skip
    _gdn_decay_kernel[(B * T,)](
        parts, a_log.contiguous(), dt_bias.contiguous(), decay, T, S, heads, nblk, decay.stride(0), decay.stride(1),
        BLOCK_N=triton.next_power_of_2(nblk), num_warps=4, **common,
    )  # fmt: skip
    return beta.permute(0, 3, 1, 2), decay


@triton.jit
def _kv_append_kernel(
    kb_ptr, vb_ptr, k_ptr, v_ptr, M, N, C, start,
    s_kbb, s_kbn, s_vbb, s_vbn, s_kb, s_kn, s_vb, s_vn,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows, c, b, n, m = _token_tile(M, N, C, ROWS, BLOCK_C)
    if tl.program_id(2) == 0:
        x = tl.load(k_ptr + b[:, None] * s_kb + n[:, None] * s_kn + c[None, :], mask=m)
        tl.store(kb_ptr + b[:, None] * s_kbb + (start + n)[:, None] * s_kbn + c[None, :], x, mask=m)
    else:
        x = tl.load(v_ptr + b[:, None] * s_vb + n[:, None] * s_vn + c[None, :], mask=m)
        tl.store(vb_ptr + b[:, None] * s_vbb + (start + n)[:, None] * s_vbn + c[None, :], x, mask=m)


def kv_append(k_buf: Tensor, v_buf: Tensor, k: Tensor, v: Tensor) -> None:
    """Copy k and v (B, N, heads, D) into the last N rows of k_buf / v_buf (B, M + N, heads, D), in place. All
    four need (heads, D) laid out densely (one channel run per token); any batch and token strides; one dtype."""
    _check_device(k_buf, v_buf, k, v)
    B, N = k.shape[:2]
    if v.shape != k.shape or k_buf.shape[0] != B or k_buf.shape[2:] != k.shape[2:] or v_buf.shape != k_buf.shape:
        raise ValueError(f"buffers {tuple(k_buf.shape)} / {tuple(v_buf.shape)} cannot take k / v {tuple(k.shape)}")
    if len({t.dtype for t in (k_buf, v_buf, k, v)}) != 1:
        raise ValueError("kv_append copies without conversion: one dtype for buffers and inputs")
    heads, D = k.shape[2:]
    for t in (k_buf, v_buf, k, v):
        if t.stride(3) != 1 or t.stride(2) != D:
            raise ValueError("kv_append needs each token's (heads, D) channels contiguous")
    C = heads * D
    rows, block = 8, min(triton.next_power_of_2(C), 512)
    _kv_append_kernel[(triton.cdiv(B * N, rows), triton.cdiv(C, block), 2)](
        k_buf, v_buf, k, v, B * N, N, C, k_buf.shape[1] - N,
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROWS=rows, BLOCK_C=block, num_warps=4, **pdl_options(),
    )  # fmt: skip
