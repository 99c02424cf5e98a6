"""Frame-level Gated DeltaNet (GDN) of SANA-Streaming: the plain-PyTorch reference.

This is the one place the GDN recurrence is written down. The engine runs it on CPUs; fast kernels
(`kernels/gdn/*.py`) are tested against it.

Layout (ours, not the release's): every per-token tensor is (B, H, T, S, D) = batch, heads, frames, tokens per
frame, head dim. The per-head state M (D x D) maps keys to values ([value dim, key dim], as the release stores
it) and z (D x 1) is the denominator state.

One scan direction, for each frame t, with every token of the frame updating the state together from the
already-decayed state of the previous frame (not token-sequential like fla's GDN):

    M <- g_t M ;  z <- g_t z
    M <- M + (V_t - M K_rot,t) diag(beta_t) K_rot,t^T
    z <- z + K_t diag(beta_t) (1 - K_t^T z)
    num_t = M Q_rot,t ;  den_t = z^T Q_t

The bidirectional layer adds a zero-seeded reverse scan that, for output frame t, has ingested only the
strictly later frames t+1 .. T-1 of the same chunk ("flip and shift"), read with frame t's own queries.
out = (num_fwd + num_bwd) / (den_fwd + den_bwd + eps).

Non-goals: projections, norms, RoPE and gates (engine/model/gdn.py computes those); speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward scan over the frames of a chunk.

    Args:
        q, k, v, q_rot, k_rot: (B, H, T, S, D). q/k feed the denominator, q_rot/k_rot (RoPE-rotated) the numerator.
        beta: (B, H, T, S) update gate per token.
        decay: (B, H, T) decay g per frame.
        state_kv: (B, H, D, D) initial M, [value dim, key dim]; None = zeros.
        state_z: (B, H, D, 1) initial z; None = zeros.

    Returns:
        num (B, H, T, S, D), den (B, H, T, S), final state_kv (B, H, D, D), final state_z (B, H, D, 1),
        all in the dtype of q (run it in fp32 or fp64; the engine upcasts).
    """
    B, H, T, S, D = q.shape
    if state_kv is None:
        state_kv = q.new_zeros(B, H, D, D)
    if state_z is None:
        state_z = q.new_zeros(B, H, D, 1)
    M = state_kv.to(q.dtype)
    z = state_z.to(q.dtype)
    nums, dens = [], []
    for t in range(T):
        g = decay[:, :, t, None, None].to(q.dtype)  # (B,H,1,1)
        M = M * g
        z = z * g
        kr_t = k_rot[:, :, t]  # (B,H,S,D)
        k_t = k[:, :, t]
        b_t = beta[:, :, t, :, None].to(q.dtype)  # (B,H,S,1)
        delta_v = (v[:, :, t] - kr_t @ M.transpose(-1, -2)) * b_t  # (B,H,S,Dv)
        M = M + delta_v.transpose(-1, -2) @ kr_t  # (B,H,Dv,Dk)
        delta_z = (1.0 - k_t @ z) * b_t  # (B,H,S,1)
        z = z + k_t.transpose(-1, -2) @ delta_z  # (B,H,Dk,1)
        nums.append(q_rot[:, :, t] @ M.transpose(-1, -2))  # (B,H,S,Dv)
        dens.append((q[:, :, t] @ z).squeeze(-1))  # (B,H,S)
    return torch.stack(nums, dim=2), torch.stack(dens, dim=2), M, z


def _flip_shift(x: Tensor, fill: float) -> Tensor:
    """Reverse the frame axis (dim 2) and shift by one: position r holds frame T-r (position 0 = fill)."""
    flipped = torch.flip(x, dims=[2])
    pad = torch.full_like(flipped.narrow(2, 0, 1), fill)
    return torch.cat([pad, flipped.narrow(2, 0, x.shape[2] - 1)], dim=2)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """The frame-level bidirectional GDN of one chunk.

    The forward scan is seeded from (state_kv, state_z) (the state carried across chunks) and its final state is
    returned; the reverse scan is zero-seeded and confined to the chunk.

    Args: as `gdn_scan`; eps is added to the summed denominator (the block passes 1e-8).

    Returns:
        out (B, H, T, S, D) in the dtype of q, final forward state_kv (B, H, D, D), state_z (B, H, D, 1).
    """
    num_f, den_f, fkv, fz = gdn_scan(q, k, v, q_rot, k_rot, beta, decay, state_kv, state_z)
    # Reverse scan: step r handles output frame T-1-r, decays by g_{t+1} and ingests frame t+1.
    num_b, den_b, _, _ = gdn_scan(
        torch.flip(q, dims=[2]),
        _flip_shift(k, 0.0),
        _flip_shift(v, 0.0),
        torch.flip(q_rot, dims=[2]),
        _flip_shift(k_rot, 0.0),
        _flip_shift(beta, 0.0),
        _flip_shift(decay, 1.0),
    )
    num = num_f + torch.flip(num_b, dims=[2])
    den = den_f + torch.flip(den_b, dims=[2])
    return num / (den.unsqueeze(-1) + eps), fkv, fz
