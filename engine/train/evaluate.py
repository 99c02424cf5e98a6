"""`sana-stream eval`: edit fidelity and temporal consistency of a trained editor on the held-out split.

Examples (`eval_examples`, the default set of 16; or the first N / chosen indices of the procedural `test` split):
unseen scenes; recolors of colour pairs training never contains (either direction), the same with pairs it does
contain (the demo's case), checkerboard backgrounds, grayscale, and 145-frame clips (3x the training length).

Per example:
    psnr / ssim            edited output vs ground truth, whole frame (SSIM: 8x8 windows on luma)
    psnr_in / psnr_out     inside / outside the edit region (pixels the true edit changes, dilated 2 px)
    psnr_src               the unedited source vs ground truth (the "do nothing" baseline)
    flicker                mean |frame[t+1] - frame[t]| of the output divided by the same of the source
    seam                   mean |frame difference| across chunk boundaries (pixel frames 8 * (latent chunk
                           start) - 1 -> 8 * start) divided by the output's mean frame difference elsewhere
                           (1.0 = seams are no jumpier than ordinary frames)
Modes: streaming (the engine's StreamingEditor, 4 steps, cache refresh) and bidirectional (edit_bidirectional
with the bidirectional DiT, 20 steps, cfg 1). Also: a strip image per example: source, every model's output and
the ground truth, one labelled row each, 4 frames.

Non-goals: perceptual metrics (LPIPS, FVD), real videos.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.procedural import (
    HELD_OUT_PAIRS,
    PALETTE,
    EditSpec,
    edit_region,
    named_scene,
    prompts,
    render_pair,
    sample_spec,
)
from engine.session import SessionSettings

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny"


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        if not mask.any():
            return float("nan")
        d = d[mask]
    return float(10 * np.log10(255.0**2 / max(d.mean(), 1e-10)))


def ssim(a: np.ndarray, b: np.ndarray, win: int = 8) -> float:
    """Mean SSIM of luma over non-overlapping win x win windows, all frames. a, b: (n, H, W, 3) uint8."""
    w = np.asarray([0.299, 0.587, 0.114])
    x, y = a.astype(np.float64) @ w, b.astype(np.float64) @ w
    n, H, W = x.shape
    x = x[:, : H // win * win, : W // win * win].reshape(n, H // win, win, W // win, win)
    y = y[:, : H // win * win, : W // win * win].reshape(n, H // win, win, W // win, win)
    mx, my = x.mean((2, 4)), y.mean((2, 4))
    vx, vy = x.var((2, 4)), y.var((2, 4))
    cov = ((x - mx[:, :, None, :, None]) * (y - my[:, :, None, :, None])).mean((2, 4))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def frame_diff(v: np.ndarray) -> np.ndarray:
    """(n-1,) mean absolute difference between consecutive frames."""
    return np.abs(np.diff(v.astype(np.float64), axis=0)).mean((1, 2, 3))


def seam_frames(num_frames: int, chunk: int = 3, tc: int = 8) -> list[int]:
    """Pixel frames f such that f-1 -> f crosses a latent chunk boundary of the streaming editor."""
    from engine.sampler import chunk_bounds

    latents = (num_frames - 1 + tc - 1) // tc + 1
    return [a * tc - tc + 1 for a, _ in chunk_bounds(latents, chunk)[1:] if a * tc - tc + 1 < num_frames]


@dataclass
class Metrics:
    psnr: float
    ssim: float
    psnr_in: float
    psnr_out: float
    psnr_src: float
    flicker: float
    seam: float


def score(source: np.ndarray, edited: np.ndarray, truth: np.ndarray) -> Metrics:
    region = edit_region(source, truth)  # (n, H, W)
    r3 = np.repeat(region[..., None], 3, -1)
    d_out, d_src = frame_diff(edited), frame_diff(source)
    seams = [f - 1 for f in seam_frames(len(edited))]
    normal = np.delete(d_out, seams) if seams else d_out
    return Metrics(
        psnr=psnr(edited, truth),
        ssim=ssim(edited, truth),
        psnr_in=psnr(edited, truth, r3),
        psnr_out=psnr(edited, truth, ~r3),
        psnr_src=psnr(source, truth),
        flicker=float(d_out.mean() / max(d_src.mean(), 1e-6)),
        seam=float(d_out[seams].mean() / max(normal.mean(), 1e-6)) if seams else float("nan"),
    )


LONG_FRAMES = 145


def seen_pair_recolor(seed: int) -> EditSpec:
    """A recolor of shape 0 of test scene `seed` to a colour pair the train split does contain."""
    rng = np.random.default_rng([seed, 13])
    kind = ("shapes", "pan", "lighting", "pan+lighting")[seed % 4]
    _, names = named_scene(seed, kind)
    for new in rng.permutation(list(PALETTE)):
        if new not in names and frozenset((names[0], str(new))) not in HELD_OUT_PAIRS:
            return EditSpec(seed, kind, 73, "recolor", 0, names[0], str(new))
    raise ValueError(f"scene {seed} has no admissible seen pair")


def eval_examples() -> list[tuple[str, EditSpec]]:
    """The default held-out set: (category, spec) x 16."""
    out = [("recolor (unseen pair)", sample_spec("test", i)) for i in (0, 1, 2, 3, 4, 9)]
    out += [("recolor (seen pair)", seen_pair_recolor(s)) for s in (1_000_500, 1_000_501)]
    out += [("checkerboard", sample_spec("test", i)) for i in (5, 6, 10)]
    out += [("grayscale", sample_spec("test", i)) for i in (11, 22, 32)]
    out += [(f"long ({LONG_FRAMES} frames)", dataclasses.replace(sample_spec("test", i), num_frames=LONG_FRAMES))
            for i in (14, 12)]  # fmt: skip
    return out


DEMO_SEED, DEMO_FRAMES, DEMO_PROMPT = 20, 73, "make the red circle blue"
"""The README's demo: `python -m engine.testclips --frames 73 --height 128 --width 192 --seed 20 in.mp4` and
this prompt. Scene 20 holds a red circle (shape 0), a yellow square, a yellow circle and a purple square."""


def demo_clip(num_frames: int = DEMO_FRAMES) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(source, ground truth, per-shape masks) of the demo clip at 128x192: the truth has the red circle in
    the palette's blue; mask i (n, H, W) bool is the interior of shape i (where recolouring it changes a pixel
    by more than 100 in some channel, so anti-aliased rims are left out)."""
    from engine.data.procedural import hue_color
    from engine.testclips import render_scene, sample_scene

    scene = sample_scene(DEMO_SEED, "shapes", 192 / 128)
    src = render_scene(scene, num_frames, 128, 192)

    def recolored(i: int, color) -> np.ndarray:
        shapes = list(scene.shapes)
        shapes[i] = dataclasses.replace(shapes[i], color=color)
        return render_scene(dataclasses.replace(scene, shapes=tuple(shapes)), num_frames, 128, 192)

    truth = recolored(0, hue_color(PALETTE["blue"]))
    masks = []
    for i, s in enumerate(scene.shapes):
        other = recolored(i, tuple(1.0 - c for c in s.color))
        masks.append(np.abs(src.astype(np.int16) - other.astype(np.int16)).max(-1) > 100)
    return src, truth, masks


def demo_check(edited: np.ndarray, source: np.ndarray, truth: np.ndarray, masks: list[np.ndarray]) -> dict:
    """Numbers of the demo edit ("make the red circle blue" on the demo clip; masks from `demo_clip`):
    circle_rgb      mean output colour (0..255) inside the red circle (mask 0)
    blue_margin     its blue minus the larger of its red and green (> 0: blue-dominant)
    others_rgb      per other shape, its mean output colour
    others_ratio    per other shape, |mean output - mean source colour| / |mean output - the target blue|
                    (< 1: the shape's colour stays nearer its own than the blue the edit asks for)
    others_err      per other shape, mean |output - source| inside it (channel units)
    psnr_keep       PSNR of output vs source outside the edit region (every pixel the true edit changes,
                    dilated 2 px)
    psnr, psnr_src  whole-frame PSNR of the output / of the source vs the ground truth"""
    rgb = edited[masks[0]].astype(np.float64).mean(0)
    blue = truth[masks[0]].astype(np.float64).mean(0)
    o_rgb, ratio, err = [], [], []
    for m in masks[1:]:
        o, s = edited[m].astype(np.float64), source[m].astype(np.float64)
        mo = o.mean(0)
        o_rgb.append([round(float(c), 1) for c in mo])
        ratio.append(float(np.linalg.norm(mo - s.mean(0)) / max(np.linalg.norm(mo - blue), 1e-6)))
        err.append(float(np.abs(o - s).mean()))
    keep = ~np.repeat(edit_region(source, truth)[..., None], 3, -1)
    return {
        "circle_rgb": [round(float(c), 1) for c in rgb],
        "blue_margin": float(rgb[2] - max(rgb[0], rgb[1])),
        "others_rgb": o_rgb,
        "others_ratio": ratio,
        "others_err": err,
        "psnr_keep": psnr(edited, source, keep),
        "psnr": psnr(edited, truth),
        "psnr_src": psnr(source, truth),
    }


def strip(source: np.ndarray, edited: np.ndarray, truth: np.ndarray, frames: int = 4) -> np.ndarray:
    """Rows source / edited / ground truth, `frames` evenly spaced frames each -> uint8 (3H, frames*W, 3)."""
    return multi_strip([("source", source), ("edited", edited), ("truth", truth)], frames, label_width=0)


def multi_strip(rows: list[tuple[str, np.ndarray]], frames: int = 4, label_width: int = 112) -> np.ndarray:
    """One row per (label, uint8 video), `frames` evenly spaced frames each, the label in a left margin."""
    from PIL import Image, ImageDraw

    n, H, W = rows[0][1].shape[:3]
    idx = np.linspace(0, n - 1, frames).round().astype(int)
    out = []
    for label, video in rows:
        row = np.concatenate(list(video[idx]), axis=1)
        if label_width:
            pad = Image.new("RGB", (label_width, H), (255, 255, 255))
            draw = ImageDraw.Draw(pad)
            for k, line in enumerate(_wrap(label, label_width // 6)):
                draw.text((4, 4 + 11 * k), line, fill=(0, 0, 0))
            row = np.concatenate([np.asarray(pad), row], axis=1)
        out.append(row)
    return np.concatenate(out, axis=0)


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


def load_engine(mode: str, dit: str | None, vae: str | None = None, text: str | None = None, device="cpu",
                preset=None):  # fmt: skip
    from engine.pipeline import Engine

    return Engine.load(
        preset or "tiny",
        mode=mode,
        device=device,
        dit_weights=dit,
        vae_weights=vae or str(ASSETS / "vae.safetensors"),
        text_weights=text or str(ASSETS / "text"),
    )


@torch.no_grad()
def edit_clip(
    engine, frames: np.ndarray, prompt: str, mode: str, seed: int = 0, steps: int | None = None
) -> np.ndarray:
    """Run the engine on uint8 frames (n, H, W, 3) -> edited uint8 frames (streaming: the session path)."""
    from engine.pipeline import StreamingEditor, edit_bidirectional

    H, W = frames.shape[1:3]
    if mode == "bidirectional_short":
        s = SessionSettings(prompt=prompt, seed=seed, steps=steps or 20, cfg_scale=1.0, height=H, width=W)
        return edit_bidirectional(engine, frames, s)
    s = SessionSettings(prompt=prompt, seed=seed, steps=steps or 4, height=H, width=W, total_frames=len(frames))
    ed = StreamingEditor(engine)
    state = ed.open(s)
    out = [ed.push(state, frames[i : i + 24]) for i in range(0, len(frames), 24)]
    out.append(ed.finish(state))
    return np.concatenate(out)


def evaluate(
    models: dict[str, tuple[str, str]],
    count: int = 8,
    out_dir: str | Path | None = None,
    strips: bool = False,
    vae: str | None = None,
    text: str | None = None,
    indices: list[int] | None = None,
    device: str = "cpu",
    preset=None,
    examples: list[tuple[str, EditSpec]] | None = None,
) -> dict:
    """models: name -> (mode, DiT weights). Examples: `examples`, else the test split's `indices`, else its first
    `count`. Returns {name: {"mode", "weights", "mean": metrics, "by_category": {category: metrics},
    "examples": [...]}}; writes `<out_dir>/metrics.json` and, with `strips`, `<out_dir>/strip_<i>.jpg`."""
    from PIL import Image

    if examples is None:
        indices = indices if indices is not None else list(range(count))
        examples = [(sample_spec("test", i).edit, sample_spec("test", i)) for i in indices]
    engines = {name: load_engine(mode, w, vae, text, device, preset) for name, (mode, w) in models.items()}
    rows: dict[str, list[dict]] = {name: [] for name in models}
    for i, (category, spec) in enumerate(examples):
        src, tgt = render_pair(spec)
        prompt = prompts(spec)[0]
        outs = []
        for name, (mode, _) in models.items():
            out = edit_clip(engines[name], src, prompt, mode)
            m = score(src, out, tgt)
            rows[name].append({"prompt": prompt, "edit": spec.edit, "category": category, "frames": len(src),
                               **m.__dict__})  # fmt: skip
            outs.append((name, out))
        if out_dir is not None and strips:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            img = multi_strip([("source", src), *outs, ("ground truth", tgt)])
            Image.fromarray(img).save(Path(out_dir) / f"strip_{i}.jpg", quality=88)
    results: dict = {}
    for name, (mode, weights) in models.items():
        keys = [k for k in rows[name][0] if k not in ("prompt", "edit", "category", "frames")]
        cats = sorted({r["category"] for r in rows[name]})
        results[name] = {
            "mode": mode,
            "weights": weights,
            "mean": _mean(rows[name], keys),
            "by_category": {c: _mean([r for r in rows[name] if r["category"] == c], keys) for c in cats},
            "examples": rows[name],
        }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def _mean(rows: list[dict], keys: list[str]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}


COLUMNS = ["psnr", "psnr_src", "ssim", "psnr_in", "psnr_out", "flicker", "seam"]


def report_markdown(results: dict, strips: list[tuple[str, str]]) -> str:
    """A REPORT.md body: the mean table per model, per-category PSNR, per-example PSNR, and the strips."""
    lines = ["| model | mode | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mode']} | " + " | ".join(f"{r['mean'][c]:.3f}" for c in COLUMNS) + " |")
    first = next(iter(results.values()))
    cats = list(first["by_category"])
    lines += ["", "Per category, PSNR output / psnr_in / psnr_out (dB; source vs truth in the last row):", ""]
    lines += ["| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for name, r in results.items():
        cells = [f"{r['by_category'][c]['psnr']:.1f} / {r['by_category'][c]['psnr_in']:.1f} / "
                 f"{r['by_category'][c]['psnr_out']:.1f}" for c in cats]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| (source) | " + " | ".join(f"{first['by_category'][c]['psnr_src']:.1f}" for c in cats) + " |")
    lines += ["", "Per example, whole-frame PSNR (dB):", ""]
    ex = first["examples"]
    lines += [
        "| # | prompt | frames | source | " + " | ".join(results) + " |",
        "|---|---|---|---|" + "---|" * len(results),
    ]
    for i, e in enumerate(ex):
        cells = [f"{results[n]['examples'][i]['psnr']:.1f}" for n in results]
        lines.append(f"| {i} | {e['prompt']} | {e['frames']} | {e['psnr_src']:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
    for path, caption in strips:
        lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)
