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

from engine.model import fast_ops
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
    available = fast_ops._memo("gdn_triton", lambda: triton_ops() is not None)
    if mode == "auto":
        return "triton" if device.type == "cuda" and available else "naive"
    if mode == "triton" and not available:
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
        # Inference-only concatenated projection weights (`fuse`); non-persistent: never in a state dict.
        self.register_buffer("fused_in_w", None, persistent=False)
        self.register_buffer("fused_in_b", None, persistent=False)

    def state_shapes(self, batch: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The carried state this layer owns: M (B, H, D, D) and z (B, H, D, 1), both fp32."""
        H, D = self.heads, self.head_dim
        return {"state_kv": ((batch, H, D, D), torch.float32), "state_z": ((batch, H, D, 1), torch.float32)}

    def fuse(self) -> None:
        """Inference: one weight for the six projections that read x (q, k, v, output_gate, beta_proj, gate_proj),
        so they run as one GEMM (N = 4C + 2H). gate_proj reads the frame mean of x; being linear it equals the
        frame mean of gate_proj(x), which the fused GEMM computes per token. Undone by `unfuse`."""
        w = torch.cat([self.q.weight[:, :, 0], self.k.weight[:, :, 0], self.v.weight, self.output_gate.weight,
                       self.beta_proj.weight, self.gate_proj.weight])  # fmt: skip
        zeros = torch.zeros(3 * self.v.weight.shape[0], dtype=w.dtype, device=w.device)
        b = torch.cat([zeros, self.output_gate.bias, self.beta_proj.bias, self.gate_proj.bias])
        self.fused_in_w, self.fused_in_b = w.detach().clone(), b.detach().clone()

    def unfuse(self) -> None:
        self.fused_in_w = self.fused_in_b = None

    def projections(self, x: Tensor, hw: tuple[int, int, int], kernels: bool = True) -> tuple[Tensor, ...]:
        """q_raw, k_raw, v, gate (B, N, C) (before norm / activation), beta (B, H, T, S), decay (B, H, T).

        beta = sigmoid(beta_proj(x)); decay = exp(-exp(A_log) * softplus(gate_proj(mean_s x) + dt_bias)) in fp32,
        both rounded to x's dtype like the release. With `fuse`d weights one GEMM makes all six (the columns are
        views of its output, unit channel stride) and the gate's frame mean is taken of the projected tokens; on the
        fused path (`fast_ops`, unless kernels=False) both gates come from one kernel (`triton_block.gdn_gates`)."""
        B, N, C = x.shape
        T, S = hw[0], hw[1] * hw[2]
        heads = self.heads
        if self.fused_in_w is not None:
            p = F.linear(x, self.fused_in_w, self.fused_in_b)
            q_raw, k_raw, v, gate = (p[..., i * C : (i + 1) * C] for i in range(4))
            fast = fast_ops.ops(x.device) if kernels else None
            if fast is not None:
                beta, decay = fast.gdn_gates(p, heads, T, self.A_log, self.dt_bias, 4 * C)
                return q_raw, k_raw, v, gate, beta, decay
            beta = p[..., 4 * C : 4 * C + heads].sigmoid()
            a = p[..., 4 * C + heads :].reshape(B, T, S, heads).float().mean(dim=2)  # (B, T, heads)
        else:
            q_raw = F.linear(x, self.q.weight[:, :, 0])
            k_raw = F.linear(x, self.k.weight[:, :, 0])
            v, gate = self.v(x), self.output_gate(x)
            beta = self.beta_proj(x).sigmoid()
            a = self.gate_proj(x.reshape(B, T, S, C).mean(dim=2)).float()  # (B, T, heads)
        beta = beta.reshape(B, T, S, heads).permute(0, 3, 1, 2).to(x.dtype)
        decay = torch.exp(-self.A_log.float().exp() * F.softplus(a + self.dt_bias.float()))
        return q_raw, k_raw, v, gate, beta, decay.transpose(1, 2).to(x.dtype)

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
        q_raw, k_raw, v, gate, beta, decay = self.projections(x, hw)
        q = F.relu(self.q_norm(q_raw))
        k = F.relu(self.k_norm(k_raw)) * (self.head_dim**-0.5 * (H * W) ** -0.5)
        shape = (B, N, self.heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        q_rot, k_rot = (apply_rope(q, rope), apply_rope(k, rope)) if rope is not None else (q, k)

        def frames(t: Tensor) -> Tensor:  # (B, N, heads, D) -> (B, heads, T, S, D), fp32
            return t.float().reshape(B, T, H * W, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)

        skv, sz = state if state is not None else (None, None)
        out, fkv, fz = bidirectional_gdn(
            frames(q), frames(k), frames(v), frames(q_rot), frames(k_rot), beta.float(), decay.float(),
            skv, sz, eps=self.eps,
        )  # fmt: skip
        out = out.to(x.dtype).permute(0, 2, 3, 1, 4).reshape(B, N, C)
        out = out * F.silu(gate.float()).to(x.dtype)
        return self.proj(out), (fkv, fz)

    def _forward_triton(
        self,
        x: Tensor,
        hw: tuple[int, int, int],
        rope: Tensor | tuple[Tensor, Tensor] | None,
        state: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`forward` through the fused kernels (`kernels.gdn.triton_gdn.fused_gdn_layer`, called as the custom op
        `sana::gdn_mixer`): same arguments and results. rope may come as the fp32 (cos, sin) tables of
        `fast_ops.rope_cos_sin`, built once per forward by the model."""
        q_raw, k_raw, v, gate, beta, decay = self.projections(x, hw)
        cos, sin = rope if isinstance(rope, tuple) else (fast_ops.rope_cos_sin(rope) or (None, None))
        skv, sz = state if state is not None else (None, None)
        out, fkv, fz = fast_ops.gdn_mixer()(
            q_raw, k_raw, v, beta, decay, gate, self.q_norm.weight, self.k_norm.weight,
            cos, sin, self.heads, hw[0], skv, sz, self.q_norm.eps, self.eps,
        )  # fmt: skip
        return self.proj(out), (fkv, fz)
