"""Plain-PyTorch references of the ops fused around the GDN scan (the engine's maths, written out here).

`kernels/gdn/triton_gdn.py` fuses these into its scan kernels; each has its reference below with the
signature of the fast version:

- `rms_rstd`: 1 / RMS over all C channels of a token (the q/k RMSNorm statistic, over every head at once).
- `qk_prologue`: RMSNorm -> ReLU -> scale (the key scale D^-1/2 S^-1/2 for k, 1 for q) -> RoPE rotation of
  adjacent channel pairs (2i, 2i+1) by per-token cos/sin tables. Returns the un-rotated features (denominator)
  and the rotated ones (numerator).
- `gated_output`: out * SiLU(gate), bf16 (activation dtype) out, in the token layout (B, N, C).
- `gdn_layer`: these composed with `kernels.gdn.naive.bidirectional_gdn`, exactly as
  `engine/model/gdn.py::GDNAttention.forward` computes the mixer between its linear projections and `proj`.

The roundings follow the engine (its PyTorch path, as the release's): RMSNorm normalises in fp32 and casts
back to the activation dtype, ReLU and the key scale run in that dtype, RoPE rotates in float64 and casts
back, the scan runs in fp32, and its output is cast to the activation dtype before the gate product (taken in
that dtype with SiLU in fp32). The fused kernels keep fp32 through all of it (as the release's fused path
does), so they differ from these references by a few activation-dtype ulps; the tests bound that.

Token layout: (B, N, C) with N = T * S (frame-major), channel c = h * D + d. Non-goals: projections, gates
(beta, decay), speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.gdn.naive import bidirectional_gdn


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs: the engine's fp32 steps, kept exact when the reference runs in fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_rstd(x: Tensor, eps: float) -> Tensor:
    """x (B, N, C) any float dtype -> rsqrt(mean_c x^2 + eps) (B, N), in fp32 (fp64 for fp64 x)."""
    xf = x.to(_wide(x.dtype))
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def rope_pairs(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of every head of x (B, N, C) by cos/sin (N, D/2) or per sample
    (B, N, D/2), in float64.

    (x_2i + i x_2i+1) * (cos + i sin), the engine's complex128 `apply_rope` written with real tables; result
    in x's dtype.
    """
    B, N, C = x.shape
    D = C // heads
    xd = x.to(torch.float64).reshape(B, N, heads, D // 2, 2)
    c = cos.to(torch.float64).unsqueeze(-2)  # ([B,] N, 1, D/2)
    s = sin.to(torch.float64).unsqueeze(-2)
    x0, x1 = xd[..., 0], xd[..., 1]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.reshape(B, N, C).to(x.dtype)


def qk_prologue(
    x: Tensor,
    weight: Tensor,
    norm_eps: float,
    scale: float,
    cos: Tensor | None,
    sin: Tensor | None,
    heads: int,
) -> tuple[Tensor, Tensor]:
    """The GDN q/k feature map: ReLU(RMSNorm(x)) * scale, and its RoPE rotation.

    Args:
        x: (B, N, C) raw projection (x W_q or x W_k), bf16 or fp32.
        weight: (C,) RMSNorm weight.
        norm_eps: RMSNorm eps (1e-5 in the release).
        scale: 1.0 for q; D^-1/2 * S^-1/2 for k.
        cos, sin: (N, D/2) or per-sample (B, N, D/2) rotation tables (float32 or float64), or both None.
        heads: H, with C = H * D.

    Returns:
        (features, rotated features), both (B, N, C) in x's dtype (rotated is features when cos is None).
    """
    xf = x.to(_wide(x.dtype))
    y = (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps))).to(x.dtype)
    y = F.relu(y)
    if scale != 1.0:
        y = y * scale
    if cos is None or sin is None:
        return y, y
    return y, rope_pairs(y, cos, sin, heads)


def gated_output(out: Tensor, gate: Tensor) -> Tensor:
    """out (B, H, T, S, D) scan output (any float) and gate (B, N, C) -> (B, N, C) in gate's dtype.

    The engine's merge: out cast to the activation dtype, times SiLU(gate in fp32) cast to that dtype.
    """
    B, H, T, S, D = out.shape
    o = out.to(gate.dtype).permute(0, 2, 3, 1, 4).reshape(B, T * S, H * D)
    return o * F.silu(gate.to(_wide(gate.dtype))).to(gate.dtype)


def gdn_layer(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """The GDN mixer of one chunk from its projections: prologue -> bidirectional scan (fp32) -> gated output.

    Args:
        q_raw, k_raw, v, gate: (B, N, C) projections x W_q, x W_k, x W_v, output_gate(x); activation dtype.
        beta: (B, H, T, S) update gate; decay: (B, H, T) per-frame decay (any float dtype, any strides).
        q_weight, k_weight: (C,) q_norm / k_norm weights.
        cos, sin: (N, D/2) or per-sample (B, N, D/2) RoPE tables, or both None.
        heads, frames: H and T, with C = H * D and N = T * S.
        state_kv (B, H, D, D) fp32 [value, key], state_z (B, H, D, 1) fp32: carried forward state or None.
        norm_eps: RMSNorm eps; eps: added to the denominator.

    Returns:
        out (B, N, C) in gate's dtype (before `proj`), final state_kv (B, H, D, D) and state_z (B, H, D, 1) in
        the scan's dtype: fp32 (fp64 for fp64 inputs, a high-precision reference).
    """
    B, N, C = q_raw.shape
    H, T = heads, frames
    S, D = N // T, C // H
    q, q_rot = qk_prologue(q_raw, q_weight, norm_eps, 1.0, cos, sin, H)
    k, k_rot = qk_prologue(k_raw, k_weight, norm_eps, D**-0.5 * S**-0.5, cos, sin, H)

    scan = _wide(q_raw.dtype)  # fp32, or fp64 for a float64 reference

    def to_frames(t: Tensor) -> Tensor:  # (B, N, C) -> (B, H, T, S, D)
        return t.to(scan).reshape(B, T, S, H, D).permute(0, 3, 1, 2, 4)

    skv = None if state_kv is None else state_kv.to(scan)
    sz = None if state_z is None else state_z.to(scan)
    out, fkv, fz = bidirectional_gdn(
        to_frames(q), to_frames(k), to_frames(v), to_frames(q_rot), to_frames(k_rot),
        beta.to(scan), decay.to(scan), skv, sz, eps=eps,
    )  # fmt: skip
    return gated_output(out, gate), fkv, fz
