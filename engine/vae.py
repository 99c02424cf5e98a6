"""LTX-2 video VAE (diffusers `AutoencoderKLLTX2Video`): whole-clip and streaming encode, tiled and streaming
decode.

Scope:
    * `VideoVAE` builds the diffusers model from a `VAEConfig` (random init, a hub repo, a local folder or a
      .safetensors file) and applies the reference latent normalisation (SANA_STREAMING.md section 5):
      encode z = (posterior.mode() - latents_mean) * scaling_factor / latents_std, decode the inverse, per
      channel in the latent dtype. `latents_mean` / `latents_std` are the model's persistent buffers (they
      ship in the checkpoint's state dict; random init leaves them 0 / 1).
    * Causal streaming encode with a per-session cache (`encode_step`, `StreamingEncoder`).
    * The reference chunk-tiled temporal decode (`decode`) and its streaming form (`decode_step`).

Non-goals: spatial tiling (the reference does none), posterior sampling (the reference takes the mode),
timestep-conditioned or noise-injecting decoders (LTX-Video 0.9.x; LTX-2 uses neither), training.

Streaming encode
----------------
The encoder is causal: every temporal conv (kernel 3) pads on the left with copies of its first input frame,
and everything else (RMS/LayerNorm over channels, 1x1 shortcuts, patchify) acts per frame. The temporal
downsamplers (stride 2) prepend one copy of their first input frame, then fold frame pairs into channels. So a
clip of F = 8k + 1 frames can be fed as 1 frame, then 8 frames at a time, each step yielding one latent frame:
    * each `LTX2VideoCausalConv3d` of the encoder keeps the last 2 frames of its (padded) input as context and
      prepends it to the next step's input instead of the replicated first frame;
    * each temporal downsampler prepends its duplicated frame only in the first step (later steps hold an even
      number of frames at every level, 8 -> 4 -> 2 -> 1, so pairs line up with the whole-clip pairing).
Our subclasses of those two diffusers modules do this; they are installed by swapping the classes of the
encoder's instances (parameter names unchanged) and read the active step from a `ContextVar`, so outside
`encode_step` (and in other threads) the diffusers code runs untouched.

Encoder state (dict[str, Tensor], keys fixed after the first step):
    "frames"        int64 ()     pixel frames consumed so far
    "geometry"      int64 (3,)   (B, H, W) of the session, fixed by its first step
    "ctx.<module>"  (B, C_l, 2, H_l, W_l) in the VAE dtype: the last two input frames of each causal conv,
                    keyed by its module path in the encoder (e.g. "ctx.down_blocks.1.resnets.0.conv1")
A step takes n frames with n = 1 (mod 8) for the first step and n = 0 (mod 8) after it (1 then 8s in the
reference cadence; a multiple of 8 is the same as that many single steps).
Size at 1280x704, batch 1 (`encoder_state_shapes`): 46 conv caches, 897 MiB in bf16, dominated by the
full-rate 128- to 512-channel stages; budget it per session.

Measured on one H100, LTX-2 shapes, random weights, 704x1280 (2026-11-23): bf16 `encode_step` of 8 frames
57 ms (whole 17-frame `encode` 117 ms); fp32 with TF32 off, steps 1, 8, 8 equal the whole-clip encode bit for
bit; in bf16 they differ by bf16 rounding (max 0.016, mean 0.0025 on latents of std 0.32: cuDNN picks other
kernels for other lengths). One decode tile (4 latents -> 25 frames) ~120 ms in bf16; streaming decode equals
`decode` bit for bit.

Chunk-wise decode (the reference scheme, section 5)
---------------------------------------------------
Latent tiles [i, i + 4) for i = 0, 1, ... (shorter at the end) are decoded on their own (non-causally) into
(len - 1) * 8 + 1 frames; for i > 0 the first frame is dropped and the first e = min(16, len_prev, len)
frames are blended with the end of the previous tile, new[x] = old[-e + x] * (1 - x / e) + new[x] * (x / e),
in place, so the previous tile's own blend cascades into the next. Tile 0 keeps its first 9 frames, tile
i > 0 its first 8, and the result has (T - 1) * 8 + 1 frames. A tile of a single latent (i = T - 1 > 0) keeps
no frame, so it is skipped (the reference decodes it and throws it away; the output is identical).

Streaming decode release schedule (tile length L = 4, temporal compression 8): tile i can be decoded once
latent i + 3 is in, and its kept frames are final at once (a later tile blends into its own frames, never
into earlier ones). With n latent frames received so far (not final), the released pixel frames are
    [0, 8 n - 23)   for n >= 4 (none before),
and `final=True` releases the rest, up to (T - 1) * 8 + 1. Tile i releases frames [8 i + 1, 8 i + 9) (tile 0:
[0, 9)), i.e. the frames of latent i + 1. Latency: the frames of latent j wait for latent j + 2 (frame 0 for
latent 3). With the reference chunks of 5, 3, 3, ... latent frames, chunk 0 releases 17 frames, every later
chunk 24 and the final flush the last 16: the last 16 of each chunk's 24 frames wait for the next chunk (one
chunk period, 1 s at 24 fps), and every latent frame is decoded 4 times. 5, 3, 3 + final: 17, 24, 24, 16.

Decoder state (dict[str, Tensor]):
    "latents_in"  int64 ()              latent frames received
    "tiles_done"  int64 ()              next tile index i
    "final"       int64 ()              1 once flushed
    "latents"     (B, C, <= 3, h, w)    normalised latents [tiles_done, latents_in) still needed
    "tail"        (B, 3, <= 16, H, W)   the previous tile's last (blended) frames, once a tile is decoded
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLLTX2Video
from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoCausalConv3d, LTX2VideoDownsampler3d
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from engine.config import VAEConfig

__all__ = ["StreamingEncoder", "VideoVAE", "blend_t", "encoder_state_shapes", "state_nbytes"]

Tensor = torch.Tensor
State = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------------------
# streaming hooks on the diffusers encoder modules


@dataclass
class _EncodeStep:
    """The encode step running in this context: where the cached convs read and write their context."""

    state: State
    first: bool
    new_state: State = field(default_factory=dict)


_ACTIVE_STEP: ContextVar[_EncodeStep | None] = ContextVar("engine_vae_active_encode_step", default=None)


class _CachedCausalConv3d(LTX2VideoCausalConv3d):
    """`LTX2VideoCausalConv3d` taking its temporal left context from the session state in `encode_step`."""

    _cache_key: str

    def forward(self, hidden_states: Tensor, causal: bool = True) -> Tensor:
        step = _ACTIVE_STEP.get()
        pad = self.kernel_size[0] - 1
        if step is None or pad == 0:
            return super().forward(hidden_states, causal=causal)
        ctx = None if step.first else step.state[self._cache_key]
        if ctx is None:  # first step: the causal replicate padding of the whole-clip path
            ctx = hidden_states[:, :, :1].repeat(1, 1, pad, 1, 1)
        x = torch.cat([ctx, hidden_states], dim=2)
        step.new_state[self._cache_key] = x[:, :, -pad:].clone()
        return self.conv(x)


def _space_to_depth(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, C * st * sh * sw, T / st, H / sh, W / sw), the diffusers downsampler's order."""
    x = x.unflatten(4, (-1, stride[2])).unflatten(3, (-1, stride[1])).unflatten(2, (-1, stride[0]))
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(1, 4)


class _StreamingDownsampler3d(LTX2VideoDownsampler3d):
    """`LTX2VideoDownsampler3d` that duplicates its first frame only in the first streaming step."""

    def forward(self, hidden_states: Tensor, causal: bool = True) -> Tensor:
        step = _ACTIVE_STEP.get()
        if step is None or step.first or self.stride[0] == 1:
            return super().forward(hidden_states, causal=causal)
        assert hidden_states.shape[2] % self.stride[0] == 0, "later encode steps carry whole frame pairs"
        residual = _space_to_depth(hidden_states, self.stride).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return _space_to_depth(self.conv(hidden_states, causal=causal), self.stride) + residual


def _install_streaming(encoder: torch.nn.Module) -> tuple[tuple[str, ...], str | None]:
    """Swap the encoder's causal convs and downsamplers to the streaming subclasses.

    Returns (state keys of the cached convs, reason streaming is unsupported or None).
    """
    keys: list[str] = []
    unsupported = None
    for name, module in encoder.named_modules():
        if type(module) is LTX2VideoCausalConv3d:
            if module.conv.stride[0] != 1 or module.conv.dilation[0] != 1:
                unsupported = f"causal conv {name} has temporal stride/dilation != 1"
            module.__class__ = _CachedCausalConv3d
            module._cache_key = f"ctx.{name}"
            if module.kernel_size[0] > 1:
                keys.append(module._cache_key)
        elif type(module) is LTX2VideoDownsampler3d:
            module.__class__ = _StreamingDownsampler3d
    return tuple(keys), unsupported


def _encoder_compression(model: AutoencoderKLLTX2Video) -> tuple[int, int]:
    """(spatial, temporal) compression the encoder's architecture actually performs."""
    spatial, temporal = model.config.patch_size, model.config.patch_size_t
    for block in model.encoder.down_blocks:
        for down in block.downsamplers or ():
            stride = down.stride if isinstance(down, LTX2VideoDownsampler3d) else down.conv.stride
            temporal, spatial = temporal * stride[0], spatial * stride[1]
    return spatial, temporal


# ------------------------------------------------------------------------------------------------------------
# helpers


def blend_t(old: Tensor, new: Tensor, blend_frames: int) -> Tensor:
    """Reference temporal blend, IN PLACE into `new` (B, C, F, H, W); returns `new`.

    e = min(old frames, new frames, blend_frames);
    for x < e: new[x] = old[-e + x] * (1 - x / e) + new[x] * (x / e).
    """
    e = min(old.shape[2], new.shape[2], blend_frames)
    for x in range(e):
        new[:, :, x] = old[:, :, -e + x] * (1 - x / e) + new[:, :, x] * (x / e)
    return new


def state_nbytes(state: State) -> int:
    """Bytes held by the tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _scalar(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _load_model(cfg: VAEConfig, weights: str | None, dtype: torch.dtype, seed: int) -> AutoencoderKLLTX2Video:
    """Build or load the diffusers model on the CPU (float32 for random init, `dtype` for loaded weights)."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoencoderKLLTX2Video(**cfg.diffusers_kwargs)
    if weights.startswith("hf://"):
        parts = weights[len("hf://") :].strip("/").split("/")
        if len(parts) < 2:
            raise ValueError(f"expected hf://owner/repo[/subfolder], got {weights!r}")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        if sub.endswith(".safetensors"):
            from huggingface_hub import hf_hub_download

            return _load_safetensors(cfg, hf_hub_download(repo, sub))
        return AutoencoderKLLTX2Video.from_pretrained(repo, subfolder=sub or None, torch_dtype=dtype)
    path = Path(weights)
    if path.is_dir():
        return AutoencoderKLLTX2Video.from_pretrained(path, torch_dtype=dtype)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_safetensors(cfg, path)
    raise FileNotFoundError(
        f"VAE weights {weights!r}: expected hf://owner/repo[/subfolder], a folder or a .safetensors"
    )


def _load_safetensors(cfg: VAEConfig, path: str | Path) -> AutoencoderKLLTX2Video:
    """Build on the meta device and assign the file's tensors (no random init, no copy)."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = AutoencoderKLLTX2Video(**cfg.diffusers_kwargs)
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the VAE config: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model


# ------------------------------------------------------------------------------------------------------------
# the VAE


class VideoVAE:
    """The LTX-2 VAE with the reference normalisation, streaming encode and tiled / streaming decode.

    Video tensors are (B, 3, F, H, W) in [-1, 1]; latents (B, C, T, h, w) normalised, T = (F - 1) / 8 + 1,
    h = H / 32, w = W / 32 (the config's compression factors).
    """

    def __init__(
        self,
        cfg: VAEConfig,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        """
        Args:
            cfg: the component config; `cfg.diffusers_kwargs` are the `AutoencoderKLLTX2Video` kwargs.
            weights: None = deterministic random init from `seed`; "hf://owner/repo/subfolder" (or
                ".../file.safetensors"); a local diffusers folder; a local .safetensors state dict.
        """
        kwargs = cfg.diffusers_kwargs
        if kwargs.get("timestep_conditioning") or any(_as_tuple(kwargs.get("decoder_inject_noise", False))):
            raise ValueError("timestep-conditioned or noise-injecting VAE decoders are not supported")
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = _load_model(cfg, weights, dtype, seed)
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even though this class keeps no
        # module in float32 (`_keep_in_fp32_modules` is empty).
        torch.nn.Module.to(self.model, device=self.device, dtype=dtype)
        self.model.eval().requires_grad_(False)

        conf = self.model.config
        self.latent_channels: int = conf.latent_channels
        self.spatial_compression, self.temporal_compression = _encoder_compression(self.model)
        expected = (cfg.latent_channels, cfg.spatial_compression, cfg.temporal_compression)
        if (self.latent_channels, self.spatial_compression, self.temporal_compression) != expected:
            raise ValueError(
                f"VAE model has {self.latent_channels} latent channels, {self.spatial_compression}x spatial "
                f"and {self.temporal_compression}x temporal compression; the config says {expected}"
            )
        self.scaling_factor = float(conf.scaling_factor)
        self._ctx_keys, self._stream_unsupported = _install_streaming(self.model.encoder)

    # ----- shapes

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of a clip's latents; ValueError unless F = 8k + 1 and H, W are multiples of 32."""
        self._check_geometry(num_frames, height, width, first=True)
        s = self.spatial_compression
        return (self.latent_channels, self.num_latent_frames(num_frames), height // s, width // s)

    def num_latent_frames(self, num_frames: int) -> int:
        """T = (F - 1) / 8 + 1 for F = 8k + 1."""
        return (num_frames - 1) // self.temporal_compression + 1

    def num_pixel_frames(self, num_latents: int) -> int:
        """F = (T - 1) * 8 + 1 frames decoded from T latent frames."""
        if num_latents < 1:
            raise ValueError(f"need at least one latent frame, got {num_latents}")
        return (num_latents - 1) * self.temporal_compression + 1

    def _check_geometry(self, num_frames: int, height: int, width: int, first: bool) -> None:
        tc, s = self.temporal_compression, self.spatial_compression
        if height % s or width % s or height <= 0 or width <= 0:
            raise ValueError(f"frame size {height}x{width} (HxW) must be positive multiples of {s}")
        if first and num_frames % tc != 1:
            raise ValueError(f"got {num_frames} frames; a clip (or first step) needs F = {tc}k + 1 frames")
        if not first and (num_frames <= 0 or num_frames % tc):
            raise ValueError(f"got {num_frames} frames; every step after the first takes a multiple of {tc}")

    def _check_video(self, video: Tensor, first: bool) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video (B, 3, F, H, W), got {tuple(video.shape)}")
        self._check_geometry(video.shape[2], video.shape[3], video.shape[4], first)

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, T, h, w), got {tuple(latents.shape)}")

    # ----- normalisation

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        return (
            self.model.latents_mean.view(shape).to(like.device, like.dtype),
            self.model.latents_std.view(shape).to(like.device, like.dtype),
        )

    def _normalize(self, moments: Tensor) -> Tensor:
        """Encoder moments (B, 2C, T, h, w) -> normalised latents (B, C, T, h, w) (posterior mode)."""
        z = DiagonalGaussianDistribution(moments).mode()
        mean, std = self._stats(z)
        return (z - mean) * self.scaling_factor / std

    def _denormalize(self, latents: Tensor) -> Tensor:
        mean, std = self._stats(latents)
        return (latents * std / self.scaling_factor + mean).to(self.dtype)

    # ----- encode

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Whole clip, causal: video (B, 3, F, H, W) in [-1, 1], F = 8k + 1 -> latents (B, C, k + 1, h, w)."""
        self._check_video(video, first=True)
        moments = self.model.encode(video.to(self.device, self.dtype), causal=True).latent_dist.parameters
        return self._normalize(moments)

    def encoder_init_state(self) -> State:
        """Fresh per-session encoder state (see the module docstring for its layout)."""
        return {"frames": _scalar(0)}

    @torch.no_grad()
    def encode_step(self, frames: Tensor, state: State) -> tuple[Tensor, State]:
        """One causal step: frames (B, 3, n, H, W) -> (latents (B, C, t, h, w), new state); `state` is kept.

        First step n = 8m + 1 (the reference: 1) -> t = m + 1; later n = 8m (the reference: 8) -> t = m.
        """
        if self._stream_unsupported:
            raise NotImplementedError(f"streaming encode is not supported for this VAE: {self._stream_unsupported}")
        seen = int(state["frames"])
        first = seen == 0
        self._check_video(frames, first=first)
        geometry = (frames.shape[0], frames.shape[3], frames.shape[4])
        if not first:
            missing = [k for k in (*self._ctx_keys, "geometry") if k not in state]
            if missing:
                raise ValueError(f"encoder state lacks {len(missing)} entries (e.g. {missing[0]}): not from this VAE")
            if tuple(state["geometry"].tolist()) != geometry:
                raise ValueError(
                    f"frames (B, H, W) = {geometry} do not match the session's {tuple(state['geometry'].tolist())}"
                )
        step = _EncodeStep(state=state, first=first)
        token = _ACTIVE_STEP.set(step)
        try:
            moments = self.model.encoder(frames.to(self.device, self.dtype), causal=True)
        finally:
            _ACTIVE_STEP.reset(token)
        new_state = {
            "frames": _scalar(seen + frames.shape[2]),
            "geometry": torch.tensor(geometry, dtype=torch.int64),
            **step.new_state,
        }
        return self._normalize(moments), new_state

    # ----- decode

    def _decode_tile(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, t, h, w) -> (B, 3, (t - 1) * 8 + 1, H, W), decoded on their own."""
        return self.model.decoder(self._denormalize(latents).contiguous(), None, causal=False)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Reference chunk-tiled decode (offline): latents (B, C, T, h, w) -> video (B, 3, 8T - 7, H, W)."""
        self._check_latents(latents)
        num_latents, total = latents.shape[2], self.num_pixel_frames(latents.shape[2])
        tile_len, tc = self.cfg.decode_tile_latents, self.temporal_compression
        video: Tensor | None = None  # filled tile by tile: only two tiles are alive at a time
        pos = 0
        prev: Tensor | None = None
        for i in range(num_latents):
            if i > 0 and num_latents - i < 2:
                break  # a one-latent tile keeps no frame once its first is dropped
            tile = self._decode_tile(latents[:, :, i : i + tile_len])
            if prev is None:
                keep = tile[:, :, : tc + 1]
                b, c, _, h, w = tile.shape
                video = tile.new_empty((b, c, total, h, w))
            else:
                tile = blend_t(prev, tile[:, :, 1:], self.cfg.decode_blend_frames)
                keep = tile[:, :, :tc]
            n = min(keep.shape[2], total - pos)
            video[:, :, pos : pos + n] = keep[:, :, :n]
            pos += n
            prev = tile
        assert video is not None and pos == total
        return video

    def decoder_init_state(self) -> State:
        """Fresh per-session decoder state (see the module docstring for its layout)."""
        return {"latents_in": _scalar(0), "tiles_done": _scalar(0), "final": _scalar(0)}

    @torch.no_grad()
    def decode_step(self, latent_chunk: Tensor | None, state: State, final: bool = False) -> tuple[Tensor, State]:
        """Feed latents (B, C, t, h, w) (t may be 0; None = no new latents, e.g. a final flush)
        -> (frames (B, 3, n, H, W) that are now final, new state).

        Equals `decode` on the concatenation of every chunk (same ops on the same tiles). `final=True` ends
        the stream and releases every remaining frame. `state` is not modified.
        """
        if int(state["final"]):
            raise ValueError("decoder stream already finished (final=True was given)")
        if latent_chunk is None:
            if "latents" not in state:
                raise ValueError("decode_step(None, ...) on a stream that received no latent frames")
            latent_chunk = state["latents"][:, :, :0]
        self._check_latents(latent_chunk)
        tile_len, tc = self.cfg.decode_tile_latents, self.temporal_compression
        done = int(state["tiles_done"])
        num_latents = int(state["latents_in"]) + latent_chunk.shape[2]
        if final and num_latents == 0:
            raise ValueError("final=True on a stream that received no latent frames")
        held = state.get("latents")
        buf = latent_chunk if held is None else torch.cat([held.to(latent_chunk), latent_chunk], dim=2)
        tail = state.get("tail")

        out: list[Tensor] = []
        i = done
        while i + tile_len <= num_latents or (final and i < num_latents and (i == 0 or num_latents - i >= 2)):
            tile = self._decode_tile(buf[:, :, i - done : i - done + tile_len])
            if tail is None:
                out.append(tile[:, :, : tc + 1])
            else:
                tile = blend_t(tail, tile[:, :, 1:], self.cfg.decode_blend_frames)
                out.append(tile[:, :, :tc])
            tail = tile[:, :, -self.cfg.decode_blend_frames :].clone()
            i += 1
        if final:
            i = num_latents

        new_state = {
            "latents_in": _scalar(num_latents),
            "tiles_done": _scalar(i),
            "final": _scalar(int(final)),
            "latents": buf[:, :, i - done :].clone(),
        }
        if tail is not None:
            new_state["tail"] = tail
        b, _, _, h, w = latent_chunk.shape
        s = self.spatial_compression
        frames = torch.cat(out, dim=2) if out else latent_chunk.new_empty((b, 3, 0, h * s, w * s), dtype=self.dtype)
        return frames, new_state

    def decoder_state_bytes(self, batch: int, height: int, width: int) -> int:
        """Steady-state decoder state bytes: 3 held latent frames + 16 blended pixel frames (VAE dtype)."""
        s, item = self.spatial_compression, torch.empty((), dtype=self.dtype).element_size()
        latents = batch * self.latent_channels * (self.cfg.decode_tile_latents - 1) * (height // s) * (width // s)
        pixels = batch * 3 * self.cfg.decode_blend_frames * height * width
        return (latents + pixels) * item + 3 * 8


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# ------------------------------------------------------------------------------------------------------------
# conveniences


class StreamingEncoder:
    """Causal encoder for any number of frames per call: buffers until a step (1 frame, then 8s) is complete.

    `push(frames)` returns the latent frames completed by those frames (possibly none). Frames left over at
    the end of a stream (fewer than 8) produce no latent; the reference only encodes 8k + 1 frames.
    """

    def __init__(self, vae: VideoVAE, state: State | None = None) -> None:
        """`state`: None for a new session, or a dict from `state_dict()` to resume one."""
        self.vae = vae
        state = dict(state) if state is not None else vae.encoder_init_state()
        pending = state.pop("pending", None)
        self._pending = pending if pending is not None and pending.numel() else None
        self.state = state

    @property
    def frames_in(self) -> int:
        """Frames pushed so far (encoded or pending)."""
        return int(self.state["frames"]) + self.pending_frames

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else self._pending.shape[2]

    def push(self, frames: Tensor) -> Tensor:
        """frames (B, 3, n, H, W) in [-1, 1], any n >= 0 -> latents (B, C, t, h, w), t >= 0."""
        buf = frames if self._pending is None else torch.cat([self._pending.to(frames), frames], dim=2)
        tc = self.vae.temporal_compression
        n = buf.shape[2]
        take = (1 + (n - 1) // tc * tc if n else 0) if int(self.state["frames"]) == 0 else n // tc * tc
        self._pending = buf[:, :, take:].clone() if take < n else None
        if take == 0:
            b, _, _, h, w = buf.shape
            s = self.vae.spatial_compression
            return buf.new_empty((b, self.vae.latent_channels, 0, h // s, w // s), dtype=self.vae.dtype)
        latents, self.state = self.vae.encode_step(buf[:, :, :take], self.state)
        return latents

    def state_dict(self) -> State:
        """The encoder state plus the pending frames ("pending", (B, 3, <8, H, W) or empty)."""
        pending = self._pending if self._pending is not None else torch.empty(0)
        return {**self.state, "pending": pending}


def encoder_state_shapes(cfg: VAEConfig, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the encoder state after a first step at this geometry, found on the meta device (no compute).

    Use with the element size of the inference dtype to budget snapshot bytes (e.g. at 1280x704).
    """
    with torch.device("meta"):
        model = AutoencoderKLLTX2Video(**cfg.diffusers_kwargs)
    _install_streaming(model.encoder)
    step = _EncodeStep(state={}, first=True)
    token = _ACTIVE_STEP.set(step)
    try:
        with torch.no_grad():
            model.encoder(torch.empty((batch, 3, 1, height, width), device="meta"), causal=True)
    finally:
        _ACTIVE_STEP.reset(token)
    return {"frames": (), "geometry": (3,), **{k: tuple(v.shape) for k, v in step.new_state.items()}}
