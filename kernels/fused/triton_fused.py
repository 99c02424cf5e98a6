"""Fused memory-bound parts of the SANA-Streaming DiT block in Triton, with the signatures of `naive.py`.

- `dwconv_glu(u, weight, bias, frames, height, width)`: the FFN's middle, SiLU -> per-frame depthwise 3x3 conv
  -> a * SiLU(g), in one pass over u (B, N, 2F) channels-last, writing (B, N, F).
- `ln_modulate(x, shift, scale, eps)`: LayerNorm (no affine, fp32 statistics) -> x (1 + scale) + shift.
- `residual_ln_modulate(x, delta, gate, shift, scale, eps)`: x_new = x + gate * delta stored, then
  ln_modulate(x_new) from the stored values; one read of x and delta, one write of x_new and h.

Every kernel computes in fp32 and rounds where the reference (plain PyTorch in the inputs' dtype) rounds: each
op's result is rounded to that op's result dtype under torch's type promotion (kernels/fused/README.md lists
the points). On the GPU the rounding is round-to-nearest-even through inline PTX (the compiler folds a plain
fp32 -> bf16 -> fp32 round trip away); Triton's interpreter truncates fp32 -> bf16 casts, so under
TRITON_INTERPRET=1 the kernels round with integer arithmetic instead (`_rnd`).

dwconv_glu: a program owns one frame, a strip of BW columns, a block of BC channels (and the same BC channels of
the gate half, F further on) and RH output rows; it walks down the rows, loading each input row once (the next
row is loaded while the current one is computed), and keeps the 3x3 stencil as two rolling fp32 partial sums
per half (rows r-1 and r). The horizontal neighbours come from one of two `shift` modes (`DWConvTiling`):
"load" reads the row three times at column offsets -1, 0, +1 (the re-reads hit L1) and evaluates SiLU three
times; "dot" reads it once with a one-column halo on each side, evaluates SiLU once and shifts by products
with 0/1 matrices on the tensor cores (exact: the operand is the bf16-rounded SiLU output, fp32 accumulate).
The special-function unit (SiLU's exp and reciprocal, or one tanh with `fast_silu`) and the fp32 -> bf16
conversions bound the kernel at the real shape (H100: 84 us against a 35 us memory floor, 186 us for
torch.compile of the reference; kernels/fused/README.md).

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests). Inference only (no backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.pdl import pdl_options, wait_previous

__all__ = [
    "DEFAULT_DWCONV",
    "DEFAULT_LN",
    "DWConvTiling",
    "LNTiling",
    "dwconv_glu",
    "ln_modulate",
    "residual_ln_modulate",
]

_SHIFTS = {"load": 0, "dot": 1}
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # rounding codes of `_rnd`


@dataclass(frozen=True)
class DWConvTiling:
    """Launch parameters of `dwconv_glu`. Defaults: the fastest inside the whole 2B forward on H100
    (loadtest/tile_sweep.py: block_c 64 with 4 warps, -0.1 ms per forward against block_c 32 with 2 warps, which
    the kernel-alone sweep had preferred at 84.0 us, kernels/fused/README.md); with exact SiLU the fastest alone
    was DWConvTiling("dot", 16, 32, 22, 2, False), 89.7 us.

    Attributes:
        shift: how a program gets the horizontal neighbours: "load" (three loads, SiLU three times) or "dot"
            (one load with a one-column halo each side, SiLU once, 0/1-matrix products; block_w >= 16).
        block_w: columns per tile (a power of two); with "dot" two of them are the halo.
        block_c: channels per program and half (a power of two).
        rows: output rows per program (it loads rows + 2).
        num_warps: warps per program.
        fast_silu: bf16 / fp16 on the GPU only: SiLU through tanh.approx (one special-function op instead of
            two; relative error about 2^-11, so the kernel no longer rounds y exactly as the reference).
        paired_rounding: bf16 on the GPU only: round to bf16 two elements per conversion (`_rnd` PAIRS),
            bit-identical to one per conversion but slower on H100 (82.4 against 81.5 us alone,
            loadtest/results/paired_rounding_h100.json): the conversions are not what bounds the kernel. Off.
    """

    shift: str = "load"
    block_w: int = 8
    block_c: int = 64
    rows: int = 22
    num_warps: int = 4
    fast_silu: bool = True
    paired_rounding: bool = False

    def __post_init__(self) -> None:
        if self.shift not in _SHIFTS:
            raise ValueError(f"shift must be one of {sorted(_SHIFTS)}, got {self.shift!r}")
        low = 16 if self.shift == "dot" else 1
        for name, v, lo in (("block_w", self.block_w, low), ("block_c", self.block_c, 16)):
            if v < lo or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {lo} for shift={self.shift!r}, got {v}")
        if self.rows < 1 or self.num_warps < 1:
            raise ValueError(f"rows and num_warps must be >= 1, got {self.rows}, {self.num_warps}")

    def out_cols(self) -> int:
        """Output columns per tile (the halo modes spend two tile columns on the neighbours)."""
        return self.block_w if self.shift == "load" else self.block_w - 2


@dataclass(frozen=True)
class LNTiling:
    """Launch parameters of `ln_modulate` / `residual_ln_modulate` (defaults: the sweep's fastest on H100).

    Attributes:
        rows: tokens per program (a power of two); a program holds whole rows of C channels in registers.
        num_warps: warps per program.
        split: hold C as a power-of-two block plus a power-of-two tail (2240 -> 2048 + 256) rather than one
            block padded to the next power of two (4096), masked either way.
    """

    rows: int = 1
    num_warps: int = 4
    split: bool = True

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows & (self.rows - 1) or self.num_warps < 1:
            raise ValueError(f"rows must be a power of two and num_warps >= 1, got {self.rows}, {self.num_warps}")


DEFAULT_DWCONV = DWConvTiling()
DEFAULT_LN = LNTiling()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate goes through here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(*ts: Tensor) -> None:
    for t in ts:
        if t.device.type == "cpu" and not _interpreting():
            raise RuntimeError("triton fused kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def _code(dtype: torch.dtype) -> int:
    if dtype not in _CODES:
        raise ValueError(f"fused kernels take fp32, bf16 or fp16 tensors, got {dtype}")
    return _CODES[dtype]


def _inner(t: Tensor) -> Tensor:
    """t with unit stride on its last dim (a copy only when it has none)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _rnd(v, CODE: tl.constexpr, INTERP: tl.constexpr, PAIRS: tl.constexpr = False):
    """fp32 v rounded (to nearest even) to the dtype CODE names (0 fp32: unchanged, 1 bf16, 2 fp16), as fp32.

    On the GPU through inline PTX: the compiler folds a plain `v.to(bf16).to(fp32)` away (measured: results
    then differ from the reference's in a third of the elements). bf16: one cvt packs bf16(v) into the upper
    half and bf16(0) = 0 into the lower half, which are the fp32 bits of bf16(v). PAIRS (bf16 only): one cvt
    rounds two elements into one register (the first in the upper half), split again by a mask and a shift,
    which halves the conversions on the quarter-rate pipe for two full-rate integer ops. Same bits either way.
    The interpreter's fp32 -> bf16 cast truncates, so there the rounding is done on the bits."""
    if CODE == 1:
        if INTERP:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        elif PAIRS:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t, u; cvt.rn.bf16x2.f32 t, $2, $3; and.b32 u, t, 0xFFFF0000; mov.b32 $0, u; "
                "shl.b32 u, t, 16; mov.b32 $1, u; }",
                "=f,=f,f,f", [v], dtype=tl.float32, is_pure=True, pack=2,
            )  # fmt: skip
        else:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; .reg .f32 z; mov.f32 z, 0f00000000; cvt.rn.bf16x2.f32 t, $1, z; mov.b32 $0, t; }",
                "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
    elif CODE == 2:
        if INTERP:
            v = v.to(tl.float16).to(tl.float32)
        else:
            v = tl.inline_asm_elementwise(
                "{ .reg .b16 t; cvt.rn.f16.f32 t, $1; cvt.f32.f16 $0, t; }",
                "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
    return v


@triton.jit
def _out(v, ptr, CODE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 v as ptr's element type (dtype CODE), rounded to nearest even on the GPU and in the interpreter."""
    if INTERP:
        v = _rnd(v, CODE, INTERP)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _silu(v, INTERP: tl.constexpr, FAST: tl.constexpr = False):
    """v / (1 + exp(-v)) in fp32. GPU: ex2.approx.ftz and rcp.approx.ftz, 5 instructions (tl.exp and the fp32
    division bring range checks that double that); relative error about 2^-21. FAST (GPU only): h + h tanh(h),
    h = v / 2, with tanh.approx: 3 instructions and one special-function op instead of two, relative error
    about 2^-11 (a quarter of a bf16 ulp: the bf16 rounding of y then differs from the reference's in a few
    percent of the elements)."""
    if INTERP:
        out = v / (1.0 + tl.exp(-v))
    elif FAST:
        out = tl.inline_asm_elementwise(
            "{ .reg .f32 h, t; mul.f32 h, $1, 0f3F000000; tanh.approx.f32 t, h; fma.rn.f32 $0, h, t, h; }",
            "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        out = tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 t, t; mul.f32 $0, $1, t; }",
            "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    return out


@triton.jit
def _y(u, RND: tl.constexpr, INTERP: tl.constexpr, FAST: tl.constexpr, PAIRS: tl.constexpr):
    """A loaded tile of u -> y = SiLU(u) in fp32, rounded to u's dtype (the reference's first rounding)."""
    return _rnd(_silu(u.to(tl.float32), INTERP, FAST), RND, INTERP, PAIRS)


@triton.jit
def _taps(wp, cm, ROW: tl.constexpr):
    """One kernel row's three taps for the channels of wp (weights laid out (channel, 9)), as (1, BC) fp32."""
    k0 = tl.load(wp + ROW * 3, mask=cm, other=0.0).to(tl.float32)[None, :]
    k1 = tl.load(wp + ROW * 3 + 1, mask=cm, other=0.0).to(tl.float32)[None, :]
    k2 = tl.load(wp + ROW * 3 + 2, mask=cm, other=0.0).to(tl.float32)[None, :]
    return k0, k1, k2


@triton.jit
def _shift_rows(y, BW: tl.constexpr, OFF: tl.constexpr, RND: tl.constexpr, INTERP: tl.constexpr):
    """out[j] = y[j + OFF] (zero outside the tile) as a product with a 0/1 matrix. Exact: y is already rounded
    to the operand dtype (u's), the accumulation is fp32. OFF = 0 only moves y into the product's register
    layout, so that all three neighbours share one layout. The interpreter's bf16 / fp16 dots are wrong, so
    it multiplies in fp32."""
    i = tl.arange(0, BW)[:, None]
    j = tl.arange(0, BW)[None, :]
    sel = tl.where(j == i + OFF, 1.0, 0.0)
    if RND == 1 and not INTERP:
        out = tl.dot(sel.to(tl.bfloat16), y)
    elif RND == 2 and not INTERP:
        out = tl.dot(sel.to(tl.float16), y)
    else:
        out = tl.dot(sel, y, input_precision="ieee")
    return out


@triton.jit
def _load_row(rowp, r, last, w, c, cm, H, W, s_un, SHIFT: tl.constexpr):
    """Raw tiles of u for image row r (zero outside the image and beyond row `last`): SHIFT 0: columns w - 1,
    w, w + 1; else: columns w only (the first two outputs are then unused placeholders)."""
    wlim = tl.where((r >= 0) & (r < H) & (r <= last), W, 0)  # no column is valid in rows not loaded
    cmask = cm[None, :]
    ptr = rowp + w[:, None] * s_un + c[None, :]
    uc = tl.load(ptr, mask=((w >= 0) & (w < wlim))[:, None] & cmask, other=0.0)
    if SHIFT == 0:
        ul = tl.load(ptr - s_un, mask=((w >= 1) & (w < wlim + 1))[:, None] & cmask, other=0.0)
        ur = tl.load(ptr + s_un, mask=((w >= -1) & (w < wlim - 1))[:, None] & cmask, other=0.0)
    else:
        ul = uc
        ur = uc
    return ul, uc, ur


@triton.jit
def _lyr(ul, uc, ur, SHIFT: tl.constexpr, BW: tl.constexpr, RND: tl.constexpr, INTERP: tl.constexpr,
         FAST: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """Raw tiles of one row -> (y[w - 1], y[w], y[w + 1]) in fp32, y = SiLU(u) rounded to u's dtype."""
    if SHIFT == 0:
        yl = _y(ul, RND, INTERP, FAST, PAIRS)
        yc = _y(uc, RND, INTERP, FAST, PAIRS)
        yr = _y(ur, RND, INTERP, FAST, PAIRS)
    else:  # the products' operand: y rounded once, straight to u's dtype (fp32 holding it in the interpreter)
        if RND == 1 and not INTERP:
            y = _silu(uc.to(tl.float32), INTERP, FAST).to(tl.bfloat16)
        elif RND == 2 and not INTERP:
            y = _silu(uc.to(tl.float32), INTERP, FAST).to(tl.float16)
        else:
            y = _y(uc, RND, INTERP, FAST, PAIRS)
        yl = _shift_rows(y, BW, -1, RND, INTERP)
        yc = _shift_rows(y, BW, 0, RND, INTERP)
        yr = _shift_rows(y, BW, 1, RND, INTERP)
    return yl, yc, yr


@triton.jit
def _dwconv_glu_kernel(
    u_ptr, w_ptr, b_ptr, o_ptr,
    T, H, W, F, n_hc,
    s_ub, s_un, s_ob, s_on,
    HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, RH: tl.constexpr,
    RND: tl.constexpr, FAST: tl.constexpr, PAIRS: tl.constexpr, INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    """grid (column strips, frames x row chunks, channel blocks). Output row o = p0(o-1) + p1(o) + p2(o+1) with
    p_k(r) the horizontal 3-tap sum of input row r under kernel row k; a0 / a1 carry the partial sums of the
    next two output rows while the program walks down the input rows. Row r + 1 is loaded while row r is
    computed (the raw tiles are carried to the next iteration)."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    pid_w = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_c = tl.program_id(2)
    frame = pid_f // n_hc
    h0 = (pid_f % n_hc) * RH
    b = frame // T
    t = frame % T
    j = tl.arange(0, BW)
    if SHIFT == 0:
        w = pid_w * BW + j
        out_col = w < W
    else:  # tile columns 0 and BW - 1 are the halo
        w = pid_w * (BW - 2) - 1 + j
        out_col = (j >= 1) & (j < BW - 1) & (w < W)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < F
    cg = c + F
    wa = w_ptr + c * 9
    wg = w_ptr + cg * 9
    a00, a01, a02 = _taps(wa, cm, 0)
    a10, a11, a12 = _taps(wa, cm, 1)
    a20, a21, a22 = _taps(wa, cm, 2)
    g00, g01, g02 = _taps(wg, cm, 0)
    g10, g11, g12 = _taps(wg, cm, 1)
    g20, g21, g22 = _taps(wg, cm, 2)
    if HAS_BIAS:
        bias_a = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        bias_g = tl.load(b_ptr + cg, mask=cm, other=0.0).to(tl.float32)[None, :]
    else:
        bias_a = tl.zeros((1, BC), tl.float32)
        bias_g = tl.zeros((1, BC), tl.float32)
    frame_tok = (t * H * W).to(tl.int64)
    ub = u_ptr + b.to(tl.int64) * s_ub + frame_tok * s_un
    ob = o_ptr + b.to(tl.int64) * s_ob + frame_tok * s_on
    omask = out_col[:, None] & cm[None, :]
    ooff = w[:, None] * s_on + c[None, :]
    acc_a0 = tl.zeros((BW, BC), tl.float32)  # output row r - 1 (after row r), then row r
    acc_a1 = tl.zeros((BW, BC), tl.float32)
    acc_g0 = tl.zeros((BW, BC), tl.float32)
    acc_g1 = tl.zeros((BW, BC), tl.float32)
    n_rows = tl.minimum(H - h0, RH)
    last = h0 + n_rows  # the last input row this program reads
    r = h0 - 1
    nla, nca, nra = _load_row(ub + (r * W).to(tl.int64) * s_un, r, last, w, c, cm, H, W, s_un, SHIFT)
    nlg, ncg, nrg = _load_row(ub + (r * W).to(tl.int64) * s_un, r, last, w, cg, cm, H, W, s_un, SHIFT)
    for i in range(0, n_rows + 2):
        r = h0 - 1 + i
        ula, uca, ura, ulg, ucg, urg = nla, nca, nra, nlg, ncg, nrg
        rowp = ub + ((r + 1) * W).to(tl.int64) * s_un  # prefetch row r + 1
        nla, nca, nra = _load_row(rowp, r + 1, last, w, c, cm, H, W, s_un, SHIFT)
        nlg, ncg, nrg = _load_row(rowp, r + 1, last, w, cg, cm, H, W, s_un, SHIFT)
        la, ya, ra = _lyr(ula, uca, ura, SHIFT, BW, RND, INTERP, FAST, PAIRS)
        lg, yg, rg = _lyr(ulg, ucg, urg, SHIFT, BW, RND, INTERP, FAST, PAIRS)
        if i >= 2:  # output row r - 1 is complete
            za = _rnd(acc_a0 + a20 * la + a21 * ya + a22 * ra, RND, INTERP, PAIRS)
            zg = _rnd(acc_g0 + g20 * lg + g21 * yg + g22 * rg, RND, INTERP, PAIRS)
            out = za * _rnd(_silu(zg, INTERP, FAST), RND, INTERP, PAIRS)
            orow = ob + ((r - 1) * W).to(tl.int64) * s_on
            tl.store(orow + ooff, _out(out, o_ptr, RND, INTERP), mask=omask)
        acc_a0 = acc_a1 + a10 * la + a11 * ya + a12 * ra  # fma chains; the bias starts the first partial sum
        acc_g0 = acc_g1 + g10 * lg + g11 * yg + g12 * rg
        acc_a1 = bias_a + a00 * la + a01 * ya + a02 * ra
        acc_g1 = bias_g + g00 * lg + g01 * yg + g02 * rg


@triton.jit
def _ln_load(x_ptr, d_ptr, g_ptr, xo_ptr, xrow, drow, grow, xorow, rm, c0, C, BLOCK: tl.constexpr,
             RESID: tl.constexpr, HAS_GATE: tl.constexpr, R_X: tl.constexpr, R_GD: tl.constexpr,
             INTERP: tl.constexpr):  # fmt: skip
    """Channels [c0, c0 + BLOCK) of the program's rows: x, or x + gate * delta (stored), in fp32; and the mask."""
    c = c0 + tl.arange(0, BLOCK)
    m = rm[:, None] & (c < C)[None, :]
    cc = c[None, :]
    x = tl.load(x_ptr + xrow[:, None] + cc, mask=m, other=0.0).to(tl.float32)
    if RESID:
        d = tl.load(d_ptr + drow[:, None] + cc, mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            gt = tl.load(g_ptr + grow[:, None] + cc, mask=m, other=0.0).to(tl.float32)
            d = _rnd(gt * d, R_GD, INTERP)
        x = _rnd(x + d, R_X, INTERP)
        tl.store(xo_ptr + xorow[:, None] + cc, _out(x, xo_ptr, R_X, INTERP), mask=m)
    return x, m


@triton.jit
def _ln_store(xc, m, rstd, sh_ptr, sc_ptr, h_ptr, shrow, scrow, hrow, c0, BLOCK: tl.constexpr, R_X: tl.constexpr,
              R_S1: tl.constexpr, R_P: tl.constexpr, R_H: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """h = ln (1 + scale) + shift for channels [c0, c0 + BLOCK), rounding after every op as the reference."""
    cc = (c0 + tl.arange(0, BLOCK))[None, :]
    ln = _rnd(xc * rstd[:, None], R_X, INTERP)
    sc = tl.load(sc_ptr + scrow[:, None] + cc, mask=m, other=0.0).to(tl.float32)
    sh = tl.load(sh_ptr + shrow[:, None] + cc, mask=m, other=0.0).to(tl.float32)
    p = _rnd(ln * _rnd(1.0 + sc, R_S1, INTERP), R_P, INTERP)
    h = _rnd(p + sh, R_H, INTERP)
    tl.store(h_ptr + hrow[:, None] + cc, _out(h, h_ptr, R_X, INTERP), mask=m)


@triton.jit
def _ln_modulate_kernel(
    x_ptr, d_ptr, g_ptr, sh_ptr, sc_ptr, xo_ptr, h_ptr,
    R, N, C, eps,
    s_xb, s_xn, s_db, s_dn, s_gb, s_shb, s_scb, s_xob, s_xon, s_hb, s_hn,
    RESID: tl.constexpr, HAS_GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, TAIL: tl.constexpr,
    R_X: tl.constexpr, R_GD: tl.constexpr, R_S1: tl.constexpr, R_P: tl.constexpr, R_H: tl.constexpr,
    INTERP: tl.constexpr,
    GDC: tl.constexpr = False,
):  # fmt: skip
    """grid (ceil(B N / ROWS),): ROWS tokens of C channels each, held as a BLOCK_C block plus (TAIL > 0) a
    TAIL block after it (C = 2240 -> 2048 + 256, not 4096). [x <- x + gate * delta, stored]; LayerNorm with
    fp32 statistics (two-pass variance in registers); h = ln (1 + scale) + shift, rounded as the reference."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rm = rows < R
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    xrow = b * s_xb + n * s_xn
    drow = b * s_db + n * s_dn
    grow = b * s_gb
    xorow = b * s_xob + n * s_xon
    xa, ma = _ln_load(x_ptr, d_ptr, g_ptr, xo_ptr, xrow, drow, grow, xorow, rm, 0, C, BLOCK_C, RESID, HAS_GATE,
                      R_X, R_GD, INTERP)  # fmt: skip
    total = tl.sum(xa, axis=1)
    if TAIL > 0:
        xb, mb = _ln_load(x_ptr, d_ptr, g_ptr, xo_ptr, xrow, drow, grow, xorow, rm, BLOCK_C, C, TAIL, RESID,
                          HAS_GATE, R_X, R_GD, INTERP)  # fmt: skip
        total += tl.sum(xb, axis=1)
    mean = total / C
    xca = tl.where(ma, xa - mean[:, None], 0.0)
    sq = tl.sum(xca * xca, axis=1)
    if TAIL > 0:
        xcb = tl.where(mb, xb - mean[:, None], 0.0)
        sq += tl.sum(xcb * xcb, axis=1)
    rstd = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.sqrt_rn(sq / C + eps))
    shrow = b * s_shb
    scrow = b * s_scb
    hrow = b * s_hb + n * s_hn
    _ln_store(xca, ma, rstd, sh_ptr, sc_ptr, h_ptr, shrow, scrow, hrow, 0, BLOCK_C, R_X, R_S1, R_P, R_H, INTERP)
    if TAIL > 0:
        _ln_store(xcb, mb, rstd, sh_ptr, sc_ptr, h_ptr, shrow, scrow, hrow, BLOCK_C, TAIL, R_X, R_S1, R_P, R_H,
                  INTERP)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# launchers


def dwconv_glu(
    u: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    frames: int,
    height: int,
    width: int,
    *,
    tiling: DWConvTiling = DEFAULT_DWCONV,
) -> Tensor:
    """u (B, N, 2F) -> (B, N, F) = a * SiLU(g), [a | g] = depthwise 3x3 conv (per frame) of SiLU(u); see naive.py.

    u: any batch / token strides, unit channel stride (else copied); N = frames * height * width, t-major.
    weight (2F, 1, 3, 3), bias (2F,) or None, any float dtype (fp32 in the kernel). Output contiguous, u's dtype
    (fp32, bf16 or fp16); fp32 accumulation, rounded where the reference rounds (SiLU(u), the conv output,
    SiLU(g), the product).
    """
    _check_device(u)
    B, N, C2 = u.shape
    if frames * height * width != N or C2 % 2:
        raise ValueError(f"u {tuple(u.shape)} does not match {frames}x{height}x{width} tokens and 2F channels")
    if tuple(weight.shape) != (C2, 1, 3, 3) or (bias is not None and tuple(bias.shape) != (C2,)):
        raise ValueError(f"weight (2F, 1, 3, 3) and bias (2F,) expected for 2F = {C2}")
    u = _inner(u)
    Fh = C2 // 2
    w9 = weight.reshape(C2, 9).contiguous()
    out = _empty((B, N, Fh), u.dtype, u.device)
    t = tiling
    n_hc = triton.cdiv(height, t.rows)
    grid = (triton.cdiv(width, t.out_cols()), B * frames * n_hc, triton.cdiv(Fh, t.block_c))
    _dwconv_glu_kernel[grid](
        u, w9, bias.contiguous() if bias is not None else w9, out,
        frames, height, width, Fh, n_hc,
        u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, SHIFT=_SHIFTS[t.shift], BW=t.block_w, BC=t.block_c, RH=t.rows,
        RND=_code(u.dtype), FAST=t.fast_silu and u.dtype != torch.float32, PAIRS=t.paired_rounding,
        INTERP=_interpreting(),
        num_warps=t.num_warps, **pdl_options(),
    )  # fmt: skip
    return out


def _per_sample(t: Tensor, B: int, C: int, what: str) -> tuple[Tensor, int]:
    """(B', 1, C) or (B', C) with B' in (1, B) -> (a tensor with unit channel stride, its batch stride)."""
    if t.shape[-1] != C or t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[1] != 1) or t.shape[0] not in (1, B):
        raise ValueError(f"{what}: expected (B, 1, C) or (B, C) with B = {B} (or 1), C = {C}; got {tuple(t.shape)}")
    t = _inner(t)
    return t, (t.stride(0) if t.shape[0] == B and B > 1 else 0)


def _ln_launch(
    x: Tensor,
    delta: Tensor | None,
    gate: Tensor | None,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    tiling: LNTiling,
) -> tuple[Tensor | None, Tensor]:
    _check_device(x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got {tuple(x.shape)}")
    B, N, C = x.shape
    x = _inner(x)
    sh, s_shb = _per_sample(shift, B, C, "shift")
    sc, s_scb = _per_sample(scale, B, C, "scale")
    pr = torch.promote_types
    p_dt = pr(x.dtype, scale.dtype)
    codes = dict(R_X=_code(x.dtype), R_S1=_code(scale.dtype), R_P=_code(p_dt), R_H=_code(pr(p_dt, shift.dtype)))
    h = _empty((B, N, C), x.dtype, x.device)
    resid = delta is not None
    if resid:
        if delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} must match x {tuple(x.shape)}")
        delta = _inner(delta)
        x_new = _empty((B, N, C), x.dtype, x.device)
        gd_dt = delta.dtype
        if gate is not None:
            gate, s_gb = _per_sample(gate, B, C, "gate")
            gd_dt = pr(gate.dtype, delta.dtype)
        else:
            s_gb = 0
        codes["R_GD"] = _code(gd_dt)
        d, dst = delta, (delta.stride(0), delta.stride(1))
        xo, xost = x_new, (x_new.stride(0), x_new.stride(1))
    else:
        x_new, codes["R_GD"] = None, 0
        d, dst, xo, xost, s_gb = x, (0, 0), h, (0, 0), 0
    t = tiling
    rows = min(t.rows, triton.next_power_of_2(B * N))
    block = triton.next_power_of_2(C)
    tail = 0
    if t.split and block != C:  # a power-of-two block and a power-of-two tail instead of one padded block
        block //= 2
        tail = triton.next_power_of_2(C - block)
    _ln_modulate_kernel[(triton.cdiv(B * N, rows),)](
        x, d, gate if gate is not None else sc, sh, sc, xo, h,
        B * N, N, C, float(eps),
        x.stride(0), x.stride(1), *dst, s_gb, s_shb, s_scb, *xost, h.stride(0), h.stride(1),
        RESID=resid, HAS_GATE=gate is not None, ROWS=rows, BLOCK_C=block, TAIL=tail,
        INTERP=_interpreting(), num_warps=t.num_warps, **codes, **pdl_options(),
    )  # fmt: skip
    return x_new, h


def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, tiling: LNTiling = DEFAULT_LN) -> Tensor:
    """LayerNorm (no affine, fp32 statistics) of x (B, N, C) over C, then ln (1 + scale) + shift; see naive.py.

    shift / scale (B, 1, C) or (B, C) (B may be 1), any float dtype. x: any batch / token strides, unit channel
    stride. Output contiguous (B, N, C) in x's dtype.
    """
    return _ln_launch(x, None, None, shift, scale, eps, tiling)[1]


def residual_ln_modulate(
    x: Tensor,
    delta: Tensor,
    gate: Tensor | None,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    *,
    tiling: LNTiling = DEFAULT_LN,
) -> tuple[Tensor, Tensor]:
    """(x_new, h): x_new = x + gate * delta in x's dtype (gate (B, 1, C) / (B, C) or None), h = ln_modulate(x_new).

    delta (B, N, C) any dtype and row strides; both outputs new contiguous tensors in x's dtype.
    """
    x_new, h = _ln_launch(x, delta, gate, shift, scale, eps, tiling)
    assert x_new is not None
    return x_new, h
