"""Configuration dataclasses and named presets.

Three components (DiT, VAE, text encoder) each get a frozen dataclass whose fields document themselves; a
`PresetConfig` ties them together with the default weights locations and the default video geometry.

Presets:
    sana-streaming-2b-ar             the released streaming checkpoint (`sana_streaming_ar.pth`)
    sana-streaming-2b-bidirectional  the released bidirectional checkpoint (`sana_bidirectional_short.pth`)
    tiny                             the same code at small widths/depth, for tests and demos (runs on a CPU)

Non-goals: training hyper-parameters (engine/train), serving policy (services/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
"""Weights shipped with the package (the trained tiny editor)."""


def softmax_layer_indices(depth: int, ratio: float) -> list[int]:
    """The release's rule for which blocks use softmax attention (the others use GDN).

    n = max(1, int(depth * ratio)); step = depth / n; indices int((i + 1) * step) - 1.
    depth 20, ratio 0.25 -> [3, 7, 11, 15, 19].
    """
    n = max(1, int(depth * ratio))
    step = depth / n
    return [int((i + 1) * step) - 1 for i in range(n)]


@dataclass(frozen=True)
class DiTConfig:
    """The hybrid SANA-Streaming DiT (`SanaMSVideoV2V`)."""

    hidden_size: int = 2240
    """Model width C."""
    depth: int = 20
    """Number of blocks."""
    num_heads: int = 20
    """Cross-attention heads (head dim = hidden_size // num_heads)."""
    head_dim: int = 112
    """Self-attention head dim (`linear_head_dim`); self-attention heads = hidden_size // head_dim."""
    in_channels: int = 128
    """Latent channels of the noisy target (and of the velocity out)."""
    source_channels: int = 128
    """Latent channels of the source video, concatenated after the noisy latent (`additional_inchannels`)."""
    caption_channels: int = 2304
    """Text-encoder hidden size (gemma-2-2b-it)."""
    text_len: int = 300
    """Text tokens (`model_max_length`); sizes the null-caption buffer `y_embedding`."""
    mlp_ratio: float = 3.0
    """FFN hidden = int(hidden_size * mlp_ratio)."""
    t_kernel_size: int = 3
    """Temporal conv kernel of the FFN (`t_conv`)."""
    softmax_ratio: float = 0.25
    """Fraction of softmax layers (see `softmax_layer_indices`)."""
    softmax_layers: tuple[int, ...] | None = None
    """Explicit softmax layer indices; None = derived from `softmax_ratio`."""
    streaming: bool = True
    """True: the streaming AR variant (state-cached GDN, cached softmax with 3-tap q/k, causal RoPE).
    False: the bidirectional variant (Linear softmax q/k, whole-clip attention)."""
    input_size: int = 22
    """Only sizes the unused all-zero `pos_embed` buffer of the release (not instantiated here)."""
    rope_theta: float = 10000.0
    rope_max_len: int = 1024
    """RoPE table rows per axis (max latent frames, rows, columns)."""
    timestep_freq_dim: int = 256
    """Sinusoidal timestep feature size."""
    norm_eps: float = 1e-6
    """LayerNorm eps of blocks and final layer; also the cross-attention q/k RMSNorm eps."""
    qk_norm_eps: float = 1e-5
    """Self-attention q/k RMSNorm eps (and the text RMSNorm eps)."""
    gdn_eps: float = 1e-8
    """GDN output num / (den + eps)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        bad = [i for i in self.softmax_layers or () if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"softmax_layers {bad} outside [0, {self.depth})")

    @property
    def self_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def ffn_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def softmax_layer_ids(self) -> tuple[int, ...]:
        if self.softmax_layers is not None:
            return tuple(self.softmax_layers)
        return tuple(softmax_layer_indices(self.depth, self.softmax_ratio))


@dataclass(frozen=True)
class VAEConfig:
    """LTX-2 video VAE (diffusers `AutoencoderKLLTX2Video`)."""

    diffusers_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor kwargs of `AutoencoderKLLTX2Video` (the Lightricks/LTX-2 `vae/config.json` for real presets)."""
    latent_channels: int = 128
    spatial_compression: int = 32
    temporal_compression: int = 8
    decode_tile_latents: int = 4
    """Temporal decode tile length in latent frames (reference: 4, stride 1)."""
    decode_blend_frames: int = 16
    """Pixel frames blended between consecutive decode tiles (reference: 16)."""

    def __post_init__(self) -> None:
        if self.decode_tile_latents < 2:
            raise ValueError("decode_tile_latents must be >= 2")


@dataclass(frozen=True)
class TextConfig:
    """Text encoder (gemma-2-2b-it decoder, last hidden state)."""

    hidden_size: int = 2304
    text_len: int = 300
    """Tokens kept for the DiT: BOS + the last text_len - 1 (prompt with CHI prefix), or the first text_len."""
    use_chi_prompt: bool = True
    gemma_kwargs: dict[str, Any] = field(default_factory=dict)
    """For tiny presets: kwargs of a `Gemma2Config` built in code (random weights unless a file is given)."""


@dataclass(frozen=True)
class PresetConfig:
    """Everything needed to build a runnable editor: components, weights locations, default geometry."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextConfig
    dit_weights: str | None = None
    """hf://owner/repo/path or a local path; None = random init (tests, benchmarks)."""
    bidirectional_dit_weights: str | None = None
    """For presets that run both modes with one config (tiny): the bidirectional DiT's weights."""
    vae_weights: str | None = None
    """hf://owner/repo[/subfolder] of a diffusers VAE, or a local folder/file; None = random init."""
    text_weights: str | None = None
    """hf://owner/repo of the Gemma-2 model (tokenizer too), or a local folder; None = built-in tiny."""
    height: int = 704
    width: int = 1280
    fps: int = 16
    num_frames: int = 969
    steps: int = 4
    flow_shift: float = 8.0
    cfg_scale: float = 1.0
    num_cached_blocks: int = 2
    sink_token: bool = True
    dtype: str = "bfloat16"
    """Inference dtype on accelerators ("bfloat16"); CPUs run float32 unless asked."""

    def config_hash(self) -> str:
        """Hash of everything that fixes the shape and meaning of per-session state (snapshots check it)."""
        payload = {
            "dit": dataclasses.asdict(self.dit),
            "vae": dataclasses.asdict(self.vae),
            "text": {"hidden_size": self.text.hidden_size, "text_len": self.text.text_len},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- the released LTX-2 VAE (Lightricks/LTX-2, vae/config.json) ---------------------------------------------

LTX2_VAE_KWARGS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=128,
    block_out_channels=(256, 512, 1024, 2048),
    down_block_types=("LTX2VideoDownBlock3D",) * 4,
    decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    timestep_conditioning=False,
    patch_size=4,
    patch_size_t=1,
    resnet_norm_eps=1e-6,
    scaling_factor=1.0,
    encoder_causal=True,
    decoder_causal=False,
    encoder_spatial_padding_mode="zeros",
    decoder_spatial_padding_mode="reflect",
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)

# Same class and stage layout, small widths: 32x spatial and 8x temporal compression like the real one. 64 latent
# channels (the real: 128); the encoder's full-resolution stage (whose width is the latent width in this class) has
# no resnet and the decoder's none at full resolution, which keeps CPU inference cheap (~5.3M parameters).
TINY_VAE_KWARGS: dict[str, Any] = dict(
    LTX2_VAE_KWARGS,
    latent_channels=64,
    block_out_channels=(16, 32, 64, 128),
    decoder_block_out_channels=(32, 64, 128),  # must double per stage like the real (256, 512, 1024)
    layers_per_block=(0, 1, 1, 1, 1),
    decoder_layers_per_block=(0, 1, 1, 1),
)

TINY_GEMMA_KWARGS: dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=2048,
    sliding_window=256,
    query_pre_attn_scalar=32,
)

_AR_DIT = DiTConfig(streaming=True)
_BIDI_DIT = DiTConfig(streaming=False)
_TINY_DIT = DiTConfig(
    hidden_size=128,
    depth=4,
    num_heads=4,
    head_dim=32,
    in_channels=64,
    source_channels=64,
    caption_channels=64,
    text_len=64,
    streaming=True,
)

_REAL_VAE = VAEConfig(diffusers_kwargs=LTX2_VAE_KWARGS)
_REAL_TEXT = TextConfig()

PRESETS: dict[str, PresetConfig] = {
    "sana-streaming-2b-ar": PresetConfig(
        name="sana-streaming-2b-ar",
        dit=_AR_DIT,
        vae=_REAL_VAE,
        text=_REAL_TEXT,
        dit_weights="hf://Efficient-Large-Model/SANA-Streaming/dit/sana_streaming_ar.pth",
        vae_weights="hf://Lightricks/LTX-2/vae",
        text_weights="hf://Efficient-Large-Model/gemma-2-2b-it",
    ),
    "sana-streaming-2b-bidirectional": PresetConfig(
        name="sana-streaming-2b-bidirectional",
        dit=_BIDI_DIT,
        vae=_REAL_VAE,
        text=_REAL_TEXT,
        dit_weights="hf://Efficient-Large-Model/SANA-Streaming_bidirectional/dit/sana_bidirectional_short.pth",
        vae_weights="hf://Lightricks/LTX-2/vae",
        text_weights="hf://Efficient-Large-Model/gemma-2-2b-it",
        num_frames=81,
        steps=50,
        cfg_scale=6.0,
        flow_shift=8.0,
    ),
    "tiny": PresetConfig(
        name="tiny",
        # Trained in-repo on procedural clips (engine/train/recipe.py; loadtest/results/train_tiny.md).
        dit_weights=str(ASSETS / "tiny" / "dit_streaming.safetensors"),
        bidirectional_dit_weights=str(ASSETS / "tiny" / "dit_bidirectional.safetensors"),
        vae_weights=str(ASSETS / "tiny" / "vae.safetensors"),
        text_weights=str(ASSETS / "tiny" / "text"),
        dit=_TINY_DIT,
        vae=VAEConfig(diffusers_kwargs=TINY_VAE_KWARGS, latent_channels=64),
        text=TextConfig(hidden_size=64, text_len=64, gemma_kwargs=TINY_GEMMA_KWARGS),
        height=128,
        width=192,
        fps=16,
        num_frames=49,
        dtype="float32",
    ),
}


def get_preset(name: str) -> PresetConfig:
    """Look up a named preset; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
