"""Frame-level bidirectional GDN of SANA-Streaming in Triton: the scan, with its prologue and merge fused.

Computes what `kernels.gdn.naive` computes (see its docstring and `kernels/gdn/README.md` for the maths) in
three launches, because a frame's S tokens all update the state at once from the pre-frame state:

    A  per (batch, head, frame): P = K_r^T B K_r, A = K_r^T B V, P_z = K^T B K, b_z = K^T beta  (D x D, fp32)
    B  per (batch, head, block of value columns | z): the serial scan over frames of the transposed state,
       M^T <- g (I - P) M^T + A  and  z <- g (I - P_z) z + b_z, forward from the carried state and backward
       (zero-seeded, frame t reads frame t+1's matrices), writing each frame's state (fp32)
    C  per (batch, head, frame, token range): num = Q_r (M_f + M_b)^T, den = Q (z_f + z_b),
       out = num / (den + eps)

The kernels live in `triton_kernels.py`, the RoPE table handling in `rope_tables.py`. A fourth small launch
computes the RMSNorm statistic 1/RMS over all C channels of q and k when the prologue is fused. Fused variant
(`fused_gdn_layer`): phases A and C read the raw projections x W_q, x W_k in the token layout (B, N, C) and
apply RMSNorm -> ReLU -> key scale -> RoPE on load; phase C multiplies by SiLU(gate) and stores the activation
dtype. State is fp32 throughout; matrix products take bf16 operands (fp32 accumulate)
when the inputs are bf16, and 3xTF32 (about fp32 accuracy) when they are fp32. The state recurrence (phase B)
always runs in 3xTF32 on fp32 operands, since its error is carried from chunk to chunk.

Public functions (`gdn_scan`, `bidirectional_gdn`, `fused_gdn_layer`, `qk_prologue`, `rms_rstd`) have the
signatures of their references in `naive.py` / `naive_fused.py`. Kernel -> launcher (`_run`, `_scan_state`)
-> public function. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests).

Measured against the naive path and the memory floor in kernels/gdn/README.md (H100: 145 us per layer at
B=1, T=3 against 2077 us naive and a 20 us floor).

Non-goals: training (no backward pass), the gates beta and decay (computed by the engine), token-sequential
(fla-style) GDN, fp16, per-frame token counts beyond an int32 offset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor

from kernels.gdn.rope_tables import Rope3DTables, RopeArgs, aligned_batches, rope_args, rope_tables_cached
from kernels.gdn.triton_kernels import (
    _phase_a_kernel,
    _phase_b_kernel,
    _phase_c_kernel,
    _prologue_kernel,
    _rstd_kernel,
)
from kernels.pdl import pdl_options

__all__ = [
    "DEFAULT_TILING",
    "GDNTiling",
    "Rope3DTables",
    "aligned_batches",
    "bidirectional_gdn",
    "fused_gdn_layer",
    "gdn_scan",
    "qk_prologue",
    "rms_rstd",
    "rope_tables_cached",
]


@dataclass(frozen=True)
class GDNTiling:
    """Launch parameters of the three phases (chosen by measurement on H100: the kernel-alone sweeps of
    kernels/gdn/README.md, then block_a 32 and stages_c 2 from the sweep inside the whole 2B forward,
    loadtest/tile_sweep.py, which the kernel-alone timing had not preferred).

    Attributes:
        block_a, block_c: tokens per tile in phases A and C (powers of two >= 16).
        split_a: token ranges per frame in phase A, each writing partial sums that phase B adds up.
        merge_a: phase A computes P and P_z in one program (one read of k, two accumulators).
        split_d_a: phase A gives each (D/2)^2 block of a frame's matrices its own program (3 of P and P_z, which
            are symmetric, 4 of A: 7 programs per frame and head instead of 2, with quarter-size accumulators);
            only where the padded D is at least 32 (tensor-core blocks of 16).
        tokens_c: tokens per program in phase C (it loads its frame's state once for all of them).
        block_v: value columns of M per program in phase B (a power of two >= 16).
        warps_b: num_warps of phase B.
        warps_a, warps_c, stages_a, stages_c: num_warps / num_stages of phases A and C.
    """

    block_a: int = 32
    block_c: int = 128
    split_a: int = 1
    merge_a: bool = True
    split_d_a: bool = False
    tokens_c: int = 512
    block_v: int = 32
    warps_b: int = 8
    warps_a: int = 8
    warps_c: int = 16
    stages_a: int = 1
    stages_c: int = 2

    def __post_init__(self) -> None:
        for name in ("block_a", "block_c", "block_v"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.split_a < 1 or self.tokens_c < self.block_c:
            raise ValueError(f"split_a >= 1 and tokens_c >= block_c expected, got {self.split_a}, {self.tokens_c}")

    def for_fp32(self) -> GDNTiling:
        """fp32 operands take 3xTF32 dots: smaller token tiles keep phases A and C in shared memory."""
        return replace(
            self, block_a=min(self.block_a, 32), block_c=min(self.block_c, 32), merge_a=False,
            warps_c=min(self.warps_c, 8),
        )  # fmt: skip

    def for_rope3d(self) -> GDNTiling:
        """Per-axis RoPE tables stage three masked loads per table: phase C keeps to 64-token tiles."""
        return replace(self, block_c=min(self.block_c, 64))


DEFAULT_TILING = GDNTiling()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate goes through here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError("triton GDN kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(bf16 operands?, the dots' input_precision) for inputs of this dtype."""
    if dtype == torch.bfloat16:  # "tf32" is the attribute every bf16 dot carries; the interpreter's are fp32
        return True, "ieee" if _interpreting() else "tf32"
    if dtype == torch.float32:
        return False, "tf32x3"
    raise ValueError(f"GDN kernels take bf16 or fp32 inputs, got {dtype}")


def _inner(t: Tensor) -> Tensor:
    """t with unit stride on its last dim (a copy only when it has none)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _scan_state(
    pa: Tensor,
    bz: Tensor,
    decay: Tensor,
    state_kv: Tensor | None,
    state_z: Tensor | None,
    shape: tuple[int, int, int, int],
    split: int,
    ndir: int,
    op_dtype: torch.dtype,
    tiling: GDNTiling,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase B launcher: hs (B*H*T, D, D) op_dtype, zs (B*H*T, D) fp32, final M (B,H,D,D), z (B,H,D,1)."""
    B, H, T, D = shape
    dev = pa.device
    scr = _empty((B * H, T, D, D), torch.float32, dev)
    scrz = _empty((B * H, T, D), torch.float32, dev)
    hs = _empty((B * H * T, D, D), op_dtype, dev)
    zs = _empty((B * H * T, D), torch.float32, dev)
    fkv = _empty((B, H, D, D), torch.float32, dev)
    fz = _empty((B, H, D, 1), torch.float32, dev)
    has_state = state_kv is not None
    if has_state != (state_z is not None):
        raise ValueError("state_kv and state_z come together (both None or both given)")
    if has_state:
        if tuple(state_kv.shape) != (B, H, D, D) or tuple(state_z.shape) != (B, H, D, 1):
            raise ValueError(
                f"state_kv (B,H,D,D)=({B},{H},{D},{D}) and state_z (B,H,D,1) expected, "
                f"got {tuple(state_kv.shape)} and {tuple(state_z.shape)}"
            )
        skv = state_kv.to(torch.float32).contiguous()
        sz = state_z.to(torch.float32).contiguous()
    else:
        skv, sz = fkv, fz  # never read
    bv = tiling.block_v
    nv = triton.cdiv(D, bv)
    _phase_b_kernel[(nv + 1, B * H)](
        pa, bz, decay, *decay.stride(), skv, sz, scr, scrz, hs, zs, fkv, fz, H, T, D, split, nv,
        HAS_STATE=has_state, NDIR=ndir, PREC="tf32x3", BD=_block_d(D), BV=bv, num_warps=tiling.warps_b,
        **pdl_options(),
    )  # fmt: skip
    return hs, zs, fkv, fz


def _run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rot: Tensor,
    k_rot: Tensor,
    beta: Tensor,
    decay: Tensor,
    state_kv: Tensor | None,
    state_z: Tensor | None,
    out: Tensor,
    den: Tensor | None,
    eps: float,
    ndir: int,
    prologue: dict | None,
    gate: Tensor | None,
    tiling: GDNTiling,
) -> tuple[Tensor, Tensor]:
    """Phases A -> B -> C on (B, H, T, S, D)-strided views (unit last stride). Writes out (and den), returns
    the final state.

    prologue: None (q, k, q_rot, k_rot are features) or dict(rstd_q, rstd_k (B, N) fp32, w_q, w_k (H*D,),
    rope (RopeArgs), scale), in which case q / k are raw projections and q_rot / k_rot unused.
    """
    B, H, T, S, D = q.shape
    dev = q.device
    bf16, prec = _precision(q.dtype)
    if not bf16:
        tiling = tiling.for_fp32()
    if prologue is not None and prologue["rope"].mode == 2:
        tiling = tiling.for_rope3d()
    bd = _block_d(D)
    bs = tiling.block_a
    split = max(1, min(tiling.split_a, triton.cdiv(S, bs)))
    s_per_split = triton.cdiv(triton.cdiv(S, split), bs) * bs
    split = triton.cdiv(S, s_per_split)
    fused = prologue is not None
    dummy = decay  # stands in for pointers a variant does not read
    if fused:
        rstd_q, rstd_k = prologue["rstd_q"], prologue["rstd_k"]
        w_q, w_k = prologue["w_q"], prologue["w_k"]
        rope: RopeArgs = prologue["rope"]
        k_scale = prologue["scale"]
    else:
        rstd_q = rstd_k = w_q = w_k = dummy
        rope = RopeArgs(0, None, None)
        k_scale = 1.0
    rope_args = rope.args(dummy)

    pa = _empty((B * H * T, split, 3, D, D), torch.float32, dev)
    bz = _empty((B * H * T, split, D), torch.float32, dev)
    merge = tiling.merge_a
    bo = bd // 2 if tiling.split_d_a and bd >= 32 else bd
    nb = bd // bo
    nsym = nb * (nb + 1) // 2
    jobs = nsym + nb * nb + (0 if merge else nsym)
    _phase_a_kernel[(jobs, B * H * T * split)](
        k, k_rot, v, beta, rstd_k, w_k, rope_args[0], rope_args[1], pa, bz,
        *k.stride()[:4], *k_rot.stride()[:4], *v.stride()[:4], *beta.stride(),
        H, T, S, D, split, s_per_split, *rope_args[2:], k_scale,
        PROLOGUE=fused, ROPE=rope.mode, MERGE=merge, BF16=bf16, EMU=_interpreting(), PREC=prec, BS=bs, BD=bd,
        BO=bo, num_warps=tiling.warps_a, num_stages=tiling.stages_a, **pdl_options(),
    )  # fmt: skip
    op_dtype = torch.bfloat16 if bf16 else torch.float32
    hs, zs, fkv, fz = _scan_state(pa, bz, decay, state_kv, state_z, (B, H, T, D), split, ndir, op_dtype, tiling)
    tokens_c = min(tiling.tokens_c, triton.cdiv(S, tiling.block_c) * tiling.block_c)
    g = gate if gate is not None else out
    _phase_c_kernel[(triton.cdiv(S, tokens_c), B * H * T)](
        q, q_rot, rstd_q, w_q, rope_args[0], rope_args[1], hs, zs, g, out, den if den is not None else dummy,
        *q.stride()[:4], *q_rot.stride()[:4], *g.stride()[:4], *out.stride()[:4],
        H, T, S, D, tokens_c, *rope_args[2:], eps,
        PROLOGUE=fused, ROPE=rope.mode, GATE=gate is not None, NUM_DEN=den is not None,
        BF16=bf16, EMU=_interpreting(), PREC=prec, BS=tiling.block_c, BD=bd,
        num_warps=tiling.warps_c, num_stages=tiling.stages_c, **pdl_options(),
    )  # fmt: skip
    return fkv, fz


def _check_frames(q: Tensor, others: dict[str, Tensor], beta: Tensor, decay: Tensor) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must be (B, H, T, S, D), got shape {tuple(q.shape)}")
    for name, t in others.items():
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if beta.shape != q.shape[:4] or decay.shape != q.shape[:3]:
        raise ValueError(
            f"beta (B,H,T,S)={tuple(q.shape[:4])} and decay (B,H,T)={tuple(q.shape[:3])} expected, "
            f"got {tuple(beta.shape)} and {tuple(decay.shape)}"
        )
    _check_device(q)


# ---------------------------------------------------------------------------------------------- public API


def gdn_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rot: Tensor,
    k_rot: Tensor,
    beta: Tensor,
    decay: Tensor,
    state_kv: Tensor | None = None,
    state_z: Tensor | None = None,
    tiling: GDNTiling = DEFAULT_TILING,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward scan over the frames of a chunk (fast `kernels.gdn.naive.gdn_scan`).

    Args:
        q, k, v, q_rot, k_rot: (B, H, T, S, D) bf16 / fp32, any strides (unit last stride avoids a copy).
        beta: (B, H, T, S) update gate; decay: (B, H, T) per-frame decay; any float dtype, any strides.
        state_kv: (B, H, D, D) [value, key] initial M, state_z: (B, H, D, 1) initial z (fp32), or both None.

    Returns:
        num (B, H, T, S, D) in q's dtype, den (B, H, T, S) fp32, final state_kv (B, H, D, D) fp32,
        final state_z (B, H, D, 1) fp32.
    """
    _check_frames(q, {"k": k, "v": v, "q_rot": q_rot, "k_rot": k_rot}, beta, decay)
    q, k, v, q_rot, k_rot = (_inner(t) for t in (q, k, v, q_rot, k_rot))
    B, H, T, S, D = q.shape
    num = _empty((B, H, T, S, D), q.dtype, q.device)
    den = _empty((B, H, T, S), torch.float32, q.device)
    fkv, fz = _run(q, k, v, q_rot, k_rot, beta, decay, state_kv, state_z, num, den, 0.0, 1, None, None, tiling)
    return num, den, fkv, fz


def bidirectional_gdn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rot: Tensor,
    k_rot: Tensor,
    beta: Tensor,
    decay: Tensor,
    state_kv: Tensor | None = None,
    state_z: Tensor | None = None,
    eps: float = 1e-8,
    tiling: GDNTiling = DEFAULT_TILING,
) -> tuple[Tensor, Tensor, Tensor]:
    """The frame-level bidirectional GDN of one chunk (fast `kernels.gdn.naive.bidirectional_gdn`).

    Args:
        q, k, v, q_rot, k_rot: (B, H, T, S, D) bf16 / fp32, any strides (unit last stride avoids a copy).
        beta: (B, H, T, S) update gate; decay: (B, H, T) per-frame decay; any float dtype, any strides.
        state_kv: (B, H, D, D) [value, key] carried M, state_z: (B, H, D, 1) carried z (fp32), or both None.
        eps: added to the summed denominator.

    Returns:
        out (B, H, T, S, D) in q's dtype, final forward state_kv (B, H, D, D) fp32, state_z (B, H, D, 1) fp32.
    """
    _check_frames(q, {"k": k, "v": v, "q_rot": q_rot, "k_rot": k_rot}, beta, decay)
    q, k, v, q_rot, k_rot = (_inner(t) for t in (q, k, v, q_rot, k_rot))
    out = _empty(tuple(q.shape), q.dtype, q.device)
    fkv, fz = _run(q, k, v, q_rot, k_rot, beta, decay, state_kv, state_z, out, None, eps, 2, None, None, tiling)
    return out, fkv, fz


def rms_rstd(x: Tensor, eps: float, y: Tensor | None = None) -> Tensor:
    """1 / RMS over the last dim: x (B, N, C) (and y, same shape) -> (B, N) fp32, or (2, B, N) with y.

    Fast `kernels.gdn.naive_fused.rms_rstd` (which takes x alone); y lets q and k share one launch.
    """
    _check_device(x)
    x = _inner(x)
    ys = _inner(y) if y is not None else x
    B, N, C = x.shape
    if ys.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(ys.shape)}")
    out = _empty((2 if y is not None else 1, B, N), torch.float32, x.device)
    bt, bc = 2, triton.next_power_of_2(C)
    _rstd_kernel[(triton.cdiv(B * N, bt), out.shape[0])](
        x, ys, out, B * N, N, C, x.stride(0), x.stride(1), ys.stride(0), ys.stride(1), eps, BT=bt, BC=bc,
        num_warps=4 if bc <= 4096 else 8, **pdl_options(),
    )  # fmt: skip
    return out if y is not None else out[0]


def qk_prologue(
    x: Tensor,
    weight: Tensor,
    norm_eps: float,
    scale: float,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
    rope3d: Rope3DTables | None = None,
) -> tuple[Tensor, Tensor]:
    """ReLU(RMSNorm(x)) * scale and its RoPE rotation (fast `kernels.gdn.naive_fused.qk_prologue`).

    The same code the scan kernels run on load, as its own launch (for tests and for callers that want the
    features materialised).

    Args:
        x: (B, N, C) raw projection, bf16 / fp32. weight: (C,) RMSNorm weight. norm_eps: RMSNorm eps.
        scale: 1 for q, D^-1/2 S^-1/2 for k. cos, sin: ([B,] N, D/2) tables (any float dtype) or both None.
        heads: H, with C = H * D (D even). rope3d: per-axis tables instead of cos / sin.

    Returns:
        (features, rotated features), both (B, N, C) contiguous in x's dtype.
    """
    _check_device(x)
    x = _inner(x)
    B, N, C = x.shape
    D = C // heads
    T = rope3d.frames if rope3d is not None else 1
    S = N // T
    rope = rope_args(cos, sin, rope3d, N, D, T, S)
    rstd = rms_rstd(x, norm_eps)
    y = _empty((B, N, C), x.dtype, x.device)
    yr = _empty((B, N, C), x.dtype, x.device)
    bs = 32
    cs = rope.args(rstd)
    _prologue_kernel[(triton.cdiv(S, bs), B * heads * T)](
        x, rstd, weight.contiguous(), cs[0], cs[1], y, yr, heads, T, S, D, x.stride(0), x.stride(1), *cs[2:],
        scale, ROPE=rope.mode, BS=bs, BD=_block_d(D), **pdl_options(),
    )  # fmt: skip
    return y, yr


def fused_gdn_layer(
    q_raw: Tensor,
    k_raw: Tensor,
    v: Tensor,
    beta: Tensor,
    decay: Tensor,
    gate: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
    frames: int,
    state_kv: Tensor | None = None,
    state_z: Tensor | None = None,
    norm_eps: float = 1e-5,
    eps: float = 1e-8,
    rope3d: Rope3DTables | None = None,
    tiling: GDNTiling = DEFAULT_TILING,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GDN mixer of one chunk from its projections, prologue and gated merge fused into the scan.

    Fast `kernels.gdn.naive_fused.gdn_layer`: q = ReLU(RMSNorm(q_raw)),
    k = ReLU(RMSNorm(k_raw)) D^-1/2 S^-1/2, RoPE on both for the numerator, bidirectional scan,
    out = num / (den + eps) * SiLU(gate).

    Args:
        q_raw, k_raw, v, gate: (B, N, C) bf16 / fp32 projections in the token layout (N = T * S,
            c = h * D + d), any row strides (unit channel stride avoids a copy).
        beta: (B, H, T, S) update gate; decay: (B, H, T) per-frame decay; any float dtype, any strides.
        q_weight, k_weight: (C,) RMSNorm weights.
        cos, sin: (N, D/2) or per-sample (B, N, D/2) RoPE tables (fp32 or bf16 are read as they are, other
            dtypes converted to fp32), or both None: no rotation, or rotation by `rope3d` (per-axis tables,
            fewer bytes, but their masked per-axis loads are slower: kernels/gdn/README.md).
        heads, frames: H and T.
        state_kv: (B, H, D, D) [value, key] carried M, state_z: (B, H, D, 1) carried z (fp32), or both None.
        norm_eps: RMSNorm eps; eps: added to the summed denominator.

    Returns:
        out (B, N, C) in gate's dtype, final forward state_kv (B, H, D, D) fp32, state_z (B, H, D, 1) fp32.
    """
    _check_device(q_raw)
    B, N, C = q_raw.shape
    H, T = heads, frames
    if C % H or N % T or (C // H) % 2:
        raise ValueError(f"C={C} must split into {H} heads of even D and N={N} into {T} frames")
    S, D = N // T, C // H
    for name, t in (("k_raw", k_raw), ("v", v), ("gate", gate)):
        if t.shape != q_raw.shape:
            raise ValueError(f"{name} must have q_raw's shape {tuple(q_raw.shape)}, got {tuple(t.shape)}")
    if beta.shape != (B, H, T, S) or decay.shape != (B, H, T):
        raise ValueError(
            f"beta (B,H,T,S)=({B},{H},{T},{S}) and decay (B,H,T)=({B},{H},{T}) expected, "
            f"got {tuple(beta.shape)} and {tuple(decay.shape)}"
        )
    rope = rope_args(cos, sin, rope3d, N, D, T, S)
    q_raw, k_raw, v, gate = (_inner(t) for t in (q_raw, k_raw, v, gate))
    rstd = rms_rstd(q_raw, norm_eps, k_raw)  # (2, B, N)
    prologue = dict(
        rstd_q=rstd[0], rstd_k=rstd[1], w_q=q_weight.contiguous(), w_k=k_weight.contiguous(), rope=rope,
        scale=D**-0.5 * S**-0.5,
    )  # fmt: skip

    def frames_view(t: Tensor) -> Tensor:  # (B, N, C) with unit channel stride -> (B, H, T, S, D) view
        sb, sn, _ = t.stride()
        return t.as_strided((B, H, T, S, D), (sb, D, S * sn, sn, 1))

    qf, kf, vf, gf = (frames_view(t) for t in (q_raw, k_raw, v, gate))
    out = _empty((B, N, C), gate.dtype, q_raw.device)
    fkv, fz = _run(
        qf,
        kf,
        vf,
        qf,
        kf,
        beta,
        decay,
        state_kv,
        state_z,
        frames_view(out),
        None,
        eps,
        2,
        prologue,
        gf,
        tiling,
    )
    return out, fkv, fz
