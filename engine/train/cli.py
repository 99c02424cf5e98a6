"""`sana-stream train ...` and `sana-stream eval`: wired into engine/cli.py by `add_subcommands` / `run`.

    sana-stream train make-data --out DIR --split train|test --count N [--specs-only]
    sana-stream train flow      --manifest M --run-dir D [--variant streaming|bidirectional] [--reverse-reg-weight W]
    sana-stream train streaming --manifest M --run-dir D --init G.safetensors --teacher T.safetensors [...]
    sana-stream train recipe    --out DIR            (the shipped tiny editor's whole GPU run, engine/train/recipe.py)
    sana-stream eval [--count N | --indices I ...] [--out docs/eval] [--dit ...] [--bidirectional-dit ...]
                     [--ablation name=path ...] [--device cuda]     (default examples: evaluate.eval_examples)
                     -> <out>/metrics.json, strip_<i>.jpg and the generated part of <out>/REPORT.md

Non-goals: distributed launchers; hyper-parameter files (flags only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

COMMANDS = ("train", "eval")


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train models (data generation, flow matching, streaming DMD + CRR)")
    sub = p.add_subparsers(dest="train_command", required=True)

    d = sub.add_parser("make-data", help="write a procedural split: mp4 pairs + JSONL manifest")
    d.add_argument("--out", required=True)
    d.add_argument("--split", choices=("train", "test"), default="train")
    d.add_argument("--count", type=int, default=100)
    d.add_argument("--specs-only", action="store_true", help="rows carry procedural specs, no video files")

    for name, help_ in (("flow", "V2V flow matching (+ optional CRR)"), ("streaming", "streaming DMD + CRR stage")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--manifest", required=True)
        s.add_argument("--run-dir", required=True)
        s.add_argument("--preset", default="tiny")
        s.add_argument("--vae", default=None, help="VAE weights (default: the preset's)")
        s.add_argument("--text-encoder", default=None, help="text encoder folder (default: the preset's)")
        s.add_argument("--init", default=None, help="DiT weights to start from (streaming: the generator)")
        s.add_argument("--num-frames", type=int, default=49, help="pixel frames per clip (8k + 1)")
        s.add_argument("--steps", type=int, default=1000)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--lr", type=float, default=None)
        s.add_argument("--reverse-reg-weight", type=float, default=0.0 if name == "flow" else 0.5)
        s.add_argument("--time-budget-s", type=float, default=None)
        s.add_argument("--device", default=None)
        s.add_argument("--seed", type=int, default=0)
        if name == "flow":
            s.add_argument("--variant", choices=("streaming", "bidirectional"), default="bidirectional")
        else:
            s.add_argument("--teacher", required=True, help="bidirectional teacher weights (critic starts from it)")
            s.add_argument("--guidance", type=float, default=3.0)

    r = sub.add_parser("recipe", help="train the shipped tiny editor end to end (one GPU, minutes)")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/sana_tiny_runs")
    r.add_argument("--stage", choices=("1", "2", "all"), default="all")
    r.add_argument("--num-train", type=int, default=None)
    r.add_argument("--device", default=None)

    e = subparsers.add_parser("eval", help="evaluate the tiny editor on the held-out procedural split")
    e.add_argument("--count", type=int, default=None, help="the first N of the test split instead of the default set")
    e.add_argument("--indices", type=int, nargs="*", default=None, help="test-split indices instead of the default set")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default="docs/eval", help="folder for metrics.json, strips and REPORT.md")
    e.add_argument("--dit", default=None, help="streaming DiT (default: the shipped one)")
    e.add_argument("--bidirectional-dit", default=None, help="bidirectional DiT (default: the shipped one)")
    e.add_argument("--ablation", action="append", default=[], metavar="NAME=PATH",
                   help="extra streaming DiTs to compare (e.g. nocrr=path)")  # fmt: skip


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_data(args, preset):
    from engine.data.manifest import read_manifest
    from engine.text import TextEncoder
    from engine.train.trainer import encode_examples
    from engine.vae import VideoVAE

    dev = _device(args.device)
    vae = VideoVAE(preset.vae, args.vae or preset.vae_weights, device=dev)
    text = TextEncoder(preset.text, args.text_encoder or preset.text_weights, device=dev)
    return encode_examples(read_manifest(args.manifest), vae, text, preset.height, preset.width, args.num_frames)


def _dit(cfg, weights, device, seed):
    from engine.model.hybrid_dit import SanaStreamingDiT
    from engine.train.trainer import training_init
    from engine.weights import load_state_dict_file

    model = training_init(SanaStreamingDiT(cfg), seed)
    if weights:
        model.load_state_dict(load_state_dict_file(weights))
    return model.to(device)


def run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return _run_eval(args)
    from engine.config import get_preset
    from engine.train.trainer import TrainConfig, train_flow, train_streaming

    tc = args.train_command
    if tc == "make-data":
        from engine.data.manifest import make_procedural_manifest

        path = make_procedural_manifest(args.out, args.split, args.count, videos=not args.specs_only)
        print(f"wrote {path}")
        return 0
    if tc == "recipe":
        from engine.train.recipe import run_tiny_recipe

        extra = {} if args.num_train is None else {"num_train": args.num_train}
        run_tiny_recipe(args.out, args.work, stage=args.stage, device=str(_device(args.device)), **extra)
        return 0
    preset = get_preset(args.preset)
    dev = _device(args.device)
    data = _load_data(args, preset)
    common = dict(steps=args.steps, batch_size=args.batch_size, reverse_reg_weight=args.reverse_reg_weight,
                  time_budget_s=args.time_budget_s, seed=args.seed)  # fmt: skip
    if tc == "flow":
        cfg = dataclasses.replace(preset.dit, streaming=args.variant == "streaming")
        model = _dit(cfg, args.init, dev, args.seed)
        train_flow(model, data, TrainConfig(lr=args.lr or 5e-5, **common), args.run_dir, log=_print)
        return 0
    gen = _dit(dataclasses.replace(preset.dit, streaming=True), args.init, dev, args.seed)
    bidi = dataclasses.replace(preset.dit, streaming=False)
    teacher, critic = _dit(bidi, args.teacher, dev, 0), _dit(bidi, args.teacher, dev, 0)
    cfg = TrainConfig(lr=args.lr or 1e-5, guidance=args.guidance, **common)
    train_streaming(gen, teacher, critic, data, cfg, args.run_dir, log=_print)
    return 0


def _print(row: dict) -> None:
    print(json.dumps(row), flush=True)


REPORT_BEGIN, REPORT_END = "<!-- sana-stream eval: begin -->", "<!-- sana-stream eval: end -->"


def write_report(path: Path, body: str) -> None:
    """Put the generated tables and strips between the REPORT_BEGIN / REPORT_END markers of `path`, keeping the
    hand-written text around them (a new file: just the markers and the body)."""
    block = f"{REPORT_BEGIN}\n{body}\n{REPORT_END}"
    text = path.read_text() if path.exists() else ""
    if REPORT_BEGIN in text and REPORT_END in text:
        head, rest = text.split(REPORT_BEGIN, 1)
        text = head + block + rest.split(REPORT_END, 1)[1]
    else:
        text = (text + "\n" if text else "") + block + "\n"
    path.write_text(text)


def _run_eval(args: argparse.Namespace) -> int:
    from engine.train.evaluate import ASSETS, eval_examples, evaluate, report_markdown

    models = {
        "streaming (DMD + CRR)": ("long_streaming", args.dit or str(ASSETS / "dit_streaming.safetensors")),
        "bidirectional": (
            "bidirectional_short",
            args.bidirectional_dit or str(ASSETS / "dit_bidirectional.safetensors"),
        ),
    }  # fmt: skip
    for item in args.ablation:
        name, _, path = item.partition("=")
        models[name] = ("long_streaming", path)
    examples = None if args.count is not None or args.indices is not None else eval_examples()
    results = evaluate(models, args.count or 8, args.out, strips=True, indices=args.indices, device=args.device,
                       examples=examples)  # fmt: skip
    first = next(iter(models))
    strips = [(f"strip_{i}.jpg", r["prompt"]) for i, r in enumerate(results[first]["examples"])]
    write_report(Path(args.out) / "REPORT.md", report_markdown(results, strips))
    for name, r in results.items():
        print(name, json.dumps({k: round(v, 3) for k, v in r["mean"].items()}))
    return 0
