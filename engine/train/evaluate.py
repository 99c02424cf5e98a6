"""`sana-stream eval`: edit fidelity and temporal consistency of a trained editor on the held-out split.

Per example (procedural `test` split: unseen recolor pairs, 73-frame clips, unseen scenes):
    psnr / ssim            edited output vs ground truth, whole frame (SSIM: 8x8 windows on luma)
    psnr_in / psnr_out     inside / outside the edit region (pixels the true edit changes, dilated 2 px)
    psnr_src               the unedited source vs ground truth (the "do nothing" baseline)
    flicker                mean |frame[t+1] - frame[t]| of the output divided by the same of the source
    seam                   mean |frame difference| across chunk boundaries (pixel frames 8 * (latent chunk
                           start) - 1 -> 8 * start) divided by the output's mean frame difference elsewhere
                           (1.0 = seams are no jumpier than ordinary frames)
Modes: streaming (the engine's StreamingEditor, 4 steps, cache refresh) and bidirectional (edit_bidirectional
with the bidirectional DiT). Also: a strip PNG per example (source / edited / ground truth, 4 frames each).

Non-goals: perceptual metrics (LPIPS, FVD), real videos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.manifest import procedural_examples
from engine.data.procedural import edit_region, render_pair
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


def strip(source: np.ndarray, edited: np.ndarray, truth: np.ndarray, frames: int = 4) -> np.ndarray:
    """Rows source / edited / ground truth, `frames` evenly spaced frames each -> uint8 (3H, frames*W, 3)."""
    idx = np.linspace(0, len(source) - 1, frames).round().astype(int)
    return np.concatenate([np.concatenate(list(v[idx]), axis=1) for v in (source, edited, truth)], axis=0)


def load_engine(mode: str, dit: str | None, vae: str | None = None, text: str | None = None):
    from engine.pipeline import Engine

    return Engine.load(
        "tiny",
        mode=mode,
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
    strips_for: str | None = None,
    vae: str | None = None,
    text: str | None = None,
    indices: list[int] | None = None,
) -> dict:
    """models: name -> (mode, DiT weights). Returns {name: {"mean": metrics, "examples": [...]}}; writes
    `<out_dir>/metrics.json` and, for the model `strips_for`, `<out_dir>/strip_<i>.png`."""
    from PIL import Image

    indices = indices if indices is not None else list(range(count))
    examples = [procedural_examples("test", 1, start=i)[0] for i in indices]
    pairs = [render_pair(e.spec) for e in examples]
    results: dict = {}
    for name, (mode, weights) in models.items():
        engine = load_engine(mode, weights, vae, text)
        rows = []
        for i, (ex, (src, tgt)) in enumerate(zip(examples, pairs, strict=True)):
            out = edit_clip(engine, src, ex.prompt, mode)
            m = score(src, out, tgt)
            rows.append({"prompt": ex.prompt, "edit": ex.spec.edit, **m.__dict__})
            if out_dir is not None and name == strips_for:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                Image.fromarray(strip(src, out, tgt)).save(Path(out_dir) / f"strip_{i}.png")
        keys = [k for k in rows[0] if k not in ("prompt", "edit")]
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
        results[name] = {"mode": mode, "weights": weights, "mean": mean, "examples": rows}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def report_markdown(results: dict, strips: list[tuple[str, str]]) -> str:
    """A REPORT.md body: the mean table per model and the strips (relative path, caption)."""
    cols = ["psnr", "psnr_src", "ssim", "psnr_in", "psnr_out", "flicker", "seam"]
    lines = ["| model | mode | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mode']} | " + " | ".join(f"{r['mean'][c]:.3f}" for c in cols) + " |")
    lines.append("")
    for path, caption in strips:
        lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)
