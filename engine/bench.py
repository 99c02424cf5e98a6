"""`sana-stream bench`: DiT, VAE and streaming-session speed with random weights at a preset's real shapes.

Speed does not depend on weight values, so the models are randomly initialised on the device. The text encoder is
replaced by random embeddings of the right shape: it runs once per prompt, not per chunk, and is not timed here.

Reported (JSON fields are stable; later benchmarks add fields, never rename):
    dit_ms_per_forward      one steady-state forward: 3 latent frames, 11-frame softmax window
    dit_ms_per_chunk        the default schedule: `steps` denoising forwards + the t=0 cache refresh
    dit_fps                 24 pixel frames / dit_ms_per_chunk
    vae_encode_fps, vae_decode_fps   pixel frames per second through the streaming encoder / decoder
    e2e_fps                 frames per second of a whole streaming session (encode -> DiT -> decode, one stream)
    peak_memory_gb          peak device memory of the process
    session_state_bytes     bytes one session holds at steady state, by part; snapshot_bytes, snapshot_ms

Non-goals: optimised paths (they come with the kernels), multi-session throughput (loadtest/).
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import get_preset
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.pipeline import CHUNK_FRAMES, Engine, StreamingEditor
from engine.session import SessionSettings
from engine.vae import VideoVAE


class RandomTextEncoder:
    """Stand-in for the text encoder in benchmarks: random embeddings of the real shape (not a model)."""

    def __init__(self, hidden: int, text_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.hidden, self.text_len, self.device, self.dtype = hidden, text_len, device, dtype

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.randn(len(prompts), self.text_len, self.hidden, device=self.device, dtype=self.dtype)
        return embeds, torch.ones(len(prompts), self.text_len, dtype=torch.int64, device=self.device)

    encode_plain = encode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def run_bench(args) -> int:
    cfg = get_preset(args.preset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    height, width = args.height or cfg.height, args.width or cfg.width
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.device(device):
        dit = SanaStreamingDiT(cfg.dit)
    dit = dit.init_weights(seed=0).to(dtype).eval()
    vae = VideoVAE(cfg.vae, None, device=device, dtype=dtype)
    text = RandomTextEncoder(cfg.text.hidden_size, cfg.text.text_len, device, dtype)
    engine = Engine(cfg, dit, vae, text, device, dtype)  # type: ignore[arg-type]
    editor = StreamingEditor(engine)
    sc, tc = cfg.vae.spatial_compression, cfg.vae.temporal_compression
    h, w, C = height // sc, width // sc, cfg.dit.in_channels
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "command": "sana-stream " + " ".join(sys.argv[1:]),
        "preset": cfg.name,
        "height": height,
        "width": width,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "steps": cfg.steps,
        "tokens_per_frame": h * w,
    }

    # DiT: a session brought to steady state (sink + previous chunk cached), then timed chunk by chunk.
    settings = SessionSettings(prompt="bench", height=height, width=width, steps=cfg.steps)
    state = editor.open(settings)
    first = CHUNK_FRAMES + 2
    with torch.no_grad():
        editor.generate(state, torch.randn(1, C, first + 2 * CHUNK_FRAMES, h, w, device=device, dtype=dtype))
        x = torch.randn(1, C, CHUNK_FRAMES, h, w, device=device, dtype=dtype)
        t = torch.full((1,), 500, device=device)
        emb, mask = state.text["embeds"], state.text["mask"]
        fwd = _timed(lambda: dit(x, x, t, emb, mask, cache=state.dit), device, 10)
        chunk = _timed(lambda: editor.generate(state, torch.randn_like(x)), device, args.chunks)
    results.update(
        dit_ms_per_forward=fwd * 1e3,
        dit_ms_per_chunk=chunk * 1e3,
        dit_fps=CHUNK_FRAMES * tc / chunk,
        dit_window_frames=first + 2 * CHUNK_FRAMES,
    )
    # VAE: the streaming encoder (8 frames per latent) and the chunk-wise decoder (3 latents per call).
    with torch.no_grad():
        enc_state = vae.encoder_init_state()
        _, enc_state = vae.encode_step(torch.randn(1, 3, 1, height, width, device=device, dtype=dtype), enc_state)
        frames8 = torch.randn(1, 3, tc, height, width, device=device, dtype=dtype)
        enc_box = [enc_state]

        def enc():
            _, enc_box[0] = vae.encode_step(frames8, enc_box[0])

        enc_s = _timed(enc, device, 3)
        dec_box = [vae.decoder_init_state()]
        lat = torch.randn(1, C, CHUNK_FRAMES, h, w, device=device, dtype=dtype)

        def dec():
            _, dec_box[0] = vae.decode_step(lat, dec_box[0], final=False)

        dec_s = _timed(dec, device, 3)
    results.update(vae_encode_fps=tc / enc_s, vae_decode_fps=CHUNK_FRAMES * tc / dec_s)

    # End to end: one streaming session fed 24 pixel frames at a time.
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (CHUNK_FRAMES * tc, height, width, 3), dtype=np.uint8)
    e2e_state = editor.open(SessionSettings(prompt="bench", height=height, width=width, steps=cfg.steps))
    with torch.no_grad():
        editor.push(e2e_state, frames[:1])
        for _ in range(2):  # warm-up to steady state
            editor.push(e2e_state, frames)
        _sync(device)
        t0 = time.perf_counter()
        emitted = 0
        for _ in range(args.chunks):
            emitted += editor.push(e2e_state, frames).shape[0]
        _sync(device)
    e2e = time.perf_counter() - t0
    results.update(e2e_fps=args.chunks * frames.shape[0] / e2e, e2e_frames_emitted=emitted)

    # The whole session's state at steady state (DiT caches, VAE encoder/decoder caches, buffers, text).
    t0 = time.perf_counter()
    blob = e2e_state.snapshot()
    results.update(
        session_state_bytes=e2e_state.nbytes(),
        snapshot_bytes=len(blob),
        snapshot_ms=(time.perf_counter() - t0) * 1e3,
    )
    if device.type == "cuda":
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9

    text_out = json.dumps(results, indent=2)
    print(text_out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text_out + "\n")
    return 0
