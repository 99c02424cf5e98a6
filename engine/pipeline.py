"""Streaming video-to-video editing: encode -> DiT chunk loop -> decode, one session at a time.

`Engine` holds the three models of a preset (DiT, VAE, text encoder). `StreamingEditor` runs sessions on it and
exposes the three stages separately so the cluster can put them in different processes:

    encode(state, frames)      pixel frames in (any count) -> source latents ready (causal VAE, 1 then 8 frames/latent)
    generate(state, latents)   source latents in -> edited latents of every finished chunk
    decode(state, latents)     edited latents in -> pixel frames that can no longer change
    push / finish              the three in a row (one process)

Chunking follows the release: 3 latent frames (24 pixel frames) per chunk; when the input length is known the
first chunk takes 3 + (T mod 3) frames, otherwise (live streams) 3, and the last chunk takes what is left. Per
chunk: the denoising forwards read the cache, then one t = 0 forward on the clean chunk writes it (skipped for
the last chunk of a known-length input); with `efficient_cache` the last denoising step writes it instead.

Noise: latent frame f of a session gets its own draw from a CPU generator seeded by (seed, f), so the output does
not depend on how the stream was cut into calls, and a restored session needs no generator state. (The release
draws one tensor for the whole clip up front, which a live stream cannot do.)

The input is padded at the end by repeating its last frame up to the next 8k+1 frames for the VAE, and the output
trimmed back to the input length: every input frame gets an edited frame.

Non-goals: transport, scheduling of many sessions (services/), batching across sessions (a later step).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.config import PRESETS, PresetConfig, get_preset
from engine.model.cache import DiTCache
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import CHUNK_FRAMES, StreamingSchedule, cfg_combine, chunk_bounds, make_bidirectional_scheduler
from engine.session import SessionSettings, SessionState
from engine.step import ChunkJob, ChunkRunner
from engine.text import TextEncoder
from engine.vae import VideoVAE
from engine.video_io import frames_to_tensor, frames_to_uint8
from engine.weights import load_model

MODES = ("long_streaming", "bidirectional_short")


def preset_for_mode(preset: str | PresetConfig, mode: str) -> PresetConfig:
    """The preset to run `mode` with: the 2B presets map to their released checkpoint; small presets switch the
    DiT's variant (same code, streaming=False for bidirectional)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    want_streaming = mode == "long_streaming"
    if cfg.dit.streaming == want_streaming:
        return cfg
    twin = {"sana-streaming-2b-ar": "sana-streaming-2b-bidirectional"}
    twin.update({v: k for k, v in twin.items()})
    if cfg.name in twin:
        return PRESETS[twin[cfg.name]]
    # Same config, the other variant: its weights (if shipped) swap places with the streaming ones.
    weights = cfg.bidirectional_dit_weights if not want_streaming else cfg.dit_weights
    other = cfg.dit_weights if not want_streaming else cfg.bidirectional_dit_weights
    return dataclasses.replace(
        cfg,
        dit=dataclasses.replace(cfg.dit, streaming=want_streaming),
        dit_weights=weights,
        bidirectional_dit_weights=other,
    )


def frame_noise(seed: int, start: int, count: int, shape: tuple[int, int, int]) -> Tensor:
    """(1, C, count, h, w) fp32 noise for latent frames [start, start + count), each from its own seeded draw."""
    draws = []
    for f in range(start, start + count):
        key = int.from_bytes(hashlib.sha256(f"{seed}:{f}".encode()).digest()[:8], "little") & (2**63 - 1)
        draws.append(torch.randn(shape, generator=torch.Generator().manual_seed(key)))
    return torch.stack(draws, dim=1)[None]


PARTS = ("encoder", "generator", "decoder")
"""Per-stage parts of a session (`StreamingEditor.open_part`)."""


def prompt_conditioning(text: TextEncoder, settings: SessionSettings) -> dict[str, Tensor]:
    """What a session's DiT reads for its prompt: {"embeds", "mask"} (+ "neg_embeds", "neg_mask" with CFG),
    exactly as `StreamingEditor.open` / `set_prompt` compute them. Raises `PromptTooLongError`."""
    embeds, mask = text.encode([settings.prompt])
    out = {"embeds": embeds, "mask": mask}
    if settings.cfg_scale > 1.0:
        # The release truncates negative prompts silently (plain encode, max_length L); so do we.
        neg, neg_mask = text.encode_plain([settings.negative_prompt], truncate=True)
        out.update(neg_embeds=neg, neg_mask=neg_mask)
    return out


@dataclass
class Engine:
    """The models of one preset on one device."""

    preset: PresetConfig
    dit: SanaStreamingDiT
    vae: VideoVAE
    text: TextEncoder
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(
        cls,
        preset: str | PresetConfig = "tiny",
        *,
        mode: str = "long_streaming",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        dit_weights: str | None = None,
        vae_weights: str | None = None,
        text_weights: str | None = None,
        seed: int = 0,
    ) -> Engine:
        """Build the preset's models; weights default to the preset's locations (None there = random init)."""
        cfg = preset_for_mode(preset, mode)
        device = torch.device(device)
        if dtype is None:
            dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
        dit_uri = dit_weights or cfg.dit_weights
        if dit_uri:
            dit = load_model(lambda: SanaStreamingDiT(cfg.dit), dit_uri, device=device, dtype=dtype)
        else:
            dit = SanaStreamingDiT(cfg.dit).init_weights(seed=seed).to(device=device, dtype=dtype)
        vae = VideoVAE(cfg.vae, vae_weights or cfg.vae_weights, device=device, dtype=dtype, seed=seed)
        text = TextEncoder(cfg.text, text_weights or cfg.text_weights, device=device, dtype=dtype)
        return cls(cfg, dit.eval(), vae, text, device, dtype)


class StreamingEditor:
    """Runs streaming edit sessions on an `Engine`; every per-session tensor lives in the `SessionState`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config_hash = engine.preset.config_hash()
        # Stage-only engines (the cluster's ingest/egress replicas) hold no DiT.
        self.runner = ChunkRunner(engine.dit) if engine.dit is not None else None

    # --- sessions -----------------------------------------------------------------------------------------

    def open(self, settings: SessionSettings) -> SessionState:
        """A fresh session with every stage's state: prompt encoded, empty caches."""
        return self._new_state(settings, PARTS)

    def set_prompt(self, state: SessionState, prompt: str) -> None:
        """Change the instruction; it takes effect from the next chunk the DiT starts."""
        text = prompt_conditioning(self.engine.text, dataclasses.replace(state.settings, prompt=prompt))
        self.set_prompt_text(state, prompt, text)

    def restore(self, blob: bytes) -> SessionState:
        return SessionState.restore(blob, self.config_hash, self.engine.device)

    # --- one stage's part of a session (the stages in separate processes) --------------------------------

    def _on_device(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """Prompt tensors computed elsewhere (another process hands them over on the CPU) on the engine's device."""
        return {k: v.to(self.engine.device) for k, v in text.items()}

    def open_part(self, settings: SessionSettings, part: str, text: dict[str, Tensor] | None = None) -> SessionState:
        """A fresh session holding only one stage's state, for running the stages in separate processes.

        part "encoder": VAE encoder cache (+ pending frames) for `encode`; "generator": DiT cache + prompt
        embeddings for `generate` (`text` as from `prompt_conditioning`, else encoded here); "decoder": VAE
        decoder context for `decode`. The other parts stay empty, so only the models of that stage are touched
        (the engine may hold only those). Cursor fields of the other stages stay 0: before a final `decode` set
        `state.cursor.frames_in` to the pixel frames the encoder received (the output is trimmed to it)."""
        if part not in PARTS:
            raise ValueError(f"unknown session part {part!r}; expected one of {', '.join(PARTS)}")
        return self._new_state(settings, (part,), text)

    def _new_state(
        self, settings: SessionSettings, parts: tuple[str, ...], text: dict[str, Tensor] | None = None
    ) -> SessionState:
        e = self.engine
        if "encoder" in parts:
            sc = e.vae.cfg.spatial_compression
            if settings.height % sc or settings.width % sc:
                raise ValueError(f"height and width must be multiples of {sc}, got {settings.height}x{settings.width}")
        state = SessionState(
            config_hash=self.config_hash,
            settings=settings,
            dit=DiTCache(e.preset.dit.softmax_layer_ids, settings.num_cached_blocks, settings.sink_token),
            vae_encoder=e.vae.encoder_init_state() if "encoder" in parts else {},
            vae_decoder=e.vae.decoder_init_state() if "decoder" in parts else {},
        )
        if "generator" in parts:
            state.text = self._on_device(text) if text is not None else prompt_conditioning(e.text, settings)
        return state

    def set_prompt_text(self, state: SessionState, prompt: str, text: dict[str, Tensor]) -> None:
        """`set_prompt` with the embeddings already computed (`prompt_conditioning`, e.g. in another process)."""
        state.text = self._on_device(text)
        state.settings.prompt = prompt
        state.cursor.prompt_version += 1

    # --- stage 1: encode ------------------------------------------------------------------------------------

    def encode(self, state: SessionState, frames: np.ndarray | Tensor, final: bool = False) -> Tensor | None:
        """Pixel frames (n, H, W, 3) uint8 -> newly finished source latents (1, C, t, h, w), or None.

        With final=True the stream ends: a partial 8-frame step is padded with the last frame."""
        e = self.engine
        s = state.settings
        new = frames_to_tensor(frames) if isinstance(frames, np.ndarray) else frames  # (3, n, H, W) in [-1, 1]
        if new.shape[-2:] != (s.height, s.width):
            raise ValueError(f"frames are {new.shape[-1]}x{new.shape[-2]}, the session expects {s.width}x{s.height}")
        state.cursor.frames_in += new.shape[1]
        buf = state.buffers.pop("frames", None)
        pending = new if buf is None else torch.cat([buf, new.to(buf)], dim=1)
        step = e.vae.cfg.temporal_compression
        outs = []
        while pending.shape[1] > 0:
            need = 1 if state.cursor.latents_encoded == 0 else step
            if pending.shape[1] < need:
                if not final:
                    break
                pad = pending[:, -1:].expand(-1, need - pending.shape[1], -1, -1)
                pending = torch.cat([pending, pad], dim=1)
            lat, state.vae_encoder = e.vae.encode_step(pending[None, :, :need].to(e.device, e.dtype), state.vae_encoder)
            outs.append(lat)
            state.cursor.latents_encoded += lat.shape[2]
            pending = pending[:, need:]
        if pending.shape[1] > 0:
            state.buffers["frames"] = pending.contiguous().clone()
        return torch.cat(outs, dim=2) if outs else None

    # --- stage 2: generate ----------------------------------------------------------------------------------

    def total_latents(self, state: SessionState) -> int | None:
        """Latent frames the whole input yields, when its length is known."""
        f = state.settings.total_frames
        step = self.engine.preset.vae.temporal_compression
        return None if f is None else (f - 1 + step - 1) // step + 1

    def next_chunk_frames(self, state: SessionState) -> int:
        """Latent frames of the session's next chunk: the release's plan when the length is known, else 3."""
        total = self.total_latents(state)
        if total is None:
            return CHUNK_FRAMES
        done = state.cursor.latents_generated
        return next((b - a for a, b in chunk_bounds(total) if a == done), total - done)

    def generate(
        self,
        state: SessionState,
        source: Tensor | None,
        final: bool = False,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Tensor | None:
        """Source latents (1, C, t, h, w) -> edited latents of every chunk completed by them, or None.

        final=True: the stream ends here; a short last chunk runs and no cache refresh follows it."""
        return self.generate_batch([(state, source, final)], on_chunk)[0]

    def generate_batch(
        self,
        requests: list[tuple[SessionState, Tensor | None, bool]],
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> list[Tensor | None]:
        """`generate` for several sessions at once: in each round every session with a full chunk contributes
        it, and compatible chunks share their forwards (`engine.step.ChunkRunner`).

        requests: (state, new source latents or None, final) per session (each session at most once)."""
        if len({id(r[0]) for r in requests}) != len(requests):
            raise ValueError("a session appears twice in one generate_batch call")
        for state, source, _ in requests:
            if source is not None:
                buf = state.buffers.pop("source", None)
                state.buffers["source"] = source if buf is None else torch.cat([buf, source.to(buf)], dim=2)
        outs: list[list[Tensor]] = [[] for _ in requests]
        while True:
            jobs, owners = [], []
            for i, (state, _, final) in enumerate(requests):
                job = self._next_job(state, final)
                if job is not None:
                    jobs.append(job)
                    owners.append(i)
            if not jobs:
                break
            for i, latents in zip(owners, self.runner.run(jobs)):
                state = requests[i][0]
                T = latents.shape[2]
                state.cursor.latents_generated += T
                outs[i].append(latents)
                if on_chunk:
                    on_chunk(state.dit.chunk_index, T)
        for state, _, _ in requests:
            buf = state.buffers.get("source")
            if buf is not None:
                state.buffers["source"] = buf.contiguous().clone()
        return [torch.cat(o, dim=2) if o else None for o in outs]

    def _next_job(self, state: SessionState, final: bool) -> ChunkJob | None:
        """Take the session's next chunk off its source buffer, if it is complete (or the stream ends)."""
        buf = state.buffers.get("source")
        if buf is None or buf.shape[2] == 0:
            return None
        size = self.next_chunk_frames(state)
        if size <= 0:
            raise ValueError("more source latents than the declared total_frames allow")
        if buf.shape[2] < size and not final:
            return None
        size = min(size, buf.shape[2])
        total = self.total_latents(state)
        is_last = (final and buf.shape[2] == size) or (
            total is not None and state.cursor.latents_generated + size == total
        )
        rest = buf[:, :, size:]
        if rest.shape[2]:
            state.buffers["source"] = rest
        else:
            del state.buffers["source"]
        e, s = self.engine, state.settings
        source = buf[:, :, :size].to(e.device, e.dtype)
        shape = (source.shape[1], source.shape[3], source.shape[4])
        text, mask = state.text["embeds"], state.text["mask"]
        if s.cfg_scale > 1.0:
            text = torch.cat([state.text["neg_embeds"], text])
            mask = torch.cat([state.text["neg_mask"], mask])
        return ChunkJob(
            cache=state.dit,
            source=source,
            noise=frame_noise(s.seed, state.cursor.latents_generated, size, shape),
            text=text,
            mask=mask,
            text_cache=(state.derived, state.text),
            schedule=StreamingSchedule(s.steps, s.flow_shift),
            cfg_scale=s.cfg_scale,
            efficient_cache=s.efficient_cache,
            is_last=is_last,
        )

    # --- stage 3: decode ------------------------------------------------------------------------------------

    def decode(self, state: SessionState, edited: Tensor | None, final: bool = False) -> np.ndarray:
        """Edited latents -> uint8 frames (n, H, W, 3) that can no longer change (all remaining ones if final)."""
        e = self.engine
        if edited is None and not final:
            return np.zeros((0, state.settings.height, state.settings.width, 3), np.uint8)
        lat = None if edited is None else edited.to(e.device, e.dtype)
        frames, state.vae_decoder = e.vae.decode_step(lat, state.vae_decoder, final=final)
        out = frames_to_uint8(frames[0])
        if final:  # drop the frames that only exist because the input was padded
            keep = max(0, state.cursor.frames_in - state.cursor.frames_out)
            out = out[:keep]
        state.cursor.frames_out += out.shape[0]
        return out

    # --- all three ------------------------------------------------------------------------------------------

    def push(self, state: SessionState, frames: np.ndarray, on_chunk=None) -> np.ndarray:
        """Feed pixel frames; returns the edited frames that became final."""
        return self.decode(state, self.generate(state, self.encode(state, frames), on_chunk=on_chunk))

    def finish(self, state: SessionState, on_chunk=None) -> np.ndarray:
        """End of input: flush every stage; returns the remaining edited frames."""
        empty = np.zeros((0, state.settings.height, state.settings.width, 3), np.uint8)
        lat = self.encode(state, empty, final=True)
        return self.decode(state, self.generate(state, lat, final=True, on_chunk=on_chunk), final=True)


@torch.no_grad()
def edit_bidirectional(
    engine: Engine,
    frames: np.ndarray,
    settings: SessionSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Whole-clip bidirectional edit (`bidirectional_short`): DPM-Solver++ with CFG over all latent frames."""
    e = engine
    if e.dit.cfg.streaming:
        raise ValueError("edit_bidirectional needs the bidirectional DiT (mode bidirectional_short)")
    step = e.vae.cfg.temporal_compression
    n = frames.shape[0]
    padded_len = (n - 1 + step - 1) // step * step + 1
    video = frames_to_tensor(frames)
    if padded_len > n:
        video = torch.cat([video, video[:, -1:].expand(-1, padded_len - n, -1, -1)], dim=1)
    src = e.vae.encode(video[None].to(e.device, e.dtype))
    T = src.shape[2]
    x = frame_noise(settings.seed, 0, T, (src.shape[1], src.shape[3], src.shape[4])).to(e.device)
    embeds, mask = e.text.encode([settings.prompt])
    cfg = settings.cfg_scale > 1.0
    if cfg:
        neg, neg_mask = e.text.encode_plain([settings.negative_prompt], truncate=True)
        embeds, mask, src = torch.cat([neg, embeds]), torch.cat([neg_mask, mask]), torch.cat([src, src])
    sched = make_bidirectional_scheduler(settings.steps, settings.flow_shift)
    for i, t in enumerate(sched.timesteps):
        inp = x.to(e.dtype).expand(src.shape[0], -1, -1, -1, -1)
        v = e.dit(inp, src, t.expand(src.shape[0]).to(e.device), embeds, mask).float()
        if cfg:
            v = cfg_combine(v[:1], v[1:], settings.cfg_scale)
        x = sched.step(v, t, x, return_dict=False)[0]
        if on_step:
            on_step(i, len(sched.timesteps))
    video_out = e.vae.decode(x.to(e.dtype))
    return frames_to_uint8(video_out[0])[:n]
