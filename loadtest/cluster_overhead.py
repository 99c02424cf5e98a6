"""Per-chunk overhead of the cluster path (gRPC -> Gateway -> Ingest -> Generator -> Egress -> gRPC) against the
engine called directly on the same clip, plus the Generator checkpoint's size and time.

    python -m loadtest.cluster_overhead --preset tiny --out loadtest/results/cluster_overhead_cpu_tiny.json
    # one GPU, the 2B shapes at 1280x704, random weights (no checkpoints are downloaded):
    python -m loadtest.cluster_overhead --preset sana-streaming-2b-ar --height 704 --width 1280 --random-weights \
        --device cuda --frames 121 --out loadtest/results/cluster_overhead_h100_2b.json

Both sides run the same requests (`--chunk-frames` frames each, one chunk per request after the first) with the
same number of torch threads per model process. Reported per request (mean over the measured stream, after a
warm-up stream): engine_ms (StreamingEditor.push in this process), cluster_ms (gateway: request in -> out),
inside_ms (time inside the stage replicas), gateway_ms (what the gateway reports outside the replicas), and
overhead_ms = cluster_ms - inside_ms. `--no-cluster` measures only the engine and the snapshots (a machine
without Ray; grpcio + protobuf are still needed for the snapshot message). The engine side reaches `--out` before
the cluster starts; a cluster side that fails is recorded there as `cluster_error` (exit 1). The lent GPU machine
has no Ray: `loadtest/device_site.sh` builds what travels there (loadtest/results/README.md has the calls).
Non-goals: many concurrent sessions (capacity), H.264 transport.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import os

    out = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
           "cpus": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def engine_side(args, spec, clip) -> dict:
    from engine.pipeline import StreamingEditor
    from engine.session import SessionSettings
    from services.stage import build_engine
    from services.wire import wrap_snapshot

    t_build = time.perf_counter()
    editor = StreamingEditor(build_engine(spec, ("dit", "vae", "text")))
    build_s = time.perf_counter() - t_build
    dev = editor.engine.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one(measure: bool):
        s = SessionSettings(prompt=args.prompt, height=args.height, width=args.width, total_frames=len(clip))
        state = editor.open(s)
        times = []
        for i in range(0, len(clip), args.chunk_frames):
            sync()
            t0 = time.perf_counter()
            editor.push(state, clip[i : i + args.chunk_frames])
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        editor.finish(state)
        return times, state

    one(False)
    times, _ = one(True)
    # a steady-state session for the snapshot numbers (after 2+ chunks, as a checkpoint sees it)
    s = SessionSettings(prompt=args.prompt, height=args.height, width=args.width)
    state = editor.open(s)
    for i in range(0, min(len(clip), 4 * args.chunk_frames + 1), args.chunk_frames):
        editor.push(state, clip[i : i + args.chunk_frames])
    parts = {}
    for part, stage in (("generator", "generator"), ("encoder", "ingest"), ("decoder", "egress")):
        sub = editor.open_part(s, part, text=state.text if part == "generator" else None)
        sub.dit, sub.cursor = state.dit, state.cursor
        if part == "encoder":
            sub.vae_encoder = state.vae_encoder
        if part == "decoder":
            sub.vae_decoder = state.vae_decoder
        if part == "generator":
            sub.buffers = {k: v for k, v in state.buffers.items() if k == "source"}
        else:
            sub.dit = editor.open_part(s, "decoder").dit
        sync()
        t0 = time.perf_counter()
        blob = wrap_snapshot(sub, "bench", stage)
        t1 = time.perf_counter()
        editor.restore(__import__("services.wire", fromlist=["x"]).unwrap_snapshot(blob).engine_state)
        sync()
        t2 = time.perf_counter()
        parts[stage] = {"bytes": len(blob), "snapshot_ms": round((t1 - t0) * 1e3, 2),
                        "restore_ms": round((t2 - t1) * 1e3, 2)}  # fmt: skip
    return {"ms_per_request": times, "snapshots": parts, "build_s": build_s}


def cluster_side(args, spec, clip) -> dict:
    import os

    import ray
    from ray import serve

    from services.app import AppConfig, run
    from services.client import EditClient

    port = args.port
    # the replicas import the project from ROOT; keep the caller's PYTHONPATH too (packages installed with --target)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    t_start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    cfg = AppConfig(grpc_port=port, engine=spec, checkpoint_every=args.checkpoint_every,
                    num_gpus=0.2 if spec.device == "cuda" else 0.0, max_message_bytes=256 << 20)  # fmt: skip
    try:
        run(cfg)
        with EditClient(f"127.0.0.1:{port}") as c:
            c.wait_ready(300)
            startup_s = time.perf_counter() - t_start
            c.stream(clip, args.prompt, chunk_frames=args.chunk_frames, total_frames=len(clip))  # warm-up
            res = c.stream(clip, args.prompt, chunk_frames=args.chunk_frames, total_frames=len(clip))
    finally:
        serve.shutdown()
        ray.shutdown()
    rs = res.responses[: len(res.latencies_ms)]
    return {
        "client_ms_per_request": res.latencies_ms,
        "total_ms": [r.timings.total_ms for r in rs],
        "gateway_ms": [r.timings.gateway_ms for r in rs],
        "inside_ms": [r.timings.ingest_ms + r.timings.generate_ms + r.timings.egress_ms for r in rs],
        "fps": res.fps,
        "startup_s": startup_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--frames", type=int, default=121, help="clip length (121 = 8*15+1: 16 latents)")
    p.add_argument("--chunk-frames", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--random-weights", action="store_true", help="random DiT/VAE and random text embeddings")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model process (both sides)")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--port", type=int, default=19123)
    p.add_argument("--no-cluster", action="store_true")
    p.add_argument("--prompt", default="make the red circle blue")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from engine.testclips import make_clip
    from services.stage import EngineSpec

    torch.set_num_threads(args.threads)
    spec = EngineSpec(preset=args.preset, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                      torch_threads=args.threads)  # fmt: skip
    clip = make_clip(args.frames, args.height, args.width, seed=5)
    eng = engine_side(args, spec, clip)
    if torch.cuda.is_available():  # hand the engine side's cached GPU memory back before the replicas start
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python -m loadtest.cluster_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "height": args.height, "width": args.width, "frames": args.frames,
        "chunk_frames": args.chunk_frames, "torch_threads": args.threads,
        "engine_ms_per_request": [round(x, 2) for x in eng["ms_per_request"]],
        "snapshots": eng["snapshots"],
        "engine_build_s": round(eng["build_s"], 1),
    }  # fmt: skip

    def write(obj: dict, show: bool = True) -> None:
        text = json.dumps(obj, indent=2)
        if show:
            print(text, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")

    if args.no_cluster:
        write(out)
        return 0
    write(out, show=False)  # the engine side on disk before the cluster starts: a failing cluster side does not lose it
    try:
        cl = cluster_side(args, spec, clip)
    except Exception as exc:  # recorded in the result, then the run fails
        out["cluster_error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        write(out)
        return 1
    steady = slice(1, -1)  # skip the first request (chunk 0 is 5 latents) and the flush
    e = float(np.mean(eng["ms_per_request"][steady]))
    total = float(np.mean(cl["total_ms"][steady]))
    inside = float(np.mean(cl["inside_ms"][steady]))
    out.update({
        "cluster": {k: [round(x, 2) for x in v] if isinstance(v, list) else round(v, 2) for k, v in cl.items()},
        "steady_state": {
            "engine_ms_per_request": round(e, 2),
            "cluster_ms_per_request": round(total, 2),
            "inside_replicas_ms": round(inside, 2),
            "overhead_ms_per_request": round(total - inside, 2),
            "overhead_note": "cluster_ms (gateway: request in -> response out) - inside_replicas_ms: Ray hops, "
            "(de)serialisation, routing, registry and replay-log writes, gateway work. The client sends "
            "unpaced, so client_ms_per_request includes queueing behind earlier requests.",
        },
    })  # fmt: skip
    write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
