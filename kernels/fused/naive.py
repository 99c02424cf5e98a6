"""Plain-PyTorch references of the fused DiT-block kernels: exactly what the model computes today, op by op.

- `dwconv_glu`: the middle of the FFN (`GLUMBConvTemp.spatial` in engine/model/layers.py) after the inverted 1x1
  conv's GEMM (bias added, SiLU not yet applied): SiLU -> per-frame depthwise 3x3 conv -> a * SiLU(g).
- `ln_modulate`: `modulate(layer_norm(x, eps), shift, scale)` of `HybridBlock.forward` (engine/model/hybrid_dit.py).
- `residual_ln_modulate`: the residual update `x + gate * delta` followed by the next LayerNorm + modulate.
- `rms_norm`: `RMSNorm` (engine/model/layers.py), optionally followed by `apply_rope`'s fp32 rotation: the
  q / k norms of the softmax and cross-attention layers.
- `gated_residual`: the self-attention residual x + gate * attn_out (fp32, rounded once: torch.addcmul).
- `kv_append`: the current keys/values written into the window buffers' free tail (`SoftmaxAttention.forward`).
- `silu_gate`: the softmax layers' output gate, out * SiLU(gate) (`SoftmaxAttention.forward`).
- `tconv_taps`: the FFN temporal conv's [previous | current | next] frame features (`GLUMBConvTemp.forward`).
- `gdn_gates`: beta and decay of the GDN layer from its fused projections (`GDNAttention.projections`).

Every op runs in the inputs' dtype as PyTorch runs it (bf16 ops compute in fp32 and round their result to bf16),
so each op's output is a rounding point the Triton kernels reproduce (kernels/fused/README.md lists them).
Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dwconv_glu",
    "gated_residual",
    "gdn_gates",
    "kv_append",
    "ln_modulate",
    "residual_ln_modulate",
    "rms_norm",
    "silu_gate",
    "tconv_taps",
]


def dwconv_glu(u: Tensor, weight: Tensor, bias: Tensor | None, frames: int, height: int, width: int) -> Tensor:
    """u (B, N, 2F) -> (B, N, F): y = SiLU(u); z = depthwise 3x3 conv of y per frame; z[..., :F] * SiLU(z[..., F:]).

    u: the inverted 1x1 conv's output in token layout, N = frames * height * width (t-major, then h, then w),
    channels last (any strides). weight (2F, 1, 3, 3), bias (2F,) or None: `nn.Conv2d(2F, 2F, 3, padding=1,
    groups=2F)` applied to each frame, zero padding. Output in u's dtype.
    """
    B, N, C2 = u.shape
    if frames * height * width != N or C2 % 2:
        raise ValueError(f"u {tuple(u.shape)} does not match {frames}x{height}x{width} tokens and 2F channels")
    y = F.silu(u)
    y = y.reshape(B * frames, height, width, C2).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    z = F.conv2d(y, weight, bias, padding=1, groups=C2).permute(0, 2, 3, 1)  # (B*T, H, W, 2F)
    a, g = z.chunk(2, dim=-1)
    return (a * F.silu(g)).reshape(B, N, C2 // 2)


def _per_sample(t: Tensor, C: int) -> Tensor:
    """(B, 1, C) or (B, C) -> (B, 1, C)."""
    if t.shape[-1] != C or t.dim() not in (2, 3) or t.numel() != t.shape[0] * C:
        raise ValueError(f"expected a per-sample (B, 1, C) or (B, C) tensor with C = {C}, got {tuple(t.shape)}")
    return t.reshape(t.shape[0], 1, C)


def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine over the last dim, then ln * (1 + scale) + shift; x (B, N, C), out in x's dtype.

    shift / scale: (B, 1, C) or (B, C), per sample (B may be 1 for all samples).
    """
    C = x.shape[-1]
    ln = F.layer_norm(x, (C,), eps=eps)
    return (ln * (1 + _per_sample(scale, C)) + _per_sample(shift, C)).to(x.dtype)


def residual_ln_modulate(
    x: Tensor, delta: Tensor, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """x_new = x + gate * delta (gate (B, 1, C) / (B, C), or None = 1), in x's dtype; h = ln_modulate(x_new, ...)."""
    upd = delta if gate is None else _per_sample(gate, x.shape[-1]) * delta
    x_new = (x + upd).to(x.dtype)
    return x_new, ln_modulate(x_new, shift, scale, eps)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None, head_dim: int = 0
) -> Tensor:
    """weight * x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype; with fp32 cos / sin ((N, D/2) or
    (B, N, D/2)) the result's channel pairs (2i, 2i+1) of each head of head_dim D are then rotated in fp32 and
    rounded again (the fast mode of `engine.model.layers.apply_rope`)."""
    xf = x.float()
    y = (weight * (xf * (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt())).to(x.dtype)
    if cos is None:
        return y
    B, N, C = y.shape
    pairs = y.float().reshape(B, N, C // head_dim, head_dim // 2, 2)
    c, s = cos.reshape(-1, N, 1, head_dim // 2), sin.reshape(-1, N, 1, head_dim // 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(B, N, C).to(x.dtype)


def gated_residual(x: Tensor, gate: Tensor, delta: Tensor) -> Tensor:
    """x + gate * delta in fp32, rounded once to x's dtype; gate (B, 1, C) / (B, C) or (1, 1, C)."""
    g = gate.reshape(-1, 1, x.shape[-1]).float()
    return (x.float() + g * delta.float()).to(x.dtype)


def kv_append(k_buf: Tensor, v_buf: Tensor, k: Tensor, v: Tensor) -> None:
    """k_buf[:, -N:] = k and v_buf[:, -N:] = v (N = k.shape[1]), in place."""
    N = k.shape[1]
    k_buf[:, -N:].copy_(k)
    v_buf[:, -N:].copy_(v)


def silu_gate(out: Tensor, gate: Tensor) -> Tensor:
    """out (B, N, heads, D) times SiLU(gate (B, N, C)): out in gate's dtype, SiLU in fp32 rounded to it."""
    B, N, _ = gate.shape
    return out.reshape(B, N, -1).to(gate.dtype) * F.silu(gate.float()).to(gate.dtype)


def tconv_taps(y: Tensor, ctx: Tensor | None) -> Tensor:
    """(B, T, S, 3C): for each frame t of y (B, T, S, C), [frame t-1 | frame t | frame t+1], frame -1 = ctx
    (B, C, 1, S) in y's dtype or zeros, frame T = zeros."""
    left = torch.zeros_like(y[:, :1]) if ctx is None else ctx.to(y.dtype).permute(0, 2, 3, 1)
    padded = torch.cat([left, y, torch.zeros_like(y[:, :1])], dim=1)  # (B, T+2, S, C)
    T = y.shape[1]
    return torch.cat([padded[:, k : k + T] for k in range(3)], dim=-1)


def gdn_gates(p: Tensor, heads: int, frames: int, a_log: Tensor, dt_bias: Tensor, col: int) -> tuple[Tensor, Tensor]:
    """beta (B, heads, T, S) = sigmoid(p[..., col : col + heads]) and decay (B, heads, T) = exp(-exp(a_log) *
    softplus(frame mean of p[..., col + heads : col + 2 heads] + dt_bias)), fp32 maths, in p's dtype."""
    B, N, _ = p.shape
    T, S = frames, N // frames
    beta = p[..., col : col + heads].float().sigmoid().to(p.dtype).reshape(B, T, S, heads).permute(0, 3, 1, 2)
    a = p[..., col + heads : col + 2 * heads].float().reshape(B, T, S, heads).mean(dim=2)
    decay = torch.exp(-a_log.float().exp() * F.softplus(a + dt_bias.float()))
    return beta, decay.transpose(1, 2).to(p.dtype)
