"""Procedural test and demo clips: moving coloured shapes over a textured gradient, no downloads.

A clip is a `Scene` (a frozen description sampled from a seed) rendered at any size and length, so the same
scene exists at 128x192 for tests and 704x1280 for demos, and an edit can later be expressed as a change of
the scene (recolour a shape, swap the background) and rendered again to make a paired example.

Geometry is in units of the frame height (y in [0, 1] top to bottom, x in [0, width / height]); time in
frames.
Shapes bounce inside the frame (the camera tracks them); the background lives in world space, so a camera pan
moves it across the frame. Lighting change is a slow global gain.

Scope: `sample_scene`, `render_scene`, `make_clip`, `write_clip`. Non-goals: realism, occlusion reasoning,
motion blur, audio, edit programs (a later module builds on `Scene`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.video_io import write_video

__all__ = [
    "KINDS",
    "Background",
    "Checkerboard",
    "Scene",
    "Shape",
    "make_clip",
    "render_scene",
    "render_scene_ex",
    "sample_scene",
    "write_clip",
]

KINDS = ("shapes", "pan", "lighting", "pan+lighting")
"""shapes: static camera and light; pan: the background slides; lighting: the global gain varies; both."""


@dataclass(frozen=True)
class Shape:
    kind: str
    """"circle" or "square"."""
    color: tuple[float, float, float]
    """RGB in [0, 1]."""
    size: float
    """Radius (circle) or half side (square), in frame heights."""
    start: tuple[float, float]
    """Centre (x, y) at frame 0."""
    velocity: tuple[float, float]
    """Frame heights per frame; the shape bounces off the frame edges."""
    spin: float = 0.0
    """Radians per frame (squares)."""


@dataclass(frozen=True)
class Background:
    top: tuple[float, float, float]
    bottom: tuple[float, float, float]
    """Gradient end colours (RGB in [0, 1]) along `direction`."""
    direction: float
    """Gradient direction in radians (0 = top to bottom)."""
    waves: tuple[tuple[float, float, float, float], ...]
    """Texture: (frequency x, frequency y, phase, amplitude) sinusoids in cycles per frame height."""


@dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[Shape, ...]
    pan: tuple[float, float] = (0.0, 0.0)
    """Camera velocity over the background, frame heights per frame."""
    light_amplitude: float = 0.0
    """Global gain = 1 + amplitude * sin(2 pi t / period + phase)."""
    light_period: float = 48.0
    light_phase: float = 0.0


def _color(rng: np.random.Generator, saturation: float, value: float) -> tuple[float, float, float]:
    """A colour of random hue with the given HSV saturation and value."""
    h = rng.uniform(0.0, 6.0)
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = value - c
    return (r + m, g + m, b + m)


def sample_scene(seed: int, kind: str = "shapes", aspect: float = 1.5) -> Scene:
    """Deterministic scene for `seed`: a circle, a square and 0-2 more shapes; `aspect` = width / height."""
    if kind not in KINDS:
        raise ValueError(f"unknown clip kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng(seed)
    background = Background(
        top=_color(rng, 0.35, 0.85),
        bottom=_color(rng, 0.5, 0.35),
        direction=float(rng.uniform(-0.6, 0.6)),
        waves=tuple(
            (float(rng.uniform(-9, 9)), float(rng.uniform(-9, 9)), float(rng.uniform(0, 2 * np.pi)), 0.06)
            for _ in range(3)
        ),
    )
    kinds = ["circle", "square"] + list(rng.choice(["circle", "square"], size=int(rng.integers(0, 3))))
    shapes = []
    for k in kinds:
        size = float(rng.uniform(0.08, 0.18))
        speed = float(rng.uniform(0.006, 0.02))
        angle = float(rng.uniform(0, 2 * np.pi))
        shapes.append(
            Shape(
                kind=str(k),
                color=_color(rng, 0.9, 0.95),
                size=size,
                start=(float(rng.uniform(size, aspect - size)), float(rng.uniform(size, 1 - size))),
                velocity=(speed * np.cos(angle), speed * np.sin(angle)),
                spin=float(rng.uniform(-0.05, 0.05)) if k == "square" else 0.0,
            )
        )
    pan = (0.0, 0.0)
    if "pan" in kind:
        pan = (float(rng.choice([-1, 1]) * rng.uniform(0.004, 0.012)), float(rng.uniform(-0.003, 0.003)))
    light = float(rng.uniform(0.2, 0.35)) if "lighting" in kind else 0.0
    return Scene(
        background=background,
        shapes=tuple(shapes),
        pan=pan,
        light_amplitude=light,
        light_period=float(rng.uniform(32, 64)),
        light_phase=float(rng.uniform(0, 2 * np.pi)),
    )


def _bounce(p: float, lo: float, hi: float) -> float:
    """Position of a point moving freely from lo, reflected inside [lo, hi] (triangle wave)."""
    span = hi - lo
    if span <= 0:
        return (lo + hi) / 2
    x = (p - lo) % (2 * span)
    return lo + (x if x <= span else 2 * span - x)


def _sin_sum(col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """sin(col + row) for col (H, 1) and row (1, W), as outer products -> (H, W) float32."""
    return (np.sin(col) * np.cos(row) + np.cos(col) * np.sin(row)).astype(np.float32)


def render_scene(scene: Scene, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render `scene` -> uint8 (num_frames, height, width, 3) RGB."""
    if num_frames <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"num_frames, height, width must be positive, got {num_frames}, {height}, {width}")
    aspect = width / height
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]  # (H, 1)
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, :]  # (1, W)
    bg = scene.background
    top, bottom = np.asarray(bg.top, np.float32), np.asarray(bg.bottom, np.float32)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        wx, wy = xs + scene.pan[0] * t, ys + scene.pan[1] * t  # world coordinates of the pixel centres
        # each background term is sin(f(y) + g(x)) = sin f cos g + cos f sin g: outer products, cheap
        g = 0.5 + 0.5 * _sin_sum(np.cos(bg.direction) * 2.0 * (wy - 0.5), np.sin(bg.direction) * 2.0 * (wx - 0.5))
        img = top * (1 - g)[..., None] + bottom * g[..., None]
        for fx, fy, ph, amp in bg.waves:
            img += (amp * _sin_sum(2 * np.pi * fy * wy + ph, 2 * np.pi * fx * wx))[..., None]
        for s in scene.shapes:
            cx = _bounce(s.start[0] + s.velocity[0] * t, s.size, aspect - s.size)
            cy = _bounce(s.start[1] + s.velocity[1] * t, s.size, 1 - s.size)
            reach = s.size * (1.5 if s.kind == "square" else 1.0) + 2.0 / height  # covers a rotated square
            y0, y1 = max(0, int((cy - reach) * height)), min(height, int((cy + reach) * height) + 1)
            x0, x1 = max(0, int((cx - reach) * height)), min(width, int((cx + reach) * height) + 1)
            dx, dy = xs[:, x0:x1] - cx, ys[y0:y1] - cy
            if s.kind == "circle":
                dist = np.sqrt(dx * dx + dy * dy)
            else:
                a = s.spin * t
                dist = np.maximum(np.abs(np.cos(a) * dx + np.sin(a) * dy), np.abs(np.cos(a) * dy - np.sin(a) * dx))
            alpha = np.clip((s.size - dist) * height + 0.5, 0.0, 1.0)[..., None]  # 1-pixel antialiased edge
            patch = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = patch * (1 - alpha) + np.asarray(s.color, np.float32) * alpha
        gain = 1.0 + scene.light_amplitude * np.sin(2 * np.pi * t / scene.light_period + scene.light_phase)
        out[t] = np.clip(img * gain * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Checkerboard:
    """A checkerboard background in world space (it pans with the camera), replacing the textured gradient."""

    cell: float = 0.25
    """Square side in frame heights."""
    light: tuple[float, float, float] = (0.92, 0.92, 0.92)
    dark: tuple[float, float, float] = (0.12, 0.12, 0.12)


def render_scene_ex(
    scene: Scene,
    num_frames: int,
    height: int,
    width: int,
    *,
    checkerboard: Checkerboard | None = None,
    grayscale: bool = False,
) -> np.ndarray:
    """`render_scene` with the edits the procedural dataset needs -> uint8 (num_frames, height, width, 3).

    checkerboard: draw this background instead of the scene's gradient (shapes, pan and lighting unchanged).
    grayscale: convert each final frame to luma (Rec. 601 weights), replicated on the three channels.
    With neither, the output equals `render_scene` exactly."""
    if checkerboard is None and not grayscale:
        return render_scene(scene, num_frames, height, width)
    if checkerboard is None:
        frames = render_scene(scene, num_frames, height, width)
    else:
        bg = Background(top=(0.0, 0.0, 0.0), bottom=(0.0, 0.0, 0.0), direction=0.0, waves=())
        flat = Scene(bg, scene.shapes, scene.pan, 0.0, scene.light_period, scene.light_phase)
        # shapes over a black background, plus an alpha channel from a second pass with white shapes
        white = tuple(dataclasses.replace(s, color=(1.0, 1.0, 1.0)) for s in scene.shapes)
        over = render_scene(flat, num_frames, height, width).astype(np.float32) / 255.0
        alpha = render_scene(dataclasses.replace(flat, shapes=white), num_frames, height, width)[..., :1] / 255.0
        ys = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
        xs = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, :]
        light, dark = np.asarray(checkerboard.light, np.float32), np.asarray(checkerboard.dark, np.float32)
        frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        for t in range(num_frames):
            wx, wy = xs + scene.pan[0] * t, ys + scene.pan[1] * t
            parity = (np.floor(wx / checkerboard.cell) + np.floor(wy / checkerboard.cell)) % 2  # (H, W)
            img = np.where(parity[..., None] > 0, dark, light) * (1 - alpha[t]) + over[t]
            gain = 1.0 + scene.light_amplitude * np.sin(2 * np.pi * t / scene.light_period + scene.light_phase)
            frames[t] = np.clip(img * gain * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if grayscale:
        luma = frames.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
        frames = np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    return frames


def make_clip(num_frames: int, height: int, width: int, seed: int = 0, kind: str = "shapes") -> np.ndarray:
    """Procedural clip, deterministic per (seed, kind): uint8 (num_frames, height, width, 3) RGB."""
    return render_scene(sample_scene(seed, kind, aspect=width / height), num_frames, height, width)


def write_clip(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    seed: int = 0,
    kind: str = "shapes",
    fps: float = 16.0,
    crf: int = 18,
) -> Path:
    """`make_clip` written as H.264 mp4 via `write_video`; returns the path."""
    return write_video(path, make_clip(num_frames, height, width, seed, kind), fps=fps, crf=crf)


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.testclips OUT.mp4`: write a procedural clip (the README's demo input)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.testclips", description=main.__doc__)
    p.add_argument("output")
    p.add_argument("--frames", type=int, default=73)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=KINDS, default="shapes")
    p.add_argument("--fps", type=float, default=16.0)
    a = p.parse_args(argv)
    write_clip(a.output, a.frames, a.height, a.width, seed=a.seed, kind=a.kind, fps=a.fps)
    print(f"wrote {a.output} ({a.frames} frames, {a.width}x{a.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
