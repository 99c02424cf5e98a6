"""Building blocks of the SANA-Streaming DiT: norms, embedders, 3D RoPE, the GLUMBConvTemp FFN, final layer.

Module and parameter names follow the released checkpoints (`../shared/reference/*_keys.tsv`). The numerics
follow the release's bf16 inference path: RMSNorm normalises in fp32, the timestep sinusoid is fp32, RoPE rotates
in complex128; everything else runs in the activation dtype.

Token layout everywhere: (B, N, C) with N = T * H * W, t-major then h then w.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model import fast_ops


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), normalised in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).type_as(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift/scale broadcast (B, 1, C)."""
    return x * (1 + scale) + shift


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine parameters (the blocks' norm1/norm2 and the final norm)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class TimestepEmbedder(nn.Module):
    """Integer-truncated timestep -> fp32 sinusoid [cos | sin] -> Linear -> SiLU -> Linear.  Keys `mlp.0`, `mlp.2`."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """t (B,) -> (B, dim) fp32; frequencies exp(-ln(max_period) * i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        # The release truncates toward zero: timestep.long() then float.
        t = t.long().float()
        emb = self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class CaptionMlp(nn.Module):
    """timm-style Mlp: fc1 -> GELU(tanh) -> fc2 (keys `fc1`, `fc2`)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text projection `y_proj` plus the null-caption buffer `y_embedding` (used for CFG dropout in training)."""

    def __init__(self, caption_channels: int, hidden: int, text_len: int) -> None:
        super().__init__()
        self.y_proj = CaptionMlp(caption_channels, hidden)
        self.register_buffer("y_embedding", torch.randn(text_len, caption_channels) / caption_channels**0.5)

    def forward(self, y: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        """y (B, L, caption_channels); drop_mask (B,) bool replaces a sample's caption by the null caption."""
        if drop_mask is not None:
            y = torch.where(drop_mask[:, None, None], self.y_embedding.to(y.dtype)[None], y)
        return self.y_proj(y)


class FinalLayer(nn.Module):
    """(shift, scale) = scale_shift_table + t_emb; LN -> modulate -> Linear(C -> out)."""

    def __init__(self, hidden: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden, out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x, self.eps), shift, scale))


class RoPE3D:
    """3D rotary table of the release (`WanRotaryPosEmbed`), absolute integer positions.

    Head dim D splits into t: D - 2*2*(D//6)... precisely h = w = 2*(D//6) dims and t = D - h - w, each axis with
    its own frequencies theta^(-2i/d_axis). Channels (2i, 2i+1) of a head form one complex number; the D/2 slots are
    ordered [t | h | w]. Tables are complex128, as in the release.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_len: int = 1024) -> None:
        self.head_dim = head_dim
        hw = 2 * (head_dim // 6)
        self.dims = (head_dim - 2 * hw, hw, hw)
        self.theta = theta
        self.max_len = max_len
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _axis_tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._tables:
            pos = torch.arange(self.max_len, dtype=torch.float64)
            out = []
            for d in self.dims:
                freqs = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
                out.append(torch.polar(torch.ones(self.max_len, d // 2, dtype=torch.float64), torch.outer(pos, freqs)))
            self._tables[device] = tuple(t.to(device) for t in out)
        return self._tables[device]

    def table(self, start_frame: int, T: int, H: int, W: int, device: torch.device) -> Tensor:
        """Complex128 (T*H*W, D/2) for frames [start_frame, start_frame + T) and all rows/columns."""
        if start_frame + T > self.max_len or self.max_len < H or self.max_len < W:
            raise ValueError(
                f"RoPE positions exceed the table: frames up to {start_frame + T}, grid {H}x{W}, max {self.max_len}"
            )
        ft, fh, fw = self._axis_tables(device)
        ft = ft[start_frame : start_frame + T][:, None, None].expand(T, H, W, -1)
        fh = fh[:H][None, :, None].expand(T, H, W, -1)
        fw = fw[:W][None, None, :].expand(T, H, W, -1)
        return torch.cat([ft, fh, fw], dim=-1).reshape(T * H * W, -1)


def rope_mode(device: torch.device) -> str:
    """'exact' (complex128, the release's PyTorch path) or 'fast' (fp32 cos/sin, what the release's fused GDN kernels
    use), from env SANA_STREAM_ROPE; default exact on CPU, fast on accelerators. The two differ by fp32 rounding of
    the rotation, far below the bf16 rounding of the result."""
    mode = os.environ.get("SANA_STREAM_ROPE", "auto")
    if mode not in ("auto", "exact", "fast"):
        raise ValueError(f"SANA_STREAM_ROPE must be auto, exact or fast, got {mode!r}")
    return ("exact" if device.type == "cpu" else "fast") if mode == "auto" else mode


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate x (B, N, heads, D) by table (N, D/2) or per sample (B, N, D/2) (complex128); result in x's dtype."""
    if rope_mode(x.device) == "exact":
        xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)).contiguous())
        out = torch.view_as_real(xc * table.unsqueeze(-2)).flatten(-2)
        return out.to(x.dtype)
    t = table.unsqueeze(-2)
    cos, sin = t.real.float(), t.imag.float()
    xr = x.float().unflatten(-1, (-1, 2))
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class _Conv(nn.Module):
    """Holds a conv under `.conv` so keys read `mlp.inverted_conv.conv.weight` as in the release."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv


class GLUMBConvTemp(nn.Module):
    """FFN: per-frame GLU MBConv (1x1 -> SiLU -> 3x3 depthwise -> a*SiLU(g) -> 1x1) plus a residual temporal conv.

    The temporal conv (`t_conv`, kernel (3,1), no bias) runs over frames at each spatial position. Its left
    context is the previous chunk's last spatial-output frame when given (`ctx`), zero padding otherwise; the
    right edge is always zero-padded (the release's `CachedGLUMBConvTemp`).
    """

    def __init__(self, hidden: int, ffn_hidden: int, t_kernel: int = 3) -> None:
        super().__init__()
        if t_kernel != 3:
            raise ValueError("only t_kernel_size 3 is supported (the released models use 3)")
        self.ffn_hidden = ffn_hidden
        self.inverted_conv = _Conv(nn.Conv2d(hidden, 2 * ffn_hidden, 1))
        self.depth_conv = _Conv(nn.Conv2d(2 * ffn_hidden, 2 * ffn_hidden, 3, padding=1, groups=2 * ffn_hidden))
        self.point_conv = _Conv(nn.Conv2d(ffn_hidden, hidden, 1, bias=False))
        self.t_conv = nn.Conv2d(hidden, hidden, (t_kernel, 1), bias=False)
        # Inference-only (`fuse`): t_conv's taps side by side, [W_prev | W_cur | W_next] (C, 3C), built once.
        self.register_buffer("fused_t_w", None, persistent=False)

    def t_conv_taps(self) -> Tensor:
        """t_conv as a (C, 3C) matrix over [previous | current | next] frame features."""
        if self.fused_t_w is not None:
            return self.fused_t_w
        C = self.t_conv.weight.shape[0]
        return self.t_conv.weight[:, :, :, 0].permute(0, 2, 1).reshape(C, 3 * C)

    def fuse(self) -> None:
        self.fused_t_w = self.t_conv_taps().detach().clone()

    def unfuse(self) -> None:
        self.fused_t_w = None

    def spatial(self, x: Tensor, hw: tuple[int, int, int]) -> Tensor:
        """x (B, N, C) -> (B, T, S, C): the per-frame GLU MBConv, in token layout.

        The 1x1 convs are GEMMs on the tokens and the depthwise conv runs on a channels-last view, so no
        activation is transposed (the same function as the release's NCHW convs)."""
        B, N, C = x.shape
        T, H, W = hw
        inv, dw = self.inverted_conv.conv, self.depth_conv.conv
        u = F.linear(x, inv.weight.flatten(1), inv.bias)  # (B, N, 2F)
        fast = fast_ops.ops(x.device)
        if fast is not None:  # SiLU, depthwise conv and GLU in one pass over u
            y = fast.dwconv_glu(u, dw.weight, dw.bias, T, H, W)
        else:
            y = F.silu(u).reshape(B * T, H, W, -1).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
            a, g = dw(y).permute(0, 2, 3, 1).chunk(2, dim=-1)  # (B*T, H, W, F) each
            y = a * F.silu(g)
        y = F.linear(y, self.point_conv.conv.weight.flatten(1))
        return y.reshape(B, T, H * W, C)

    def last_frame(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """What `forward` returns second, alone: the spatial output of one frame x (B, S, C), as (B, C, 1, S).
        The spatial part works frame by frame, so the chunk's last frame needs only its own tokens (the t = 0
        refresh's last block: nothing reads that block's output, only this context)."""
        return self.spatial(x, (1, *hw)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, hw: tuple[int, int, int], ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, C); ctx (B, C, 1, S) or None. Returns (out (B, N, C), last spatial frame (B, C, 1, S)).

        The temporal conv is one GEMM: each frame's output mixes [previous, current, next] frames with the three
        kernel taps side by side."""
        B, N, C = x.shape
        y = self.spatial(x, hw)  # (B, T, S, C)
        fast = fast_ops.ops(x.device)
        if fast is not None:  # taps in one pass; y += taps W^T in place, in the GEMM's epilogue (beta = 1)
            taps = fast.tconv_taps(y, ctx)
            # The next chunk's context is y's last frame before the in-place update: the middle third of the
            # last frame's taps holds exactly that (a view, no copy).
            last = taps[:, -1:, :, C : 2 * C].permute(0, 3, 1, 2)
            out = y.reshape(-1, C).addmm_(taps.reshape(-1, 3 * C), self.t_conv_taps().t())
            return out.reshape(B, N, C), last
        left = torch.zeros_like(y[:, :1]) if ctx is None else ctx.to(y.dtype).permute(0, 2, 3, 1)
        padded = torch.cat([left, y, torch.zeros_like(y[:, :1])], dim=1)  # (B, T+2, S, C)
        T = y.shape[1]
        taps = torch.cat([padded[:, k : k + T] for k in range(3)], dim=-1)  # (B, T, S, 3C)
        out = y + F.linear(taps, self.t_conv_taps())
        return out.reshape(B, N, C), y[:, -1:].permute(0, 3, 1, 2)
