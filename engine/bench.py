"""`sana-stream bench`: DiT, VAE and streaming-session speed with random weights at a preset's real shapes.

Speed does not depend on weight values, so the models are randomly initialised on the device. The text encoder is
replaced by random embeddings of the right shape: it runs once per prompt, not per chunk, and is not timed here.

Reported (JSON fields are stable; later benchmarks add fields, never rename). Base figures:
    dit_ms_per_forward      one steady-state forward: 3 latent frames, 11-frame softmax window
    dit_ms_per_chunk        the default schedule: `steps` denoising forwards + the t=0 cache refresh
    dit_fps                 24 pixel frames / dit_ms_per_chunk
    vae_encode_fps, vae_decode_fps   pixel frames per second through the streaming encoder / decoder
    e2e_fps                 frames per second of a whole streaming session (encode -> DiT -> decode, one stream)
    peak_memory_gb          peak device memory of the process
    session_state_bytes     bytes one session holds at steady state, by part; snapshot_bytes, snapshot_ms

Fast-path figures (skipped with --quick):
    forward_breakdown_ms    device time of one forward by category (gemm, attention, gdn, norms_elementwise, other)
    gdn_layer_us, gdn_mixer_device_us, gdn_floor_us, gdn_backend   one GDN mixer at the real shape vs its floor
    dit_fps_eager, dit_fps_graphs, graphs_vs_eager_rel_err         the chunk step without / with CUDA graphs
    dit_fps_forward_graphs, forward_graphs_vs_chunk_graphs_rel_err one graph per forward instead of per chunk
    dit_fps_graphs_unfused  graphs without the fused projections and elementwise kernels (SANA_STREAM_FUSED=0)
    dit_fps_graphs_compiled, compiled_vs_eager_rel_err             graphs over torch.compile'd blocks
    fast_vs_reference_rel_err   the dispatched fast path (fused GDN, projections, elementwise) vs the plain-PyTorch
                            reference path (same chunk)
    batched                 {B: ms per round, total and per-session FPS} for B steady-state sessions per forward

Non-goals: multi-session serving throughput through the cluster (loadtest/).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
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


GDN_FLOOR_US = 17.0
"""Memory-bound floor of one GDN mixer at 3 frames x 880 tokens x 20 heads x 112 (DESIGN.md)."""

_GEMM = ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "implicit_gemm", "conv", "wgrad", "dgrad")
_ATTN = ("flash", "fmha", "attention", "attn")
_NORM = ("norm", "elementwise", "vectorized", "reduce", "silu", "gelu", "softmax", "cat", "copy", "mul", "add", "rope")


# Our fused elementwise kernels (kernels/fused; "conv" in a name would match _GEMM).
_FUSED = ("dwconv_glu", "ln_modulate", "rms_norm", "gated_residual", "silu_gate", "tconv_taps", "kv_append")
# kernels/gdn/triton_kernels.py, and the GDN gates of kernels/fused/triton_block.py.
_GDN = (
    "_phase_a_kernel",
    "_phase_b_kernel",
    "_phase_c_kernel",
    "_rstd_kernel",
    "_gdn_beta_kernel",
    "_gdn_decay_kernel",
)


def _category(kernel: str) -> str:
    k = kernel.lower()
    for name, keys in (
        ("gdn", _GDN),
        ("norms_elementwise", _FUSED),
        ("attention", _ATTN),
        ("gemm", _GEMM),
        ("norms_elementwise", _NORM),
    ):
        if any(key in k for key in keys):
            return name
    return "other"


@contextlib.contextmanager
def _gdn_ranges():
    """Label the GDN mixer's work (prologue, scans, merge) as 'sana::gdn' for the profiler, without touching the
    library: the two entry points the GDN layer calls are wrapped for the duration."""
    import engine.model.gdn as gdn_mod
    from kernels.gdn import triton_ops

    def labelled(fn):
        def wrapper(*a, **kw):
            with torch.profiler.record_function("sana::gdn"):
                return fn(*a, **kw)

        return wrapper

    patched = [(gdn_mod, "bidirectional_gdn")]
    ops = triton_ops()
    if ops is not None and hasattr(ops, "fused_gdn_layer"):
        patched.append((ops, "fused_gdn_layer"))
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    try:
        for mod, name, fn in saved:
            setattr(mod, name, labelled(fn))
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def forward_breakdown(fn, device: torch.device) -> dict[str, float]:
    """Device milliseconds of one call of fn by category: gemm, attention, gdn, norms_elementwise, other."""
    from torch.profiler import ProfilerActivity, profile

    with _gdn_ranges():
        fn()
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
    events = prof.events()
    in_gdn: set[int] = set()

    def collect(e) -> None:
        in_gdn.update(id(k) for k in e.kernels)
        for c in e.cpu_children:
            collect(c)

    for e in events:
        if e.name == "sana::gdn":
            collect(e)
    totals = dict.fromkeys(("gemm", "attention", "gdn", "norms_elementwise", "other"), 0.0)
    count = 0
    for e in events:
        for k in e.kernels:
            totals["gdn" if id(k) in in_gdn else _category(k.name)] += k.duration / 1e3
            count += 1
    totals["total"] = sum(totals.values())
    totals["kernels"] = count
    return totals


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration (the engine's path switches are read per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


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
        # The settings the figures depend on besides the command (fast path, graphs, kernels, cuBLAS workspace).
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("SANA_STREAM_", "CUBLAS"))},
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
    if not args.quick:
        results.update(_dit_fast_paths(editor, state, x, args.chunks, device, tc))
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


def _timed_chunks(editor: StreamingEditor, runner, blob: bytes, src: torch.Tensor, chunks: int, device):
    """Restore the session from `blob`, run two chunks on `runner` (warm-up and graph capture), then time `chunks`
    more in one `generate` call. Returns (warm-up seconds, seconds per timed chunk, the timed chunks' latents)."""
    editor.runner = runner
    st = editor.restore(blob)
    t0 = time.perf_counter()
    editor.generate(st, src[:, :, :6])
    _sync(device)
    t1 = time.perf_counter()
    lat = editor.generate(st, src[:, :, 6:])
    _sync(device)
    return t1 - t0, (time.perf_counter() - t1) / chunks, lat


def _dit_fast_paths(editor: StreamingEditor, state, x: torch.Tensor, chunks: int, device, tc: int) -> dict:
    """Performance-I figures: breakdown, GDN layer vs floor, graphs on/off, batched throughput, fast-path error."""
    from engine.step import ChunkRunner

    dit = editor.engine.dit
    out: dict = {}
    emb, mask = state.text["embeds"], state.text["mask"]
    t = torch.full((1,), 500, device=device)
    with torch.no_grad():
        # One GDN mixer (prologue + both scans + merge) at the real shape, on the path the engine dispatches to.
        gdn_block = next(b for b in dit.blocks if not b.is_softmax)
        h = torch.randn(1, x.shape[2] * x.shape[3] * x.shape[4], dit.cfg.hidden_size, device=device, dtype=dit.dtype)
        hw = tuple(x.shape[2:])
        rope = dit.rope.table(8, *hw, device)
        gdn_state = (
            torch.zeros(1, gdn_block.attn.heads, dit.cfg.head_dim, dit.cfg.head_dim, device=device),
            torch.zeros(1, gdn_block.attn.heads, dit.cfg.head_dim, 1, device=device),
        )
        layer_s = _timed(lambda: gdn_block.attn(h, hw, rope, gdn_state), device, 20)
        from engine.model.gdn import gdn_backend

        out.update(gdn_backend=gdn_backend(device), gdn_layer_us=layer_s * 1e6, gdn_floor_us=GDN_FLOOR_US)

        # Chunks through the runner with and without CUDA graphs, from the same snapshot; and their difference.
        blob = state.snapshot()
        src = torch.randn(1, x.shape[1], 3 * (chunks + 2), *x.shape[3:], device=device, dtype=dit.dtype,
                          generator=torch.Generator(device).manual_seed(1))  # fmt: skip
        results_by_mode = {}
        for graphs in (False, True) if device.type == "cuda" else (False,):
            _, per_chunk, lat = _timed_chunks(editor, ChunkRunner(dit, cuda_graphs=graphs), blob, src, chunks, device)
            results_by_mode[graphs] = (per_chunk, lat)
        out["dit_fps_eager"] = 3 * tc / results_by_mode[False][0]
        if True in results_by_mode:
            out["dit_fps_graphs"] = 3 * tc / results_by_mode[True][0]
            out["graphs_vs_eager_rel_err"] = _rel_err(results_by_mode[True][1], results_by_mode[False][1])
            # One graph per forward (the Euler steps eager between replays) instead of one per chunk.
            _, per_chunk, lat = _timed_chunks(editor, ChunkRunner(dit, chunk_graphs=False), blob, src, chunks, device)
            out["dit_fps_forward_graphs"] = 3 * tc / per_chunk
            out["forward_graphs_vs_chunk_graphs_rel_err"] = _rel_err(lat, results_by_mode[True][1])
            del lat
            editor.runner = None
            # The same with graphs but without the fused projections and elementwise kernels (fused GDN kept).
            with _env(SANA_STREAM_FUSED="0"):
                dit.unfuse_projections()
                _, per_chunk, _ = _timed_chunks(editor, ChunkRunner(dit), blob, src, chunks, device)
                out["dit_fps_graphs_unfused"] = 3 * tc / per_chunk
            editor.runner = ChunkRunner(dit)  # fuses again

        # The dispatched fast path (fused GDN, fused projections and elementwise kernels) against the plain-PyTorch
        # reference path, same chunk, eager.
        if out["gdn_backend"] != "naive" or dit.projections_fused:
            with _env(SANA_STREAM_GDN="naive", SANA_STREAM_FUSED="0"):
                dit.unfuse_projections()
                editor.runner = ChunkRunner(dit, cuda_graphs=False)
                ref = editor.generate(editor.restore(blob), src[:, :, :6])
            editor.runner = ChunkRunner(dit, cuda_graphs=False)
            fast = editor.generate(editor.restore(blob), src[:, :, :6])
            out["fast_vs_reference_rel_err"] = _rel_err(fast, ref)

        # Cross-session batching: B steady-state sessions per forward (graphs on).
        runner = ChunkRunner(dit)  # graphs on CUDA
        editor.runner = runner
        batched = {}
        for B in (1, 2, 4):
            states = [editor.restore(blob) for _ in range(B)]
            srcs = [torch.randn(1, x.shape[1], 3 * (chunks + 1), *x.shape[3:], device=device, dtype=dit.dtype)
                    for _ in range(B)]  # fmt: skip
            editor.generate_batch([(s, c[:, :, :3], False) for s, c in zip(states, srcs)])  # capture
            _sync(device)
            t0 = time.perf_counter()
            editor.generate_batch([(s, c[:, :, 3:], False) for s, c in zip(states, srcs)])
            _sync(device)
            dt = (time.perf_counter() - t0) / chunks
            batched[str(B)] = {"ms_per_round": dt * 1e3, "fps_total": B * 3 * tc / dt, "fps_per_session": 3 * tc / dt}
            del states
        out["batched"] = batched
        out["cuda_graphs_captured"] = runner.num_graphs

        # torch.compile of the blocks (fuses the norms / modulation / gating elementwise work) under CUDA graphs.
        if device.type == "cuda" and os.environ.get("SANA_STREAM_BENCH_COMPILE", "1") == "1":
            try:
                t0 = time.perf_counter()
                dit.compile_blocks()
                compile_s = time.perf_counter() - t0
                warm_s, per_chunk, lat = _timed_chunks(editor, ChunkRunner(dit), blob, src, chunks, device)
                out["compile_s"] = compile_s + warm_s  # compile + capture
                out["dit_fps_graphs_compiled"] = 3 * tc / per_chunk
                out["compiled_vs_eager_rel_err"] = _rel_err(lat, results_by_mode[False][1])
            except Exception as e:  # report, don't lose the other figures
                out["compile_error"] = f"{type(e).__name__}: {e}"[:500]
            finally:
                dit.uncompile_blocks()  # the remaining figures are for the eager (graphed) model
                editor.runner = ChunkRunner(dit)

        # Last: the profiler (CUPTI stays attached afterwards and slows eager launches).
        out["forward_breakdown_ms"] = forward_breakdown(lambda: dit(x, x, t, emb, mask, cache=state.dit), device)
        mixer = forward_breakdown(lambda: gdn_block.attn(h, hw, rope, gdn_state), device)
        out["gdn_mixer_device_us"] = mixer["gdn"] * 1e3
    return out
