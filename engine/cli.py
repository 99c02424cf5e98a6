"""`sana-stream` command line: edit, model-info, bench.

`edit` keeps the official `inference_sana_streaming.py` argument names and defaults (per --mode), plus --preset
and --device. Errors a user can cause (bad video, missing weights, prompt too long, bad settings) print one line
`sana-stream: error: ...` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

MODE_DEFAULTS = {
    "long_streaming": {"preset": "sana-streaming-2b-ar", "num_frames": 969, "step": 4, "cfg_scale": 1.0},
    "bidirectional_short": {
        "preset": "sana-streaming-2b-bidirectional",
        "num_frames": 81,
        "step": 50,
        "cfg_scale": 6.0,
    },
}


def _str2bool(value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "y"}:
        return True
    if value.lower() in {"0", "false", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sana-stream", description="SANA-Streaming video-to-video editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit a video file (streaming or bidirectional) and write an mp4")
    p.add_argument("--mode", choices=tuple(MODE_DEFAULTS), default="long_streaming")
    p.add_argument("--preset", default=None, help="model preset (default: the mode's 2B preset; 'tiny' for demos)")
    p.add_argument("--config", default=None, help="preset name or JSON file of preset overrides")
    p.add_argument("--model_path", default=None, help="DiT checkpoint: local path or hf://owner/repo/path")
    p.add_argument("--vae_path", default=None, help="VAE: local folder/file or hf://owner/repo/subfolder")
    p.add_argument("--text_encoder_path", default=None, help="Gemma-2 text encoder: local folder or hf://owner/repo")
    p.add_argument("--prompt", required=True)
    p.add_argument("--video_path", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--output_name", default="output.mp4")
    p.add_argument("--num_frames", type=int, default=None, help="frames to read (default per mode: 969 / 81)")
    p.add_argument("--height", type=int, default=None, help="default: the preset's (704 for the 2B models)")
    p.add_argument("--width", type=int, default=None, help="default: the preset's (1280 for the 2B models)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--step", type=int, default=None, help="denoising steps (default per mode: 4 / 50)")
    p.add_argument("--cfg_scale", type=float, default=None, help="default per mode: 1.0 / 6.0")
    p.add_argument("--flow_shift", type=float, default=None, help="default: the preset's (8.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--motion_score", type=int, default=None, help="bidirectional prompt suffix (default 10)")
    p.add_argument("--num_cached_blocks", type=int, default=2)
    p.add_argument("--sink_token", type=_str2bool, default=True)
    p.add_argument("--efficient_cache", action="store_true", help="write caches in the last denoising step")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("model-info", help="describe a preset's DiT (no weights are allocated)")
    p.add_argument("--preset", default="sana-streaming-2b-ar")
    p.add_argument("--keys", action="store_true", help="print 'name<TAB>AxBxC' per state-dict tensor and nothing else")

    p = sub.add_parser("bench", help="time the DiT, VAE and a streaming session with random weights")
    p.add_argument("--preset", default="sana-streaming-2b-ar")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--chunks", type=int, default=6, help="streaming chunks to time (after warm-up)")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="skip the fast-path figures (graphs, batching, breakdown)")

    from engine.train.cli import add_subcommands

    add_subcommands(sub)  # train, eval
    return parser


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from engine.config import get_preset
    from engine.model.hybrid_dit import SanaStreamingDiT

    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = SanaStreamingDiT(cfg.dit)
    sd = model.state_dict()
    if args.keys:
        sys.stdout.write("".join(f"{k}\t{'x'.join(map(str, v.shape))}\n" for k, v in sd.items()))
        return 0
    d = cfg.dit
    n_params = sum(p.numel() for p in model.parameters())
    n_buf = sum(b.numel() for b in model.buffers())
    kinds = ["softmax" if i in d.softmax_layer_ids else "gdn" for i in range(d.depth)]
    print(f"preset          {cfg.name} ({'streaming AR' if d.streaming else 'bidirectional'})")
    print(f"width x depth   {d.hidden_size} x {d.depth}; self-attn {d.self_heads} heads x {d.head_dim}")
    print(f"layers          {kinds.count('gdn')} GDN, {kinds.count('softmax')} softmax at {list(d.softmax_layer_ids)}")
    print(f"parameters      {n_params:,} (+ {n_buf:,} buffer elements), {len(sd)} tensors")
    print(f"memory at bf16  {(n_params + n_buf) * 2 / 1e9:.3f} GB")
    print(f"latents         {d.in_channels} noisy + {d.source_channels} source channels; text {d.text_len}x"
          f"{d.caption_channels}")  # fmt: skip
    print(f"default video   {cfg.width}x{cfg.height}, {cfg.fps} fps, {cfg.steps} steps")
    return 0


def _load_overrides(args: argparse.Namespace):
    """The preset to use: --preset, else --config (a name or a JSON file of overrides), else the mode's."""
    import dataclasses
    import json

    from engine.config import get_preset

    base = args.preset or MODE_DEFAULTS[args.mode]["preset"]
    if args.config and not args.preset:
        path = Path(args.config)
        if not path.exists():
            return get_preset(args.config)
        over = json.loads(path.read_text())
        cfg = get_preset(over.pop("preset", base))
        return dataclasses.replace(cfg, **over)
    return get_preset(base)


def cmd_edit(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from engine.pipeline import Engine, StreamingEditor, edit_bidirectional
    from engine.sampler import DEFAULT_NEGATIVE_PROMPT, bidirectional_prompt
    from engine.session import SessionSettings
    from engine.video_io import VideoWriter, read_video

    md = MODE_DEFAULTS[args.mode]
    cfg = _load_overrides(args)
    height, width = args.height or cfg.height, args.width or cfg.width
    num_frames = args.num_frames or md["num_frames"]
    steps = args.step or md["step"]
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else md["cfg_scale"]
    bidir = args.mode == "bidirectional_short"
    negative = args.negative_prompt if args.negative_prompt is not None else (DEFAULT_NEGATIVE_PROMPT if bidir else "")
    prompt = args.prompt
    if bidir:
        prompt = bidirectional_prompt(prompt, 10 if args.motion_score is None else args.motion_score)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None

    clip = read_video(args.video_path, height, width, num_frames=num_frames)
    engine = Engine.load(
        cfg,
        mode=args.mode,
        device=device,
        dtype=dtype,
        dit_weights=args.model_path,
        vae_weights=args.vae_path,
        text_weights=args.text_encoder_path,
        seed=args.seed,
    )
    settings = SessionSettings(
        prompt=prompt,
        negative_prompt=negative,
        seed=args.seed,
        steps=steps,
        flow_shift=args.flow_shift if args.flow_shift is not None else cfg.flow_shift,
        cfg_scale=cfg_scale,
        num_cached_blocks=args.num_cached_blocks,
        sink_token=args.sink_token,
        efficient_cache=args.efficient_cache,
        height=height,
        width=width,
        fps=args.fps,
        total_frames=len(clip.frames),
    )
    out_path = Path(args.output_dir) / args.output_name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with VideoWriter(out_path, fps=args.fps) as writer:
        if bidir:
            bar = tqdm(total=steps, desc="denoising", unit="step", disable=args.no_progress)
            writer.write(edit_bidirectional(engine, clip.frames, settings, on_step=lambda i, n: bar.update(1)))
            bar.close()
        else:
            editor = StreamingEditor(engine)
            state = editor.open(settings)
            n_lat = editor.total_latents(state) or 0
            n_chunks = max(1, (n_lat - 3) // 3 + 1) if n_lat > 3 else 1
            bar = tqdm(total=n_chunks, desc="chunks", unit="chunk", disable=args.no_progress)
            step_frames = 8 * 3
            for i in range(0, len(clip.frames), step_frames):
                writer.write(editor.push(state, clip.frames[i : i + step_frames], on_chunk=lambda c, t: bar.update(1)))
            writer.write(editor.finish(state, on_chunk=lambda c, t: bar.update(1)))
            bar.close()
    dt = time.perf_counter() - t0
    print(f"wrote {out_path} ({len(clip.frames)} frames, {width}x{height}) in {dt:.1f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import run_bench

    return run_bench(args)


def guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace, describe: dict | None = None) -> int:
    """Run a subcommand: errors a user can cause print one line `sana-stream: error: ...` and give status 2.

    describe: extra {exception type: message function} for errors of other layers (e.g. gRPC statuses)."""
    from engine.errors import USER_ERRORS

    describe = dict(describe or {})
    try:
        return fn(args)
    except (*describe, *USER_ERRORS) as e:
        text = next((f(e) for t, f in describe.items() if isinstance(e, t)), str(e))
        print(f"sana-stream: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sana-stream: interrupted", file=sys.stderr)
        return 130


def _run_training(args: argparse.Namespace) -> int:
    from engine.train.cli import run

    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "edit": cmd_edit,
    "model-info": cmd_model_info,
    "bench": cmd_bench,
    "train": _run_training,
    "eval": _run_training,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
