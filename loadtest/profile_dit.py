"""Where a 2B DiT chunk's time goes on the GPU (the evidence behind loadtest/results/README.md, Performance I).

    python3 loadtest/profile_dit.py [--compile] [--profile-compiled] [--json PATH]

At 1280x704, bf16, random weights, one session brought to steady state: DiT FPS with CUDA graphs (the engine's
default) and eager, one forward's graph replay time, host syncs during a chunk (torch's sync debug mode), a
device timeline of three chunks (busy vs wall time, the largest idle gaps and the kernels around them, the host's
longest CUDA runtime calls: a cudaGraphLaunch that blocks for a whole forward means the host is ahead), the fast
path's error against the reference path, DiT FPS with compiled blocks (--compile) and the per-kernel device time of
one forward (eager, as the runner calls it; --profile-compiled: the compiled blocks). `sana-stream bench` gives the
stable figures; this script is for finding the next bottleneck. Needs CUDA (and diffusers for the VAE class).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from engine import step as step_mod
from engine.bench import RandomTextEncoder, _env, _rel_err, _sync
from engine.config import get_preset
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.pipeline import Engine, StreamingEditor
from engine.session import SessionSettings
from engine.vae import VideoVAE
from kernels.timing import profile_kernels

HEIGHT, WIDTH, CHUNK_FRAMES = 704, 1280, 24


class Setup:
    def __init__(self) -> None:
        self.dev, dt = torch.device("cuda"), torch.bfloat16
        cfg = get_preset("sana-streaming-2b-ar")
        torch.manual_seed(0)
        with torch.device(self.dev):
            self.dit = SanaStreamingDiT(cfg.dit).init_weights(seed=0).to(dt).eval()
        text = RandomTextEncoder(cfg.text.hidden_size, cfg.text.text_len, self.dev, dt)
        vae = VideoVAE(cfg.vae, None, device=self.dev, dtype=dt)
        self.editor = StreamingEditor(Engine(cfg, self.dit, vae, text, self.dev, dt))
        h, w, c = HEIGHT // 32, WIDTH // 32, cfg.dit.in_channels
        state = self.editor.open(SessionSettings(prompt="bench", height=HEIGHT, width=WIDTH, steps=cfg.steps))
        with torch.no_grad():
            self.editor.generate(state, torch.randn(1, c, 11, h, w, device=self.dev, dtype=dt))
        self.blob = state.snapshot()
        gen = torch.Generator(self.dev).manual_seed(3)
        self.src = torch.randn(1, c, 30, h, w, device=self.dev, dtype=dt, generator=gen)

    def profile_chunk(self):
        """torch.profiler (CUDA + CPU, input shapes) over one steady-state chunk, after the session has run two:
        with the engine's default runner, as `chunk_fps` leaves it."""
        st = self.editor.restore(self.blob)
        with torch.no_grad():
            self.editor.generate(st, self.src[:, :, :6])
            _sync(self.dev)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
                self.editor.generate(st, self.src[:, :, 6:9])
                _sync(self.dev)
        return prof

    def chunk_fps(
        self, graphs: bool = True, reps: int = 2, chunk_graphs: bool | None = None
    ) -> tuple[float, torch.Tensor]:
        """Best of `reps`: 8 chunks after 2 warm-up chunks, one generate call (chunk_graphs: one graph per chunk,
        False: per forward; None: the engine's default)."""
        self.editor.runner = step_mod.ChunkRunner(self.dit, cuda_graphs=graphs, chunk_graphs=chunk_graphs)
        best, lat = 0.0, None
        for _ in range(reps):
            st = self.editor.restore(self.blob)
            with torch.no_grad():
                self.editor.generate(st, self.src[:, :, :6])
                _sync(self.dev)
                t0 = time.perf_counter()
                lat = self.editor.generate(st, self.src[:, :, 6:])
                _sync(self.dev)
            best = max(best, 8 * CHUNK_FRAMES / (time.perf_counter() - t0))
        return best, lat


def _replay_ms(replay, device) -> float:
    for _ in range(3):
        replay()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        replay()
    _sync(device)
    return (time.perf_counter() - t0) / 20 * 1e3


def replay_ms(s: Setup) -> dict[str, float]:
    """Graph replays alone, back to back: one forward's graph (a per-forward runner's steady-state graph) and one
    whole chunk's (the default runner's)."""
    window = lambda gr: max((r.past_kv[0].shape[1] for r in gr.inputs["reads"] if r.past_kv is not None), default=0)  # noqa: E731
    s.chunk_fps(reps=1, chunk_graphs=False)
    # The steady-state denoising forward (longest window; the keys end with cache_only, the refresh's graphs).
    g = max((gr for key, gr in s.editor.runner._graphs.items() if not key[-1]), key=window)
    out = {"replay_ms_per_forward": _replay_ms(g.replay, s.dev)}
    s.chunk_fps(reps=1, chunk_graphs=True)
    g = max(s.editor.runner._chunk_graphs.values(), key=window)
    out["replay_ms_per_chunk_graph"] = _replay_ms(g.replay, s.dev)
    return out


def syncs_and_timeline(s: Setup) -> dict:
    st = s.editor.restore(s.blob)
    out: dict = {}
    with torch.no_grad():
        s.editor.generate(st, s.src[:, :, :6])
        _sync(s.dev)
        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s.editor.generate(st, s.src[:, :, 6:9])
            _sync(s.dev)
        torch.cuda.set_sync_debug_mode(0)
        out["host_syncs_per_chunk"] = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            s.editor.generate(st, s.src[:, :, 9:18])
            host = time.perf_counter() - t0  # when the host had queued everything
            _sync(s.dev)
            wall = time.perf_counter() - t0
    evs = sorted(
        (e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.name())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CUDA
    )
    busy, start, end = 0.0, None, None
    for a, b, _ in evs:
        if end is None or a > end:
            busy += 0.0 if end is None else end - start
            start, end = a, b
        else:
            end = max(end, b)
    busy += end - start
    gaps = sorted(((evs[i + 1][0] - evs[i][1], i) for i in range(len(evs) - 1)), reverse=True)[:25]
    # Host side: the CUDA runtime/driver calls (where a blocked host waits), by total and the longest ones.
    api = [
        (e.duration_ns() / 1e3, e.name(), (e.start_ns() / 1e3) - evs[0][0])
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CPU and e.name().startswith("cu")
    ]
    totals: dict[str, list[float]] = {}
    for us, name, _ in api:
        totals.setdefault(name, [0.0, 0])
        totals[name][0] += us
        totals[name][1] += 1
    out["host_api_3_chunks"] = {
        "totals_us": {
            k: {"us": round(v[0], 1), "calls": v[1]} for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])[:12]
        },
        "longest": [
            {"us": round(us, 1), "name": n, "at_us": round(at, 1)} for us, n, at in sorted(api, reverse=True)[:15]
        ],
    }
    out["timeline_3_chunks"] = {
        "host_queued_ms": host * 1e3,
        "wall_ms": wall * 1e3,
        "device_busy_ms": busy / 1e3,
        "span_ms": (evs[-1][1] - evs[0][0]) / 1e3,
        "kernels": len(evs),
        "largest_gaps": [
            {
                "us": round(g, 1),
                "after": evs[i][2][:70],
                "before": evs[i + 1][2][:70],
                "at_us": round(evs[i][1] - evs[0][0], 1),
            }
            for g, i in gaps
        ],
    }
    return out


def forward_profile(s: Setup) -> dict[str, float]:
    """Per-kernel device microseconds of one forward_step, called as the runner calls it (eager)."""
    captured = {}
    original = step_mod.ChunkRunner._forward

    def spy(self, sig, inputs, *rest):
        captured["inputs"] = inputs  # complete (cache reads included) once the eager forward has run
        return original(self, sig, inputs, *rest)

    step_mod.ChunkRunner._forward = spy
    try:
        s.editor.runner = step_mod.ChunkRunner(s.dit, cuda_graphs=False)
        with torch.no_grad():
            s.editor.generate(s.editor.restore(s.blob), s.src[:, :, :3])
            inputs = captured["inputs"]
            return profile_kernels(lambda: s.dit.forward_step(**inputs), iters=5)
    finally:
        step_mod.ChunkRunner._forward = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="also DiT FPS with torch.compile'd blocks")
    ap.add_argument("--profile-compiled", action="store_true", help="profile the compiled blocks (with --compile)")
    ap.add_argument("--json", default="/tmp/profile_dit.json")
    args = ap.parse_args()
    s = Setup()
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["dit_fps_graphs"], lat_graphs = s.chunk_fps()
    res["dit_fps_forward_graphs"], _ = s.chunk_fps(chunk_graphs=False)
    res.update(replay_ms(s))
    res.update(syncs_and_timeline(s))
    res["dit_fps_eager"], lat_eager = s.chunk_fps(graphs=False, reps=1)
    res["graphs_vs_eager_rel_err"] = _rel_err(lat_graphs, lat_eager)
    with _env(SANA_STREAM_GDN="naive", SANA_STREAM_FUSED="0"):
        s.dit.unfuse_projections()
        s.editor.runner = step_mod.ChunkRunner(s.dit, cuda_graphs=False)
        with torch.no_grad():
            ref = s.editor.generate(s.editor.restore(s.blob), s.src[:, :, :6])
    s.editor.runner = step_mod.ChunkRunner(s.dit, cuda_graphs=False)
    with torch.no_grad():
        fast = s.editor.generate(s.editor.restore(s.blob), s.src[:, :, :6])
    res["fast_vs_reference_rel_err"] = _rel_err(fast, ref)
    if args.compile:
        import torch._dynamo.utils as dynamo_utils

        t0 = time.perf_counter()
        s.dit.compile_blocks()
        res["dit_fps_compiled"], lat_compiled = s.chunk_fps()
        res["compile_s"] = time.perf_counter() - t0
        res["compiled_vs_eager_rel_err"] = _rel_err(lat_compiled, lat_eager)
        res["graph_breaks"] = dict(dynamo_utils.counters["graph_break"])
        if not args.profile_compiled:
            s.dit.uncompile_blocks()
    print({k: v for k, v in res.items() if not isinstance(v, dict)}, flush=True)
    rows = forward_profile(s)  # last: the profiler leaves CUPTI attached
    res["forward_kernels_us"] = dict(sorted(rows.items(), key=lambda kv: -kv[1]))
    res["forward_device_us"] = sum(rows.values())
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        if k not in ("forward_kernels_us", "timeline_3_chunks", "host_api_3_chunks"):
            print(k, v)
    print("timeline", {k: v for k, v in res["timeline_3_chunks"].items() if k != "largest_gaps"})
    for g in res["timeline_3_chunks"]["largest_gaps"][:12]:
        print("gap", g)
    print(json.dumps(res["host_api_3_chunks"], indent=1))
    for name, us in list(res["forward_kernels_us"].items())[:30]:
        print(f"{us:9.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
