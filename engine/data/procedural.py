"""Procedural paired-edit dataset: a source clip, a programmatic edit, the edited ground truth, and the edit's
prompt and reverse prompt.

Scenes come from `engine.testclips.sample_scene` (so demo inputs are in distribution); each shape's colour is
snapped to a named palette hue (plus jitter) so that prompts can name it. Edits and their inverses:

    recolor       "make the red circle blue"                 / "make the blue circle red"
    checkerboard  "turn the background into a checkerboard"  / "turn the checkerboard back into the original background"
    grayscale     "convert to grayscale"                     / "restore the original colors"

Splits: `train` uses scene seeds [0, 10^6) and 49-frame clips; `test` uses seeds from 10^6 on, 73-frame clips,
and recolor pairs (source colour, target colour) that `train` never contains in either direction
(`HELD_OUT_PAIRS`): unseen combinations of seen words.

An example is fully described by its `EditSpec` (a JSON-able dict); `render_pair` renders it deterministically,
so a manifest row may carry a spec instead of video files (`engine.data.manifest`).

Non-goals: natural images, occlusion-aware edits, edits that move or remove objects.
"""

from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np

from engine.testclips import KINDS, Checkerboard, Scene, render_scene_ex, sample_scene

PALETTE: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 235.0,
    "purple": 275.0,
    "pink": 320.0,
}
"""Named hues in degrees; shapes get saturation 0.9 and value 0.95 like `sample_scene`'s."""
HUE_JITTER = 20.0
"""A named source colour is its palette hue +- this many degrees (edited colours are exact)."""

HELD_OUT_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(p) for p in [("orange", "cyan"), ("purple", "yellow"), ("green", "pink"), ("red", "cyan")]
)
"""Recolor pairs only the test split contains (either direction)."""

EDIT_KINDS = ("recolor", "checkerboard", "grayscale")
EDIT_WEIGHTS = (0.7, 0.15, 0.15)
SPLITS = {"train": (0, 49), "test": (1_000_000, 73)}
"""split -> (first scene seed, frames per clip)."""


def hue_color(hue_deg: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, 0.9, 0.95)
    return (float(r), float(g), float(b))


def color_name(rgb: tuple[float, float, float]) -> str:
    """The palette name nearest to a colour's hue."""
    h = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
    return min(PALETTE, key=lambda n: min(abs(h - PALETTE[n]), 360.0 - abs(h - PALETTE[n])))


@dataclass(frozen=True)
class EditSpec:
    """One example: scene seed and kind, clip length, the edit and its parameters."""

    seed: int
    scene_kind: str
    num_frames: int
    edit: str
    shape: int = -1
    """recolor: index of the edited shape."""
    old_color: str = ""
    new_color: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> EditSpec:
        return cls(**d)


def named_scene(seed: int, kind: str, aspect: float = 1.5) -> tuple[Scene, list[str]]:
    """`sample_scene` with each shape's colour snapped to a distinct palette name (+ jitter); returns the names."""
    scene = sample_scene(seed, kind, aspect)
    rng = np.random.default_rng([seed, 7])
    names = list(rng.permutation(list(PALETTE)))[: len(scene.shapes)]
    shapes = tuple(
        dataclasses.replace(s, color=hue_color(PALETTE[n] + rng.uniform(-HUE_JITTER, HUE_JITTER)))
        for s, n in zip(scene.shapes, names, strict=True)
    )
    return dataclasses.replace(scene, shapes=shapes), [str(n) for n in names]


def sample_spec(split: str, index: int) -> EditSpec:
    """The `index`-th example of a split (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    first, frames = SPLITS[split]
    seed = first + index
    rng = np.random.default_rng([seed, 11])
    kind = str(rng.choice(KINDS))
    edit = str(rng.choice(EDIT_KINDS, p=EDIT_WEIGHTS))
    if edit != "recolor":
        return EditSpec(seed, kind, frames, edit)
    scene, names = named_scene(seed, kind)
    for _ in range(100):
        i = int(rng.integers(len(names)))
        new = str(rng.choice([n for n in PALETTE if n not in names]))
        held = frozenset((names[i], new)) in HELD_OUT_PAIRS
        if held == (split == "test"):
            return EditSpec(seed, kind, frames, edit, i, names[i], new)
    # no admissible pair in this scene: fall back to a global edit
    return EditSpec(seed, kind, frames, "grayscale")


def prompts(spec: EditSpec) -> tuple[str, str]:
    """(prompt, reverse prompt) of an example."""
    if spec.edit == "recolor":
        scene, _ = named_scene(spec.seed, spec.scene_kind)
        kind = scene.shapes[spec.shape].kind
        return (
            f"make the {spec.old_color} {kind} {spec.new_color}",
            f"make the {spec.new_color} {kind} {spec.old_color}",
        )
    if spec.edit == "checkerboard":
        return "turn the background into a checkerboard", "turn the checkerboard back into the original background"
    if spec.edit == "grayscale":
        return "convert to grayscale", "restore the original colors"
    raise ValueError(f"unknown edit {spec.edit!r}")


def render_pair(spec: EditSpec, height: int = 128, width: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """(source, edited ground truth), each uint8 (num_frames, height, width, 3)."""
    scene, _ = named_scene(spec.seed, spec.scene_kind, width / height)
    src = render_scene_ex(scene, spec.num_frames, height, width)
    if spec.edit == "recolor":
        shapes = list(scene.shapes)
        shapes[spec.shape] = dataclasses.replace(shapes[spec.shape], color=hue_color(PALETTE[spec.new_color]))
        tgt = render_scene_ex(dataclasses.replace(scene, shapes=tuple(shapes)), spec.num_frames, height, width)
    elif spec.edit == "checkerboard":
        tgt = render_scene_ex(scene, spec.num_frames, height, width, checkerboard=Checkerboard())
    elif spec.edit == "grayscale":
        tgt = render_scene_ex(scene, spec.num_frames, height, width, grayscale=True)
    else:
        raise ValueError(f"unknown edit {spec.edit!r}")
    return src, tgt


def edit_region(source: np.ndarray, target: np.ndarray, threshold: int = 12, dilate: int = 2) -> np.ndarray:
    """Pixels the edit changes: any channel differs by more than `threshold`, dilated by `dilate` pixels.

    (n, H, W, 3) uint8 pair -> (n, H, W) bool."""
    diff = np.abs(source.astype(np.int16) - target.astype(np.int16)).max(-1) > threshold
    out = diff.copy()
    for dy in range(-dilate, dilate + 1):
        for dx in range(-dilate, dilate + 1):
            out |= np.roll(np.roll(diff, dy, axis=1), dx, axis=2)
    return out
