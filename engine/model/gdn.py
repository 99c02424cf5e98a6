"""The GDN self-attention mixer of SANA-Streaming (`V2VBiGDNAttention` / `V2VStateCachedBiGDNAttention`).

Per token: q = ReLU(RMSNorm(x Wq)), k = ReLU(RMSNorm(x Wk)) * D^-1/2 * S^-1/2, v = x Wv (x is the block's
modulated input). RoPE rotates q/k for the numerator; the denominator uses them un-rotated. Gates: beta per token
and head = sigmoid(beta_proj(x)); decay per frame and head = exp(-exp(A_log) * softplus(gate_proj(mean_s x) +
dt_bias)), computed in fp32 and rounded to the activation dtype like the release. The scan itself
(`kernels.gdn`) runs in fp32. out = scan(...) * SiLU(output_gate(x)) -> proj.

Two paths compute the mixer between the projections and `proj`: the plain-PyTorch one below (the reference,
any device) and `kernels.gdn.triton_gdn.fused_gdn_layer` (norm, ReLU, key scale, RoPE, scan and gated merge
in Triton kernels; its output differs by rounding only, kernels/gdn/README.md). The env var
`SANA_STREAM_GDN=auto|naive|triton` picks one (`gdn_backend`); auto takes triton on CUDA where it imports.

Both released variants have the same parameters; the streaming one carries the forward-scan state (M, z)
across chunks. Non-goals: the window logic of the softmax layers (attention.py), cache bookkeeping (cache.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.layers import RMSNorm, apply_rope
from kernels.gdn import bidirectional_gdn, triton_ops

GDN_BACKENDS = ("auto", "naive", "triton")


def gdn_backend(device: torch.device) -> str:
    """'triton' or 'naive' for a GDN layer on `device`, from env SANA_STREAM_GDN (auto | naive | triton).

    auto: triton on CUDA when triton imports, else naive. triton: always (CPU needs TRITON_INTERPRET=1).
    """
    mode = os.environ.get("SANA_STREAM_GDN", "auto").strip().lower() or "auto"
    if mode not in GDN_BACKENDS:
        raise ValueError(f"SANA_STREAM_GDN must be one of {', '.join(GDN_BACKENDS)}, got {mode!r}")
    if mode == "auto":
        return "triton" if device.type == "cuda" and triton_ops() is not None else "naive"
    if mode == "triton" and triton_ops() is None:
        raise RuntimeError("SANA_STREAM_GDN=triton but triton cannot be imported here")
    return mode


class GDNAttention(nn.Module):
    """Frame-level bidirectional Gated DeltaNet mixer; keys `q k v q_norm k_norm beta_proj gate_proj A_log dt_bias
    output_gate proj`."""

    def __init__(self, hidden: int, head_dim: int, norm_eps: float = 1e-5, eps: float = 1e-8) -> None:
        super().__init__()
        self.heads = hidden // head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.q = nn.Conv1d(hidden, hidden, 1, bias=False)
        self.k = nn.Conv1d(hidden, hidden, 1, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.q_norm = RMSNorm(hidden, norm_eps)
        self.k_norm = RMSNorm(hidden, norm_eps)
        self.beta_proj = nn.Linear(hidden, self.heads)
        self.gate_proj = nn.Linear(hidden, self.heads)
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.full((self.heads,), -8.0))
        self.output_gate = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def state_shapes(self, batch: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The carried state this layer owns: M (B, H, D, D) and z (B, H, D, 1), both fp32."""
        H, D = self.heads, self.head_dim
        return {"state_kv": ((batch, H, D, D), torch.float32), "state_z": ((batch, H, D, 1), torch.float32)}

    def gates(self, x: Tensor, hw: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """beta (B, H, T, S) and decay (B, H, T), both in x's dtype."""
        B, N, C = x.shape
        T, H, W = hw
        xf = x.reshape(B, T, H * W, C)
        beta = self.beta_proj(xf).sigmoid().permute(0, 3, 1, 2)
        a = self.gate_proj(xf.mean(dim=2)).float()  # (B, T, heads)
        decay = torch.exp(-self.A_log.float().exp() * F.softplus(a + self.dt_bias.float()))
        return beta.to(x.dtype), decay.transpose(1, 2).to(x.dtype)

    def qkv(self, x: Tensor, hw: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (after norm, ReLU, key scale) and v, each (B, N, heads, D) in x's dtype."""
        B, N, C = x.shape
        S = hw[1] * hw[2]
        q = F.relu(self.q_norm(F.linear(x, self.q.weight[:, :, 0])))
        k = F.relu(self.k_norm(F.linear(x, self.k.weight[:, :, 0])))
        k = k * (self.head_dim**-0.5 * S**-0.5)
        v = self.v(x)
        shape = (B, N, self.heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def forward(
        self,
        x: Tensor,
        hw: tuple[int, int, int],
        rope: Tensor | None,
        state: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, N, C) modulated block input; rope (N, D/2) complex128 or None; state (M, z) carried in.

        Returns (out (B, N, C), (M, z) after this chunk's forward scan, fp32)."""
        if gdn_backend(x.device) == "triton":
            return self._forward_triton(x, hw, rope, state)
        B, N, C = x.shape
        T, H, W = hw
        q, k, v = self.qkv(x, hw)
        q_rot, k_rot = (apply_rope(q, rope), apply_rope(k, rope)) if rope is not None else (q, k)
        beta, decay = self.gates(x, hw)

        def frames(t: Tensor) -> Tensor:  # (B, N, heads, D) -> (B, heads, T, S, D), fp32
            return t.float().reshape(B, T, H * W, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)

        skv, sz = state if state is not None else (None, None)
        out, fkv, fz = bidirectional_gdn(
            frames(q), frames(k), frames(v), frames(q_rot), frames(k_rot), beta.float(), decay.float(),
            skv, sz, eps=self.eps,
        )  # fmt: skip
        out = out.to(x.dtype).permute(0, 2, 3, 1, 4).reshape(B, N, C)
        out = out * F.silu(self.output_gate(x).float()).to(x.dtype)
        return self.proj(out), (fkv, fz)

    @torch.compiler.disable  # our own kernels: torch.compile compiles around them, not through them
    def _forward_triton(
        self,
        x: Tensor,
        hw: tuple[int, int, int],
        rope: Tensor | None,
        state: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`forward` through `kernels.gdn.triton_gdn.fused_gdn_layer` (same arguments and results; the fp32
        cos / sin tables of `rope` are built once per table and shared by the layers of a forward)."""
        ops = triton_ops()
        q_raw = F.linear(x, self.q.weight[:, :, 0])
        k_raw = F.linear(x, self.k.weight[:, :, 0])
        beta, decay = self.gates(x, hw)
        cos, sin = ops.rope_tables_cached(rope) if rope is not None else (None, None)
        skv, sz = state if state is not None else (None, None)
        out, fkv, fz = ops.fused_gdn_layer(
            q_raw, k_raw, self.v(x), beta, decay, self.output_gate(x), self.q_norm.weight, self.k_norm.weight,
            cos, sin, self.heads, hw[0], skv, sz, norm_eps=self.q_norm.eps, eps=self.eps,
        )  # fmt: skip
        return self.proj(out), (fkv, fz)
