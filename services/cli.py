"""`sana-stream` with the cluster subcommands: everything of engine.cli plus `serve`, `stream` and `demo`.

    sana-stream serve [--preset tiny] [--grpc-port 9000] [--redis-url URL] [--replicas STAGE=N ...]
    sana-stream stream --server HOST:PORT --video_path IN --prompt P --output OUT [--realtime]
    sana-stream demo [--out outputs] [--prompt P]      # serve + stream a generated clip + stop, one command

`serve` starts a local Ray instance and the application, prints where it listens and stops cleanly on Ctrl-C.
`stream` is the client of services/client.py: reads a video, streams it (paced at its fps with --realtime),
writes the edited mp4 and reports delivered FPS and latency. Ray is imported only by `serve`; the engine's
commands behave exactly as in engine.cli.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from engine import cli as engine_cli


def build_parser() -> argparse.ArgumentParser:
    parser = engine_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    p = sub.add_parser("serve", help="run the streaming service (Ray Serve + gRPC) on this machine")
    _service_options(p, default_port=9000)

    p = sub.add_parser("stream", help="stream a video through a running service and write the edited mp4")
    p.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT of `sana-stream serve`")
    p.add_argument("--video_path", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--output", required=True, help="edited mp4 to write")
    _stream_options(p)

    p = sub.add_parser("demo", help="the whole stack in one command: serve, stream a generated clip, stop")
    _service_options(p, default_port=0)
    p.add_argument("--prompt", default="make the red circle blue")
    p.add_argument("--out", default="outputs", help="folder for demo_input.mp4 and demo_streamed.mp4")
    p.add_argument("--clip-frames", type=int, default=73, help="frames of the generated clip")
    p.add_argument("--clip-seed", type=int, default=20, help="scene of the generated clip")
    _stream_options(p)
    return parser


def _service_options(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (default tiny; sana-streaming-2b-ar on GPUs)")
    p.add_argument("--grpc-host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--grpc-port", type=int, default=default_port, help="0: a free port")
    p.add_argument("--redis-url", default=None, help="session registry in Redis (default: in-process)")
    p.add_argument("--replicas", nargs="*", default=[], metavar="STAGE=N",
                   help="replicas per stage: gateway, ingest, text, generator, egress, bidirectional (default 1 "
                        "each; bidirectional=0: no bidirectional_short sessions)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=2,
                   help="crash-resume checkpoint cut cadence in chunks (0: off)")  # fmt: skip
    p.add_argument("--checkpoint-stages", default="ingest,generator,egress",
                   help="stages a checkpoint cut holds: ingest,generator,egress (any replica may die) or "
                        "generator,egress (no VAE encoder cache in cuts; an ingest loss ends the session)")  # fmt: skip
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request message accepted")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session is reaped")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--model_path", default=None)
    p.add_argument("--vae_path", default=None)
    p.add_argument("--text_encoder_path", default=None)
    p.add_argument("--random-text", action="store_true", help="random prompt embeddings (benchmarks without Gemma)")
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPU share each model replica asks for")


def _stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--realtime", action="store_true", help="send frames at the video's fps instead of at once")
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None, help="frame height sent (resized/cropped; default 128)")
    p.add_argument("--width", type=int, default=None, help="frame width sent (default 192)")
    p.add_argument("--fps", type=float, default=None, help="default: the video's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-frames", type=int, default=24, help="frames per request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, help="write the stream's stats as JSON here")


@contextlib.contextmanager
def _serving(args: argparse.Namespace):
    """A local Ray instance running the application from serve's options; yields "host:port" of the gateway."""
    import os

    import ray
    from ray import serve

    from services.app import AppConfig, parse_replicas, run
    from services.recovery import parse_stages
    from services.stage import EngineSpec

    spec = EngineSpec(preset=args.preset, device=args.device, dtype=args.dtype, dit_weights=args.model_path,
                      vae_weights=args.vae_path, text_weights=args.text_encoder_path,
                      random_text=args.random_text)  # fmt: skip
    port = args.grpc_port or _free_port()
    cfg = AppConfig(
        preset=args.preset,
        grpc_host=args.grpc_host,
        grpc_port=port,
        redis_url=args.redis_url,
        replicas=parse_replicas(args.replicas),
        checkpoint_every=args.checkpoint_every,
        checkpoint_stages=parse_stages(args.checkpoint_stages),
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        idle_timeout_s=args.idle_timeout,
        engine=spec,
        num_gpus=args.num_gpus_per_replica,
    )
    root = str(Path(__file__).resolve().parents[1])
    otel = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}  # tracing config for every replica
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root, **otel}})
    try:
        run(cfg)
        yield f"{args.grpc_host}:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_serve(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        with _serving(args) as where:
            print(f"sana-stream: serving videoedit.v1.EditService on {where} (gRPC; health + reflection on); "
                  f"preset {args.preset}, registry {'redis ' + args.redis_url if args.redis_url else 'in-process'}, "
                  f"ready in {time.perf_counter() - t0:.0f} s. Ctrl-C stops.", flush=True)  # fmt: skip
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("sana-stream: stopping", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a clip, start the stack, stream the clip through it, write the edited mp4, stop."""
    from engine.config import get_preset
    from engine.testclips import write_clip

    preset = get_preset(args.preset)
    args.height, args.width = args.height or preset.height, args.width or preset.width
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.video_path = str(write_clip(out / "demo_input.mp4", args.clip_frames, args.height, args.width,
                                     seed=args.clip_seed))  # fmt: skip
    args.output = str(out / "demo_streamed.mp4")
    t0 = time.perf_counter()
    with _serving(args) as where:
        print(f"sana-stream: stack up on {where} in {time.perf_counter() - t0:.0f} s (local Ray, preset "
              f"{args.preset}); streaming {args.video_path}", flush=True)  # fmt: skip
        args.server = where
        cmd_stream(args)
    print(f"input:  {args.video_path}\nedited: {args.output}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.video_io import VideoWriter, read_video
    from services.client import EditClient

    clip = read_video(args.video_path, args.height or 128, args.width or 192, num_frames=args.num_frames)
    fps = args.fps or clip.fps or 16.0
    n = len(clip.frames)
    bar = tqdm(total=n, desc="edited", unit="frame")

    def progress(resp) -> None:
        if resp.WhichOneof("kind") == "frames":
            bar.update(resp.frames.count)

    with EditClient(args.server, api_key=args.api_key) as client:
        client.wait_ready(30)
        res = client.stream(
            clip.frames,
            args.prompt,
            chunk_frames=args.chunk_frames,
            fps=fps,
            realtime=args.realtime,
            on_response=progress,
            seed=args.seed,
            total_frames=None if args.realtime else n,
        )
    bar.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(out, fps=fps) as w:
        w.write(res.frames)
    stats = {**res.summary(), "input_frames": n, "output": str(out), "realtime": args.realtime}
    print(f"wrote {out} ({len(res.frames)} frames): {stats['fps']} FPS delivered, latency p50 "
          f"{stats['latency_ms_p50']} ms, p95 {stats['latency_ms_p95']} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"serve": cmd_serve, "stream": cmd_stream, "demo": cmd_demo}
    if args.command not in commands:
        return engine_cli.main(argv)
    import grpc

    statuses = {grpc.RpcError: lambda e: f"{e.code().name}: {e.details()}"}
    return engine_cli.guarded(commands[args.command], args, statuses)


if __name__ == "__main__":
    sys.exit(main())
