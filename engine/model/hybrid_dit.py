"""The hybrid SANA-Streaming DiT (`SanaMSVideoV2V`): GDN + softmax blocks, both released variants in one class.

    x = PatchEmbed([noisy | source])                      (B, N, C), N = T*H*W tokens, t-major
    t_emb = TimestepEmbedder(trunc(t)); t0 = Linear(SiLU(t_emb)) -> 6C   (adaLN-single, shared by all blocks)
    y = RMSNorm(Mlp(text))
    for each block:  x += gate1 * SelfAttn(LN(x)(1+scale1)+shift1)    GDN, or softmax at softmax_layer_ids
                     x += CrossAttn(x, y, mask)                         no norm, no gate
                     x += gate2 * FFN(LN(x)(1+scale2)+shift2)           GLUMBConvTemp
    v = Linear(LN(x)(1+scale)+shift), (shift, scale) = table + t_emb    flow velocity eps - x0

Module names and shapes are those of the released checkpoints (no `pos_embed`: the release's is an unused zero
buffer that the checkpoints omit). Streaming: pass a `DiTCache`; the current chunk sits at absolute frames
[cache.next_frame, cache.next_frame + T) for RoPE; with save=True the call writes the cache.

Non-goals: sampling loops (engine/sampler.py, engine/pipeline.py), weight loading (engine/weights.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.config import DiTConfig
from engine.model import fast_ops
from engine.model.attention import CrossAttention, SoftmaxAttention, text_bias
from engine.model.cache import DiTCache, LayerRead, LayerWrite
from engine.model.gdn import GDNAttention, gdn_backend
from engine.model.layers import (
    CaptionEmbedder,
    FinalLayer,
    GLUMBConvTemp,
    RMSNorm,
    RoPE3D,
    TimestepEmbedder,
    layer_norm,
    modulate,
)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (1,1,1) over [noisy | source] channels (key `x_embedder.proj`)."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, T, H, W) -> (B, T*H*W, C); a 1x1x1 conv is a linear map over channels."""
        w = self.proj.weight.flatten(1)
        return nn.functional.linear(x.flatten(2).transpose(1, 2), w, self.proj.bias)


class HybridBlock(nn.Module):
    """One DiT block: adaLN-modulated self-attention (GDN or softmax), cross-attention, FFN."""

    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.index = index
        self.is_softmax = index in cfg.softmax_layer_ids
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        if self.is_softmax:
            self.attn: nn.Module = SoftmaxAttention(C, cfg.head_dim, cfg.streaming, cfg.qk_norm_eps)
        else:
            self.attn = GDNAttention(C, cfg.head_dim, cfg.qk_norm_eps, cfg.gdn_eps)
        self.cross_attn = CrossAttention(C, cfg.num_heads, cfg.norm_eps)
        self.mlp = GLUMBConvTemp(C, cfg.ffn_hidden, cfg.t_kernel_size)

    def forward(
        self,
        x: Tensor,
        y: Tensor | None,
        text_bias: Tensor | None,
        t0: Tensor,
        hw: tuple[int, int, int],
        rope: Tensor | None,
        read: LayerRead,
        text_kv: tuple[Tensor, Tensor] | None = None,
        rope_cs: tuple[Tensor, Tensor] | None = None,
        residual: tuple[Tensor, Tensor] | None = None,
        defer: bool = False,
        cache_only: bool = False,
    ) -> tuple[Tensor, LayerWrite, Tensor, tuple[Tensor, Tensor] | None]:
        """y: the projected text, or None with its cross-attention keys/values in text_kv; text_bias: the
        cross-attention mask (`attention.text_bias`), None without padding. rope_cs: the fp32
        (cos, sin) tables of rope for the fused kernels, when the model built them for all layers.
        residual: the previous block's deferred FFN residual (delta, gate): this block's input is x + gate * delta,
        computed together with its first LayerNorm. defer: return this block's FFN residual that way instead of
        applying it (then x is returned without it). cache_only: nothing will read this block's output, only what
        it writes (the last block of the t = 0 refresh): its keys/values or GDN state from every token, and the
        FFN context of the last frame, which needs the rest of the block for that frame's tokens alone.
        Returns (x, what the cache may keep, self-attention output before gate1 (for inspection), the deferred
        residual or None); with cache_only x and the self-attention output hold the last frame's tokens only and
        the FFN is not applied."""
        B, N, C = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t0.reshape(B, 6, C)).chunk(
            6, dim=1
        )
        fast = fast_ops.ops(x.device)
        if fast is not None and residual is not None:
            x, h = fast.residual_ln_modulate(x, residual[0], residual[1], shift1, scale1, self.eps)
        elif fast is not None:
            h = fast.ln_modulate(x, shift1, scale1, self.eps)
        else:
            if residual is not None:
                x = x + residual[1] * residual[0]
            h = modulate(layer_norm(x, self.eps), shift1, scale1)
        write = LayerWrite()
        S = hw[1] * hw[2]
        if self.is_softmax:
            queries = S if cache_only else None
            attn_out, write.kv = self.attn(h, rope, read.past_kv, rope_cs, read.kv_tail, queries)
        else:
            attn_out, write.gdn_state = self.attn(h, hw, rope if rope_cs is None else rope_cs, read.gdn_state)
            if cache_only:  # the scan needs every token; the output only the last frame's
                attn_out = attn_out[:, N - S :]
        if cache_only:
            x = x[:, N - S :]
        # Gated residuals: one kernel on the fast path (rounding once; the reference rounds gate * out too).
        x = fast.gated_residual(x, gate1, attn_out) if fast is not None else x + gate1 * attn_out
        cross = self.cross_attn(x, y, None, text_kv, bias=text_bias)
        if fast is not None:
            x, h = fast.residual_ln_modulate(x, cross, None, shift2, scale2, self.eps)
        else:
            x = x + cross
            h = modulate(layer_norm(x, self.eps), shift2, scale2)
        if cache_only:
            write.ffn_last = self.mlp.last_frame(h, hw[1:])
            return x, write, attn_out, None
        ffn_out, write.ffn_last = self.mlp(h, hw, read.ffn_ctx)
        if defer:
            return x, write, attn_out, (ffn_out, gate2)
        x = fast.gated_residual(x, gate2, ffn_out) if fast is not None else x + gate2 * ffn_out
        return x, write, attn_out, None


def _drop_fused(module: SanaStreamingDiT, _incompatible) -> None:
    module.unfuse_projections()


class SanaStreamingDiT(nn.Module):
    """SANA-Streaming 2B DiT and its smaller siblings, built from a `DiTConfig`."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels + cfg.source_channels, C)
        self.t_embedder = TimestepEmbedder(C, cfg.timestep_freq_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C, cfg.text_len)
        self.attention_y_norm = RMSNorm(C, cfg.qk_norm_eps)
        self.blocks = nn.ModuleList(HybridBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(C, cfg.in_channels, cfg.norm_eps)
        self.rope = RoPE3D(cfg.head_dim, cfg.rope_theta, cfg.rope_max_len)
        self.register_load_state_dict_post_hook(_drop_fused)

    # --- construction helpers ------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 0, release_gates: bool = False) -> SanaStreamingDiT:
        """Deterministic random weights for tests and benchmarks (not a training init).

        Every tensor gets a draw scaled so that each sub-layer contributes visibly; with release_gates the GDN
        gates, output gates and t_conv get the release's "linear-equivalent" training init instead.
        """
        self.unfuse_projections()
        device = self.x_embedder.proj.weight.device
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(shape: torch.Size) -> Tensor:
            return torch.randn(shape, generator=g, device=device)

        for name, p in self.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = 0.2 if "scale_shift_table" in name else (fan_in**-0.5 if p.dim() > 1 else 0.02)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif name.endswith(("A_log", "dt_bias", "beta_proj.bias", "gate_proj.bias")):
                p.copy_(randn(p.shape) * (1.0 if "bias" in name else 0.5))
            else:
                p.copy_(randn(p.shape) * std)
        buf = self.y_embedder.y_embedding
        buf.copy_(randn(buf.shape) * 0.02)
        if release_gates:
            for block in self.blocks:
                a = block.attn
                if isinstance(a, GDNAttention):
                    a.beta_proj.weight.zero_()
                    a.beta_proj.bias.fill_(5.0)
                    a.gate_proj.weight.zero_()
                    a.gate_proj.bias.zero_()
                    a.dt_bias.fill_(-8.0)
                    a.A_log.zero_()
                a.output_gate.weight.zero_()
                a.output_gate.bias.fill_(1.0)
                block.mlp.t_conv.weight.zero_()
        return self

    @torch.no_grad()
    def fuse_projections(self) -> SanaStreamingDiT:
        """Inference: concatenate the projections that read the same input into one weight per layer (GDN: q, k,
        v, output_gate, beta_proj, gate_proj; softmax: q, k, v, output_gate; FFN: t_conv's taps), so each layer
        runs one large GEMM where it ran up to six. Same function, bf16 rounding aside (the GEMMs may tile
        differently); costs a second copy of those weights (~0.8 GB at 2B). `train()`, `load_state_dict` and
        `init_weights` drop the fused copies, so they never go stale; `ChunkRunner` fuses on CUDA."""
        for block in self.blocks:
            block.attn.fuse()
            block.mlp.fuse()
        return self

    def unfuse_projections(self) -> SanaStreamingDiT:
        for block in self.blocks:
            block.attn.unfuse()
            block.mlp.unfuse()
        return self

    @property
    def projections_fused(self) -> bool:
        return self.blocks[0].attn.fused_in_w is not None

    def train(self, mode: bool = True) -> SanaStreamingDiT:
        if mode:
            self.unfuse_projections()
        return super().train(mode)

    def compile_blocks(self, mode: str | None = None) -> SanaStreamingDiT:
        """torch.compile each block (static shapes): fuses the norms, modulation, RoPE and gating around the GEMMs.
        Works with `ChunkRunner`'s CUDA graphs (capture happens after the compiled warm-up)."""
        fast_ops.warm(self.x_embedder.proj.weight.device)  # no op registration inside traced code
        for block in self.blocks:
            block.forward = torch.compile(block.forward, dynamic=False, mode=mode)
        return self

    @property
    def blocks_compiled(self) -> bool:
        return "forward" in self.blocks[0].__dict__

    def uncompile_blocks(self) -> SanaStreamingDiT:
        """Undo `compile_blocks`."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        return self

    def init_non_persistent_buffers(self) -> None:
        """Nothing to rebuild: RoPE tables are plain attributes computed on first use (meta-loading hook)."""

    # --- forward -------------------------------------------------------------------------------------------

    def embed_text(self, text: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        """text (B, L, caption_channels) or (B, 1, L, caption_channels) -> (B, L, C) after y_proj + RMSNorm."""
        if text.dim() == 4:
            text = text.squeeze(1)
        return self.attention_y_norm(self.y_embedder(text.to(self.dtype), drop_mask))

    def text_context(self, text: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every block's cross-attention keys/values for `text` (B, L, caption_channels): what the forwards of a
        chunk share (`forward_step(text_ctx=...)` skips the text projections)."""
        y = self.embed_text(text)
        return [block.cross_attn.text_kv(y) for block in self.blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(
        self,
        x: Tensor,
        source: Tensor,
        timestep: Tensor,
        text: Tensor,
        text_mask: Tensor,
        *,
        cache: DiTCache | None = None,
        save_cache: bool = False,
        start_frame: int | None = None,
        return_intermediates: bool = False,
        cache_only: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]] | None:
        """Flow velocity for one chunk (streaming) or one whole clip (bidirectional).

        Args:
            x: (B, in_channels, T, H, W) noisy latent.  source: (B, source_channels, T, H, W) source latent.
            timestep: (B,) in [0, 1000]; truncated to an integer like the release.
            text: (B, L, caption_channels) or (B, 1, L, caption_channels).  text_mask: (B, L), 1 = token.
            cache: the session's streaming cache (read always, written when save_cache).  None = no history.
            start_frame: absolute frame of x's first frame for RoPE; default cache.next_frame (or 0).
            return_intermediates: also return a dict of inspection tensors (tests).
            cache_only: with save_cache, only update the cache (the t = 0 refresh, `forward_step(cache_only=True)`):
                returns None.

        Returns: velocity (B, in_channels, T, H, W) in the model dtype.
        """
        if cache_only and (cache is None or not save_cache or return_intermediates):
            raise ValueError("cache_only needs a cache and save_cache=True, and returns no intermediates")
        _, _, T, H, W = x.shape
        if start_frame is None:
            start_frame = cache.next_frame if cache is not None else 0
        rope = self.rope.table(start_frame, T, H, W, x.device)
        # Without autograd the window buffers get room for this chunk's keys/values (no concatenation per layer).
        tail = 0 if torch.is_grad_enabled() else T * H * W
        reads = [cache.read(b.index, tail) for b in self.blocks] if cache is not None else None
        v, writes, mids = self.forward_step(
            x, source, timestep, text, text_mask, rope, reads, return_intermediates, cache_only=cache_only
        )
        if cache is not None and save_cache:
            cache.write(writes, T)
        return (v, mids) if return_intermediates else v

    def forward_step(
        self,
        x: Tensor,
        source: Tensor,
        timestep: Tensor,
        text: Tensor | None,
        text_mask: Tensor | None,
        rope: Tensor,
        reads: list[LayerRead] | None = None,
        return_intermediates: bool = False,
        text_ctx: list[tuple[Tensor, Tensor]] | None = None,
        cache_only: bool = False,
    ) -> tuple[Tensor | None, list[LayerWrite], dict[str, Tensor]]:
        """The pure part of `forward`: no cache bookkeeping and no host-side decisions, so it can be captured in a
        CUDA graph and batched across sessions.

        Args: as `forward`, plus
            rope: complex128 (N, D/2) for all samples, or (B, N, D/2) per sample (sessions at different frames).
            reads: per block, what it reads from its session's history (batched along B); None = no history.
            text_ctx: `text_context(text)` computed beforehand (then text may be None).
            text_mask may be None: no padding in any sample's text (the cross-attention runs unmasked).
            cache_only: only the cache writes are wanted (the t = 0 refresh): the velocity is not computed (None)
                and the last block runs its self-attention output, cross-attention and FFN for the last frame
                alone (`HybridBlock.forward`); the writes are those of the full forward.

        Returns: (velocity, per-block writes for the cache, intermediates (empty unless asked)).
        """
        B, _, T, H, W = x.shape
        if source.shape[2:] != x.shape[2:]:
            raise ValueError(f"source latent {tuple(source.shape)} does not match noisy latent {tuple(x.shape)}")
        hw = (T, H, W)
        tokens = self.x_embedder(torch.cat([x, source], dim=1).to(self.dtype))
        t_emb = self.t_embedder(timestep.to(x.device))
        t0 = self.t_block(t_emb)
        y = self.embed_text(text) if text_ctx is None else None
        # The cross-attention bias once for every block; None = no padding (an unmasked attention kernel).
        bias = None if text_mask is None else text_bias(text_mask.to(x.device), self.dtype)
        mids: dict[str, Tensor] = {}
        if return_intermediates:
            mids.update(tokens=tokens, t_emb=t_emb, t0=t0)
            if y is not None:
                mids["y"] = y
        writes: list[LayerWrite] = []
        # The fused GDN and norm + RoPE kernels read fp32 cos / sin tables: build them once for all layers.
        fast = gdn_backend(x.device) == "triton" or fast_ops.ops(x.device) is not None
        rope_cs = fast_ops.rope_cos_sin(rope) if fast else None
        h = tokens
        # On the fused path each block's FFN residual is applied by the next block, with its first LayerNorm.
        defer = fast_ops.ops(x.device) is not None and not return_intermediates
        pending = None
        for i, block in enumerate(self.blocks):
            read = reads[block.index] if reads is not None else LayerRead()
            kv = text_ctx[block.index] if text_ctx is not None else None
            last = cache_only and i == len(self.blocks) - 1
            h, write, attn_out, pending = block(h, y, bias, t0, hw, rope, read, kv, rope_cs, pending, defer, last)
            writes.append(write)
            if return_intermediates:
                mids[f"block{block.index}.self_attn_out"] = attn_out
                mids[f"block{block.index}.out"] = h
        if cache_only:
            return None, writes, mids
        if pending is not None:
            h = fast_ops.ops(x.device).gated_residual(h, pending[1], pending[0])
        out = self.final_layer(h, t_emb)  # (B, N, Cout)
        return out.transpose(1, 2).reshape(B, -1, T, H, W), writes, mids

    def new_cache(self, num_cached_blocks: int = 2, sink_token: bool = True) -> DiTCache:
        return DiTCache(self.cfg.softmax_layer_ids, num_cached_blocks, sink_token)
