"""Triton kernels of the frame-level bidirectional GDN (launched from `kernels.gdn.triton_gdn`).

Four kernels, launched in this order for one chunk (kernels/gdn/README.md has the maths and the tiling):

    _rstd_kernel     1/RMS over all C channels of each q and k token (only when the prologue is fused)
    _phase_a_kernel  per (batch, head, frame[, token split]): P = K_r^T B K_r, A = K_r^T B V, P_z = K^T B K,
                     b_z = K^T beta (D x D, fp32), the features built on load when the prologue is fused
    _phase_b_kernel  per (batch, head, block of value columns | z): the serial scan over frames of the
                     transposed state, M^T <- g (M^T - P M^T) + A and z <- g (z - P_z z) + b_z, backward
                     (zero-seeded, frame t ingests frame t+1) then forward (from the carried state)
    _phase_c_kernel  per (batch, head, frame, token range): num = Q_r H, den = Q z with H, z the summed
                     directions' states, out = num / (den + eps) [* SiLU(gate)]

`_prologue_kernel` runs the fused prologue on its own (tests, and callers that want the features).

Conventions: every per-token tensor is addressed as (B, H, T, S, D) through four strides and a unit last
stride (the token layout (B, N, C) is such a view); int64 goes into per-program base pointers and tiles use
int32 offsets; D, the RoPE axis splits and the grid width are compile-time constants so that the masks and
table loads vectorise. Non-goals: training, fp16, head dims over 128 (one (BD, BD) state tile per program).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.pdl import wait_previous


@triton.jit
def _rope(x, c, s, BS: tl.constexpr, BD: tl.constexpr):
    """Rotate adjacent channel pairs of x (BS, BD) by c, s (BS, BD // 2): (x0 + i x1) (c + i s)."""
    x0, x1 = tl.split(tl.reshape(x, (BS, BD // 2, 2)))
    r0 = x0 * c - x1 * s
    r1 = x0 * s + x1 * c
    return tl.reshape(tl.join(r0, r1), (BS, BD))


@triton.jit
def _op(x, BF16: tl.constexpr, EMU: tl.constexpr):
    """An fp32 tile as a dot operand: bf16 when BF16 (EMU: rounded to bf16 but held in fp32, for the
    interpreter, whose bf16 dot is wrong), else fp32 as is."""
    if BF16:
        if EMU:
            y = x.to(tl.bfloat16).to(tl.float32)
        else:
            y = x.to(tl.bfloat16)
    else:
        y = x
    return y


@triton.jit
def _features(
    x_base,
    xr_base,
    rows,
    rows_r,
    offs_s,
    mask_s,
    offs_d,
    offs_d0,
    D: tl.constexpr,
    rstd_base,
    w_base,
    cos_ptr,
    sin_ptr,
    t,
    T,
    S,
    GRID_W: tl.constexpr,
    GRID_H: tl.constexpr,
    PT: tl.constexpr,
    PTH: tl.constexpr,
    scale,
    PROLOGUE: tl.constexpr,
    ROPE: tl.constexpr,
    WANT_PLAIN: tl.constexpr,
    WANT_ROT: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
):
    """A (BS, BD) fp32 tile of q or k features of frame t and of their rotation, padded with zeros.

    Tokens offs_s of the frame sit at x_base + rows (int32 offsets from the program's base pointer); the tile's
    channels are offs_d = offs_d0 + arange(BD) (offs_d0 even, so that RoPE pairs stay whole).
    PROLOGUE: x holds the raw projection; features = ReLU(raw * rstd[token] * w) * scale and the rotation is
    RoPE of those (ROPE = 1: cos/sin (N, D/2) rows t*S + s; = 2: per-axis tables, `Rope3DTables`; 0: none).
    Otherwise x / xr hold both ready-made.
    """
    mask2 = mask_s[:, None] & (offs_d[None, :] < D)
    plain = tl.zeros((BS, BD), tl.float32)
    rot = tl.zeros((BS, BD), tl.float32)
    if PROLOGUE:
        raw = tl.load(x_base + (rows[:, None] + offs_d[None, :]), mask=mask2, other=0.0).to(tl.float32)
        r = tl.load(rstd_base + offs_s, mask=mask_s, other=0.0)
        w = tl.load(w_base + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        plain = tl.maximum(raw * r[:, None] * w[None, :], 0.0) * scale
        if ROPE == 0:
            rot = plain
        else:
            HALF: tl.constexpr = D // 2
            offs_h = offs_d0 // 2 + tl.arange(0, BD // 2)  # the tile's channel pairs
            if ROPE == 1:
                cs_off = (t * S + offs_s)[:, None] * HALF + offs_h[None, :]
                cmask = mask_s[:, None] & (offs_h[None, :] < HALF)
                c = tl.load(cos_ptr + cs_off, mask=cmask, other=0.0)
                sn = tl.load(sin_ptr + cs_off, mask=cmask, other=0.0)
            else:  # three affine loads, one per axis, each masked to its own pairs
                i = offs_h[None, :]
                off_t = t * HALF + i + tl.zeros((BS, BD // 2), tl.int32)
                off_h = (T + offs_s // GRID_W)[:, None] * HALF + i
                off_w = (T + GRID_H + offs_s % GRID_W)[:, None] * HALF + i
                m_t = mask_s[:, None] & (i < PT)
                m_h = mask_s[:, None] & (i >= PT) & (i < PTH)
                m_w = mask_s[:, None] & (i >= PTH) & (i < HALF)
                c = tl.load(cos_ptr + off_t, mask=m_t, other=0.0)
                c += tl.load(cos_ptr + off_h, mask=m_h, other=0.0)
                c += tl.load(cos_ptr + off_w, mask=m_w, other=0.0)
                sn = tl.load(sin_ptr + off_t, mask=m_t, other=0.0)
                sn += tl.load(sin_ptr + off_h, mask=m_h, other=0.0)
                sn += tl.load(sin_ptr + off_w, mask=m_w, other=0.0)
            rot = _rope(plain, c, sn, BS, BD)
    else:
        if WANT_PLAIN:
            plain = tl.load(x_base + (rows[:, None] + offs_d[None, :]), mask=mask2, other=0.0).to(tl.float32)
        if WANT_ROT:
            rot = tl.load(xr_base + (rows_r[:, None] + offs_d[None, :]), mask=mask2, other=0.0).to(tl.float32)
    return plain, rot


@triton.jit
def _rstd_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    R,
    N,
    C,
    sxb,
    sxn,
    syb,
    syn,
    eps,
    BT: tl.constexpr,
    BC: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """rsqrt(mean_c x^2 + eps) for BT rows of x (program_id 1 = 0) or y (= 1); out (2, R) fp32, R = B * N.

    BC >= C: each program issues all its loads at once (C = 2240 fits one 4096-wide masked tile).
    """
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    which = tl.program_id(1)
    mask_r = rows < R
    b = rows // N
    n = rows % N
    if which == 0:
        base = x_ptr + b.to(tl.int64) * sxb + n.to(tl.int64) * sxn
    else:
        base = y_ptr + b.to(tl.int64) * syb + n.to(tl.int64) * syn
    offs_c = tl.arange(0, BC)
    x = tl.load(base[:, None] + offs_c[None, :], mask=mask_r[:, None] & (offs_c[None, :] < C), other=0.0)
    x = x.to(tl.float32)
    ms = tl.sum(x * x, axis=1) / C
    tl.store(out_ptr + which * R + rows, 1.0 / tl.sqrt(ms + eps), mask=mask_r)


@triton.jit
def _prologue_kernel(
    x_ptr,
    rstd_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    yr_ptr,
    H,
    T,
    S,
    D: tl.constexpr,
    sxb,
    sxn,
    GRID_W: tl.constexpr,
    GRID_H: tl.constexpr,
    PT: tl.constexpr,
    PTH: tl.constexpr,
    csb,
    scale,
    ROPE: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Stand-alone prologue: y, y_rot (B, N, C) contiguous from raw x (B, N, C); grid (cdiv(S, BS), B*H*T)."""
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    offs_s = tl.program_id(0) * BS + tl.arange(0, BS)
    bht = tl.program_id(1)
    t = bht % T
    h = (bht // T) % H
    b = bht // (T * H)
    mask_s = offs_s < S
    offs_d = tl.arange(0, BD)
    x_base = x_ptr + (b.to(tl.int64) * sxb + (t * S).to(tl.int64) * sxn + h * D)
    plain, rot = _features(
        x_base, x_base, offs_s * sxn, offs_s * sxn, offs_s, mask_s, offs_d, 0, D,
        rstd_ptr + (b.to(tl.int64) * T * S + t * S), w_ptr + h * D, cos_ptr + b * csb, sin_ptr + b * csb,
        t, T, S, GRID_W, GRID_H, PT, PTH, scale, True, ROPE, True, True, BS, BD,
    )  # fmt: skip
    out = (b.to(tl.int64) * T * S + t * S) * (H * D) + h * D
    o_off = (offs_s * (H * D))[:, None] + offs_d[None, :]
    mask2 = mask_s[:, None] & (offs_d[None, :] < D)
    tl.store(y_ptr + out + o_off, plain.to(y_ptr.dtype.element_ty), mask=mask2)
    tl.store(yr_ptr + out + o_off, rot.to(yr_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _beta_tile(beta_base, sbs, s0, s_end, BS: tl.constexpr):
    """Tokens s0 + arange(BS) of a frame, their mask (< s_end) and their beta in fp32 (0 outside)."""
    offs_s = s0 + tl.arange(0, BS)
    mask_s = offs_s < s_end
    return offs_s, mask_s, tl.load(beta_base + offs_s * sbs, mask=mask_s, other=0.0).to(tl.float32)


@triton.jit
def _sym_block(
    k_base, kr_base, beta_base, sks, srs, sbs, s_begin, s_end, offs_i, offs_j, bi, bj, D: tl.constexpr, rstd_base,
    w_base, cos_ptr, sin_ptr, t, T, S, GRID_W: tl.constexpr, GRID_H: tl.constexpr, PT: tl.constexpr,
    PTH: tl.constexpr, scale, PROLOGUE: tl.constexpr, ROPE: tl.constexpr, BF16: tl.constexpr, EMU: tl.constexpr,
    PREC: tl.constexpr, BS: tl.constexpr, BO: tl.constexpr, DO_P: tl.constexpr, DO_Z: tl.constexpr,
    ONE: tl.constexpr,
):  # fmt: skip
    """Block (bi, bj) of P = K_r^T diag(beta) K_r (DO_P) and of P_z = K^T diag(beta) K with b_z = K^T beta over
    block column bi (DO_Z), over tokens [s_begin, s_end): each token tile's features are built once per block
    column (once when bi == bj; ONE: the matrix is one block, bi = bj = 0)."""
    acc = tl.zeros((BO, BO), tl.float32)
    acc_z = tl.zeros((BO, BO), tl.float32)
    bz = tl.zeros((BO,), tl.float32)
    for s0 in range(s_begin, s_end, BS):
        offs_s, mask_s, beta = _beta_tile(beta_base, sbs, s0, s_end, BS)
        k_i, kr_i = _features(
            k_base, kr_base, offs_s * sks, offs_s * srs, offs_s, mask_s, offs_i, bi * BO, D, rstd_base, w_base,
            cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE if DO_P else 0, DO_Z, DO_P,
            BS, BO,
        )  # fmt: skip
        # Separate branches: `ONE or bi == bj` would compile the runtime test, and with it the else branch.
        if ONE:  # noqa: SIM114 - bi == bj == 0 at compile time
            k_j, kr_j = k_i, kr_i
        elif bi == bj:
            k_j, kr_j = k_i, kr_i
        else:
            k_j, kr_j = _features(
                k_base, kr_base, offs_s * sks, offs_s * srs, offs_s, mask_s, offs_j, bj * BO, D, rstd_base, w_base,
                cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE if DO_P else 0, DO_Z,
                DO_P, BS, BO,
            )  # fmt: skip
        if DO_P:
            kb = _op(tl.trans(kr_i * beta[:, None]), BF16, EMU)
            acc = tl.dot(kb, _op(kr_j, BF16, EMU), acc, input_precision=PREC)
        if DO_Z:
            kbf = k_i * beta[:, None]
            bz += tl.sum(kbf, axis=0)
            acc_z = tl.dot(_op(tl.trans(kbf), BF16, EMU), _op(k_j, BF16, EMU), acc_z, input_precision=PREC)
    return acc, acc_z, bz


@triton.jit
def _phase_a_kernel(
    k_ptr,
    kr_ptr,
    v_ptr,
    beta_ptr,
    rstd_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    pa_ptr,
    bz_ptr,
    skb,
    skh,
    skt,
    sks,
    srb,
    srh,
    srt,
    srs,
    svb,
    svh,
    svt,
    svs,
    sbb,
    sbh,
    sbt,
    sbs,
    H,
    T,
    S,
    D: tl.constexpr,
    N_SPLIT,
    S_PER_SPLIT,
    GRID_W: tl.constexpr,
    GRID_H: tl.constexpr,
    PT: tl.constexpr,
    PTH: tl.constexpr,
    csb,
    scale,
    PROLOGUE: tl.constexpr,
    ROPE: tl.constexpr,
    MERGE: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    BO: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Per-frame matrices. grid (jobs, B*H*T*N_SPLIT). Each D x D matrix is held as NB x NB blocks of BO x BO
    (NB = BD // BO, 1 or 2) and a job accumulates one block: P and P_z are symmetric, so only the blocks on and
    above the diagonal are computed (each off-diagonal one stored twice, transposed), A needs all of them.
    Jobs in program_id 0 order: MERGE: NSYM blocks of P and P_z together (one read of k), then NB^2 blocks of A;
    else NSYM of P, NB^2 of A, NSYM of P_z (NSYM = NB (NB + 1) / 2). With NB = 1: 0 = P (and P_z), 1 = A, 2 = P_z.
    Smaller blocks mean more programs with smaller accumulators (more of them resident per SM); the features
    of a block column are then built by every job that reads it.

    P = K_r^T diag(beta) K_r, A = K_r^T diag(beta) V, P_z = K^T diag(beta) K, b_z = K^T beta over this split's
    tokens: pa (B*H*T, N_SPLIT, 3, D, D) fp32 [P, A, P_z] and bz (B*H*T, N_SPLIT, D) fp32.
    """
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    tl.static_assert(BD // BO <= 2)
    NB: tl.constexpr = BD // BO
    NSYM: tl.constexpr = NB * (NB + 1) // 2
    job = tl.program_id(0)
    if NB == 1:  # one block, (0, 0) at compile time: no code for the mirrored blocks
        which = job
        bi = 0
        bj = 0
    else:
        which = (job >= NSYM).to(tl.int32) + (job >= NSYM + NB * NB).to(tl.int32)  # 0 = P (+ P_z), 1 = A, 2 = P_z
        p = job - (which >= 1).to(tl.int32) * NSYM - (which == 2).to(tl.int32) * (NB * NB)
        # The block (i, j): A's p-th in row-major order; P's p-th of (0, 0), (0, 1), (1, 1).
        bi = tl.where(which == 1, p // NB, p // 2)
        bj = tl.where(which == 1, p % NB, (p + 1) // 2)
    pid = tl.program_id(1)
    split = pid % N_SPLIT
    bht = pid // N_SPLIT
    t = bht % T
    bh = bht // T
    h = bh % H
    b = bh // H
    offs_i = bi * BO + tl.arange(0, BO)
    offs_j = bj * BO + tl.arange(0, BO)
    k_base = k_ptr + (b.to(tl.int64) * skb + h * skh + t.to(tl.int64) * skt)
    kr_base = kr_ptr + (b.to(tl.int64) * srb + h * srh + t.to(tl.int64) * srt)
    v_base = v_ptr + (b.to(tl.int64) * svb + h * svh + t.to(tl.int64) * svt)
    beta_base = beta_ptr + (b.to(tl.int64) * sbb + h * sbh + t.to(tl.int64) * sbt)
    rstd_base = rstd_ptr + (b.to(tl.int64) * T * S + t * S)
    w_base = w_ptr + h * D
    cos_ptr += b * csb
    sin_ptr += b * csb
    s_begin = split * S_PER_SPLIT
    s_end = tl.minimum(S, s_begin + S_PER_SPLIT)
    acc = tl.zeros((BO, BO), tl.float32)
    acc_z = tl.zeros((BO, BO), tl.float32)
    bz = tl.zeros((BO,), tl.float32)
    if which == 1:  # A = K_r^T diag(beta) V
        for s0 in range(s_begin, s_end, BS):
            offs_s, mask_s, beta = _beta_tile(beta_base, sbs, s0, s_end, BS)
            _, kr = _features(
                k_base, kr_base, offs_s * sks, offs_s * srs, offs_s, mask_s, offs_i, bi * BO, D, rstd_base, w_base,
                cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE, False, True,
                BS, BO,
            )  # fmt: skip
            vmask = mask_s[:, None] & (offs_j[None, :] < D)
            v = tl.load(v_base + ((offs_s * svs)[:, None] + offs_j[None, :]), mask=vmask, other=0.0)
            kb = _op(tl.trans(kr * beta[:, None]), BF16, EMU)
            acc = tl.dot(kb, _op(v.to(tl.float32), BF16, EMU), acc, input_precision=PREC)
    else:
        if MERGE:  # P and P_z, b_z from one read of k
            acc, acc_z, bz = _sym_block(
                k_base, kr_base, beta_base, sks, srs, sbs, s_begin, s_end, offs_i, offs_j, bi, bj, D, rstd_base,
                w_base, cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE, BF16, EMU, PREC,
                BS, BO, True, True, NB == 1,
            )  # fmt: skip
        elif which == 0:
            acc, acc_z, bz = _sym_block(
                k_base, kr_base, beta_base, sks, srs, sbs, s_begin, s_end, offs_i, offs_j, bi, bj, D, rstd_base,
                w_base, cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE, BF16, EMU, PREC,
                BS, BO, True, False, NB == 1,
            )  # fmt: skip
        else:
            acc, acc_z, bz = _sym_block(
                k_base, kr_base, beta_base, sks, srs, sbs, s_begin, s_end, offs_i, offs_j, bi, bj, D, rstd_base,
                w_base, cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, scale, PROLOGUE, ROPE, BF16, EMU, PREC,
                BS, BO, False, True, NB == 1,
            )  # fmt: skip
    z_job = which == 2
    if MERGE:
        z_job = which == 0
    out = pa_ptr + (bht * N_SPLIT + split).to(tl.int64) * 3 * D * D
    mask_ij = (offs_i[:, None] < D) & (offs_j[None, :] < D)
    dd = offs_i[:, None] * D + offs_j[None, :]
    dd_t = offs_j[None, :] * D + offs_i[:, None]  # the mirrored block of a symmetric matrix
    if which == 1:
        tl.store(out + D * D + dd, acc, mask=mask_ij)
    else:
        if which == 0:
            tl.store(out + dd, acc, mask=mask_ij)
            if bi != bj:
                tl.store(out + dd_t, acc, mask=mask_ij)
        if z_job:
            tl.store(out + 2 * D * D + dd, acc_z, mask=mask_ij)
            if bi != bj:
                tl.store(out + 2 * D * D + dd_t, acc_z, mask=mask_ij)
            else:
                tl.store(bz_ptr + (bht * N_SPLIT + split).to(tl.int64) * D + offs_i, bz, mask=offs_i < D)


@triton.jit
def _frame_mats(pa_ptr, bz_ptr, blk, offs_k, offs_v, D: tl.constexpr, N_SPLIT, Z: tl.constexpr, BD: tl.constexpr):
    """Frame matrices summed over phase A's token splits starting at block blk: Z = 0: (P (BD, BD),
    A[:, offs_v] (BD, BV)); Z = 1: (P_z (BD, BD), b_z (BD,))."""
    DD: tl.constexpr = D * D
    mask_k = offs_k < D
    kk = offs_k[:, None] * D + offs_k[None, :]
    p = tl.zeros((BD, BD), tl.float32)
    if Z:
        other = tl.zeros((BD,), tl.float32)
    else:
        other = tl.zeros((BD, offs_v.shape[0]), tl.float32)
    for sp in range(N_SPLIT):
        base = pa_ptr + (blk + sp) * 3 * DD
        if Z:
            p += tl.load(base + 2 * DD + kk, mask=mask_k[:, None] & mask_k[None, :], other=0.0)
            other += tl.load(bz_ptr + (blk + sp) * D + offs_k, mask=mask_k, other=0.0)
        else:
            p += tl.load(base + kk, mask=mask_k[:, None] & mask_k[None, :], other=0.0)
            kv = offs_k[:, None] * D + offs_v[None, :]
            other += tl.load(base + DD + kv, mask=mask_k[:, None] & (offs_v[None, :] < D), other=0.0)
    return p, other


@triton.jit
def _phase_b_kernel(
    pa_ptr,
    bz_ptr,
    decay_ptr,
    sdb,
    sdh,
    sdt,
    skv_ptr,
    sz_ptr,
    scr_ptr,
    scrz_ptr,
    hs_ptr,
    zs_ptr,
    fkv_ptr,
    fz_ptr,
    H,
    T,
    D: tl.constexpr,
    N_SPLIT,
    NV,
    HAS_STATE: tl.constexpr,
    NDIR: tl.constexpr,
    PREC: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Serial scan over frames. grid (NV + 1, B*H); program_id 0 < NV: BV value columns of M^T, = NV: z.

    M^T <- g (M^T - P M^T) + A and z <- g (z - P_z z) + b_z per frame, the state held in registers in fp32
    (3xTF32 products). Per program: the
    backward scan (NDIR = 2; zero-seeded, output frame t ingests frame t + 1), its states parked in the fp32
    scratch scr (B*H, T, D, D) / scrz (B*H, T, D), then the forward scan from skv (B*H, D, D) [value, key] /
    sz (B*H, D) (HAS_STATE) or zeros. Writes, per frame, hs (B*H*T, D, D) = M_f^T + M_b^T [key, value] in
    hs's dtype (the read-out's dot operand) and zs (B*H*T, D) = z_f + z_b (fp32), and the final forward state
    to fkv [value, key] / fz.
    """
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BD)
    mask_k = offs_k < D
    dec_base = decay_ptr + b.to(tl.int64) * sdb + h * sdh
    DD: tl.constexpr = D * D
    frames = bh.to(tl.int64) * T  # the first of this (batch, head)'s frames
    if j < NV:
        offs_v = j * BV + tl.arange(0, BV)
        mask_kv = mask_k[:, None] & (offs_v[None, :] < D)
        kv = offs_k[:, None] * D + offs_v[None, :]  # [key, value] in a (D, D) block
        bwd = scr_ptr + frames * DD
        if NDIR == 2:
            m = tl.zeros((BD, BV), tl.float32)
            tl.store(bwd + (T - 1) * DD + kv, m, mask=mask_kv)
            for r in range(T - 1):
                f = T - 1 - r  # the frame ingested, for output frame f - 1
                g = tl.load(dec_base + f * sdt).to(tl.float32)
                p, a = _frame_mats(pa_ptr, bz_ptr, (frames + f) * N_SPLIT, offs_k, offs_v, D, N_SPLIT, 0, BD)
                m = g * (m - tl.dot(p, m, input_precision=PREC)) + a
                tl.store(bwd + (f - 1) * DD + kv, m, mask=mask_kv)
            tl.debug_barrier()  # the forward loop reads these through other threads
        m = tl.zeros((BD, BV), tl.float32)
        if HAS_STATE:  # M^T[k, v] = M[v, k]
            m = tl.load(skv_ptr + bh.to(tl.int64) * DD + offs_v[None, :] * D + offs_k[:, None], mask=mask_kv)
        for t in range(T):
            g = tl.load(dec_base + t * sdt).to(tl.float32)
            p, a = _frame_mats(pa_ptr, bz_ptr, (frames + t) * N_SPLIT, offs_k, offs_v, D, N_SPLIT, 0, BD)
            m = g * (m - tl.dot(p, m, input_precision=PREC)) + a
            hsum = m
            if NDIR == 2:
                hsum += tl.load(bwd + t * DD + kv, mask=mask_kv, other=0.0)
            tl.store(hs_ptr + (frames + t) * DD + kv, hsum.to(hs_ptr.dtype.element_ty), mask=mask_kv)
        tl.store(fkv_ptr + bh.to(tl.int64) * DD + offs_v[None, :] * D + offs_k[:, None], m, mask=mask_kv)
    else:
        bwd = scrz_ptr + frames * D
        if NDIR == 2:
            z = tl.zeros((BD,), tl.float32)
            tl.store(bwd + (T - 1) * D + offs_k, z, mask=mask_k)
            for r in range(T - 1):
                f = T - 1 - r
                g = tl.load(dec_base + f * sdt).to(tl.float32)
                p, c = _frame_mats(pa_ptr, bz_ptr, (frames + f) * N_SPLIT, offs_k, offs_k, D, N_SPLIT, 1, BD)
                z = g * (z - tl.sum(p * z[None, :], axis=1)) + c
                tl.store(bwd + (f - 1) * D + offs_k, z, mask=mask_k)
            tl.debug_barrier()
        z = tl.zeros((BD,), tl.float32)
        if HAS_STATE:
            z = tl.load(sz_ptr + bh.to(tl.int64) * D + offs_k, mask=mask_k, other=0.0)
        for t in range(T):
            g = tl.load(dec_base + t * sdt).to(tl.float32)
            p, c = _frame_mats(pa_ptr, bz_ptr, (frames + t) * N_SPLIT, offs_k, offs_k, D, N_SPLIT, 1, BD)
            z = g * (z - tl.sum(p * z[None, :], axis=1)) + c
            zsum = z
            if NDIR == 2:
                zsum += tl.load(bwd + t * D + offs_k, mask=mask_k, other=0.0)
            tl.store(zs_ptr + (frames + t) * D + offs_k, zsum, mask=mask_k)
        tl.store(fz_ptr + bh.to(tl.int64) * D + offs_k, z, mask=mask_k)


@triton.jit
def _phase_c_kernel(
    q_ptr,
    qr_ptr,
    rstd_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    hs_ptr,
    zs_ptr,
    gate_ptr,
    out_ptr,
    den_ptr,
    sqb,
    sqh,
    sqt,
    sqs,
    srb,
    srh,
    srt,
    srs,
    sgb,
    sgh,
    sgt,
    sgs,
    sob,
    soh,
    sot,
    sos,
    H,
    T,
    S,
    D: tl.constexpr,
    S_PER_PROG,
    GRID_W: tl.constexpr,
    GRID_H: tl.constexpr,
    PT: tl.constexpr,
    PTH: tl.constexpr,
    csb,
    eps,
    PROLOGUE: tl.constexpr,
    ROPE: tl.constexpr,
    GATE: tl.constexpr,
    NUM_DEN: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Read-out. grid (cdiv(S, S_PER_PROG), B*H*T): num = Q_r H, den = Q z with phase B's summed states
    hs (B*H*T, D, D) [key, value] in the dot operand dtype and zs (B*H*T, D) fp32.

    NUM_DEN: store num to out (B, H, T, S, D strides) and den to den (B*H*T, S) fp32 (gdn_scan); else store
    num / (den + eps), times SiLU(gate) when GATE, in out's dtype.
    """
    wait_previous(GDC)  # PDL: nothing before this touches global memory (kernels/pdl.py)
    bht = tl.program_id(1)
    t = bht % T
    bh = bht // T
    h = bh % H
    b = bh // H
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < D
    dd = offs_d[:, None] * D + offs_d[None, :]
    mt = tl.load(hs_ptr + bht.to(tl.int64) * D * D + dd, mask=mask_d[:, None] & mask_d[None, :], other=0.0)
    z = tl.load(zs_ptr + bht.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
    if EMU:
        mt = mt.to(tl.float32)
    q_base = q_ptr + (b.to(tl.int64) * sqb + h * sqh + t.to(tl.int64) * sqt)
    qr_base = qr_ptr + (b.to(tl.int64) * srb + h * srh + t.to(tl.int64) * srt)
    g_base = gate_ptr + (b.to(tl.int64) * sgb + h * sgh + t.to(tl.int64) * sgt)
    o_base = out_ptr + (b.to(tl.int64) * sob + h * soh + t.to(tl.int64) * sot)
    rstd_base = rstd_ptr + (b.to(tl.int64) * T * S + t * S)
    cos_ptr += b * csb
    sin_ptr += b * csb
    s_begin = tl.program_id(0) * S_PER_PROG
    s_end = tl.minimum(S, s_begin + S_PER_PROG)
    for s0 in range(s_begin, s_end, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask_s = offs_s < s_end
        mask2 = mask_s[:, None] & mask_d[None, :]
        q, qr = _features(
            q_base, qr_base, offs_s * sqs, offs_s * srs, offs_s, mask_s, offs_d, 0, D, rstd_base, w_ptr + h * D,
            cos_ptr, sin_ptr, t, T, S, GRID_W, GRID_H, PT, PTH, 1.0, PROLOGUE, ROPE, True, True, BS, BD,
        )  # fmt: skip
        den = tl.sum(q * z[None, :], axis=1)
        num = tl.dot(_op(qr, BF16, EMU), mt, input_precision=PREC)
        o_off = (offs_s * sos)[:, None] + offs_d[None, :]
        if NUM_DEN:
            tl.store(o_base + o_off, num.to(out_ptr.dtype.element_ty), mask=mask2)
            tl.store(den_ptr + bht.to(tl.int64) * S + offs_s, den, mask=mask_s)
        else:
            o = num / (den[:, None] + eps)
            if GATE:
                gt = tl.load(g_base + ((offs_s * sgs)[:, None] + offs_d[None, :]), mask=mask2, other=0.0)
                gt = gt.to(tl.float32)
                o = o * (gt * tl.sigmoid(gt))
            tl.store(o_base + o_off, o.to(out_ptr.dtype.element_ty), mask=mask2)
