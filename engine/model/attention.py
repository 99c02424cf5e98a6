"""Softmax self-attention (gated, with RoPE) and text cross-attention of the SANA-Streaming DiT.

Softmax self-attention, both released variants: q_norm/k_norm = RMSNorm over all C (eps 1e-5, no ReLU, no key
scale), RoPE on q/k, non-causal SDPA with scale 1/sqrt(D), out * SiLU(output_gate(x)) -> proj.
- bidirectional (`V2VGatedSoftmaxAttention`): q/k are Linear [C, C]; attention over the whole clip.
- streaming (`V2VAfterRoPEGatedSoftmaxAttention`): q/k are Conv1d [C, C, 3] of which only the centre tap is
  applied; queries are the current chunk, keys/values = cached window (post-RoPE k, raw v) + current chunk.

Cross-attention (`MultiHeadCrossAttention`): q_linear, kv_linear (K = first C outputs, V = last C), RMSNorm over
C on q and k (eps 1e-6), additive text mask (1 - m) * -10000, proj. No RoPE, no gate, nothing cached.

Non-goals: choosing which chunks form the window (cache.py does that and hands over the keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model import fast_ops
from engine.model.layers import RMSNorm, apply_rope


class SoftmaxAttention(nn.Module):
    """Gated softmax self-attention; `streaming` selects the 3-tap Conv1d q/k layout of the AR checkpoint."""

    def __init__(self, hidden: int, head_dim: int, streaming: bool, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = hidden // head_dim
        self.head_dim = head_dim
        self.streaming = streaming
        if streaming:
            self.q = nn.Conv1d(hidden, hidden, 3, padding=1, bias=False)
            self.k = nn.Conv1d(hidden, hidden, 3, padding=1, bias=False)
        else:
            self.q = nn.Linear(hidden, hidden, bias=False)
            self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.q_norm = RMSNorm(hidden, norm_eps)
        self.k_norm = RMSNorm(hidden, norm_eps)
        self.output_gate = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)
        # Inference-only concatenated q/k/v/output_gate weights (`fuse`); non-persistent: never in a state dict.
        self.register_buffer("fused_in_w", None, persistent=False)
        self.register_buffer("fused_in_b", None, persistent=False)

    def fuse(self) -> None:
        """Inference: the four projections that read x as one GEMM (N = 4C)."""
        w = torch.cat([self._qk_weight(self.q.weight), self._qk_weight(self.k.weight), self.v.weight,
                       self.output_gate.weight])  # fmt: skip
        zeros = torch.zeros(3 * self.v.weight.shape[0], dtype=w.dtype, device=w.device)
        self.fused_in_w = w.detach().clone()
        self.fused_in_b = torch.cat([zeros, self.output_gate.bias]).detach().clone()

    def unfuse(self) -> None:
        self.fused_in_w = self.fused_in_b = None

    def kv_shapes(self, batch: int, tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """What one cached chunk of this layer holds: post-RoPE k and raw v, (B, tokens, heads, D), activation dtype."""
        shape = (batch, tokens, self.heads, self.head_dim)
        return {"k": (shape, None), "v": (shape, None)}

    def _qk_weight(self, w: Tensor) -> Tensor:
        return w[:, :, 1] if self.streaming else w

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        rope_cs: tuple[Tensor, Tensor] | None = None,
        kv_tail: int = 0,
        queries: int | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, N, C); rope (N, D/2) for the current tokens' absolute positions; past_kv: window keys (post-RoPE)
        and values, each (B, M, heads, D); rope_cs: rope's fp32 (cos, sin) for the fused norm + RoPE kernel;
        kv_tail: past_kv's last kv_tail (= N) rows are free: the current keys/values are written there in place
        and attention reads the buffers as they are (no concatenation per call); queries: only the output of the
        last `queries` tokens is wanted (every token's key and value still is): the others are not attended.

        Returns (out (B, N or queries, C), (k, v) of the current tokens, (B, N, heads, D), for the cache)."""
        B, N, C = x.shape
        shape = (B, N, self.heads, self.head_dim)
        if self.fused_in_w is not None:
            q, k, v, gate = F.linear(x, self.fused_in_w, self.fused_in_b).split(C, dim=-1)
        else:
            q, k = F.linear(x, self._qk_weight(self.q.weight)), F.linear(x, self._qk_weight(self.k.weight))
            v, gate = self.v(x), self.output_gate(x)
        fast = fast_ops.ops(x.device)
        if fast is not None and (rope is None or rope_cs is not None):  # norm (+ RoPE) in one kernel each
            cos, sin = rope_cs if rope is not None else (None, None)
            q = fast.rms_norm(q, self.q_norm.weight, self.q_norm.eps, cos, sin, self.head_dim).reshape(shape)
            k = fast.rms_norm(k, self.k_norm.weight, self.k_norm.eps, cos, sin, self.head_dim).reshape(shape)
        else:
            q, k = self.q_norm(q).reshape(shape), self.k_norm(k).reshape(shape)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        v = v.reshape(shape)
        k_all, v_all = k, v
        if past_kv is not None and kv_tail and torch.compiler.is_compiling():
            # Compiled blocks: an in-place write into a block input would be functionalised into copies of the
            # whole buffers; a concatenation of the history part is one fused copy instead.
            k_all = torch.cat([past_kv[0][:, :-kv_tail].to(k.dtype), k], dim=1)
            v_all = torch.cat([past_kv[1][:, :-kv_tail].to(v.dtype), v], dim=1)
        elif past_kv is not None and kv_tail:
            if kv_tail != N:
                raise ValueError(f"the window buffers have room for {kv_tail} tokens, the chunk has {N}")
            k_all, v_all = past_kv
            if fast is not None and k_all.dtype == k.dtype == v.dtype:
                fast.kv_append(k_all, v_all, k, v)
            else:
                k_all[:, -N:].copy_(k)
                v_all[:, -N:].copy_(v)
        elif past_kv is not None:
            k_all = torch.cat([past_kv[0].to(k.dtype), k], dim=1)
            v_all = torch.cat([past_kv[1].to(v.dtype), v], dim=1)
        if queries is not None:
            q, gate = q[:, N - queries :], gate[:, N - queries :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2))
        if fast is not None:  # (B, N, heads, D) view of the output straight into the gate product
            return self.proj(fast.silu_gate(out.transpose(1, 2), gate)), (k, v)
        out = out.transpose(1, 2).reshape(B, q.shape[1], C).to(x.dtype)
        out = out * F.silu(gate.float()).to(x.dtype)
        return self.proj(out), (k, v)


def text_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The cross-attention's additive mask (B, 1, 1, L): (1 - mask) * -10000 in the activation dtype."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class CrossAttention(nn.Module):
    """Text cross-attention; keys `q_linear kv_linear proj q_norm k_norm`."""

    def __init__(self, hidden: int, num_heads: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = num_heads
        self.head_dim = hidden // num_heads
        self.q_linear = nn.Linear(hidden, hidden)
        self.kv_linear = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.q_norm = RMSNorm(hidden, norm_eps)
        self.k_norm = RMSNorm(hidden, norm_eps)

    def text_kv(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (after k_norm) and values of the projected text y (B, L, C), each (B, heads, L, D): fixed for a
        prompt, so a caller may compute them once and pass them to every forward."""
        B, L, C = y.shape
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        k = self.k_norm(k).reshape(B, L, self.heads, self.head_dim).transpose(1, 2)
        return k, v.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        y: Tensor | None,
        mask: Tensor | None,
        kv: tuple[Tensor, Tensor] | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C); y (B, L, C) projected text, or its `text_kv` in kv; mask (B, L), 1 = token, 0 = padding,
        or None = no padding; bias: `text_bias(mask)` computed beforehand (then mask is not read)."""
        B, N, C = x.shape
        fast = fast_ops.ops(x.device)
        q = self.q_linear(x)
        q = fast.rms_norm(q, self.q_norm.weight, self.q_norm.eps) if fast is not None else self.q_norm(q)
        q = q.reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv if kv is not None else self.text_kv(y)
        if bias is None and mask is not None:
            bias = text_bias(mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
