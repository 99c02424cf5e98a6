"""JSONL training manifests: one example per line.

    {"source": "clips/0001_src.mp4", "target": "clips/0001_tgt.mp4" | null,
     "prompt": "make the red circle blue", "reverse_prompt": "make the blue circle red",
     "spec": {...} (optional: a procedural `EditSpec`)}

Paths are relative to the manifest's folder (or absolute). A row whose `source` is null must carry a `spec`:
its clips are rendered on the fly (`engine.data.procedural.render_pair`), which is how the GPU recipe avoids
writing and decoding thousands of mp4 files. `target` null = no ground truth (the streaming stage and the
reverse term need none; plain flow matching does).

Non-goals: sharding, remote storage, video decoding beyond `engine.video_io.read_video`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.procedural import EditSpec, prompts, render_pair, sample_spec


@dataclass(frozen=True)
class Example:
    prompt: str
    reverse_prompt: str
    source: str | None = None
    target: str | None = None
    spec: EditSpec | None = None

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "target": self.target,
            "prompt": self.prompt,
            "reverse_prompt": self.reverse_prompt,
            **({"spec": self.spec.to_json()} if self.spec else {}),
        }


def read_manifest(path: str | os.PathLike) -> list[Example]:
    """Parse a JSONL manifest; relative video paths are resolved against its folder."""
    path = Path(path)
    root = path.parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, reverse = row["prompt"], row.get("reverse_prompt") or ""
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' ({e})") from None
        spec = EditSpec.from_json(row["spec"]) if row.get("spec") else None
        src, tgt = row.get("source"), row.get("target")
        if src is None and spec is None:
            raise ValueError(f"{path}:{n}: a row needs a 'source' video or a procedural 'spec'")
        out.append(
            Example(
                prompt=prompt,
                reverse_prompt=reverse,
                source=None if src is None else str(root / src),
                target=None if tgt is None else str(root / tgt),
                spec=spec,
            )
        )
    return out


def write_manifest(path: str | os.PathLike, examples: list[Example]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))
    return path


def procedural_examples(split: str, count: int, start: int = 0) -> list[Example]:
    """`count` spec-only rows of a procedural split."""
    out = []
    for i in range(start, start + count):
        spec = sample_spec(split, i)
        p, r = prompts(spec)
        out.append(Example(prompt=p, reverse_prompt=r, spec=spec))
    return out


def make_procedural_manifest(
    out_dir: str | os.PathLike, split: str, count: int, *, videos: bool = True, fps: float = 16.0
) -> Path:
    """Write `<out_dir>/<split>.jsonl`; with `videos`, also the mp4 pairs under `<out_dir>/<split>/`."""
    from engine.video_io import write_video

    out_dir = Path(out_dir)
    rows = procedural_examples(split, count)
    if videos:
        done = []
        for i, ex in enumerate(rows):
            assert ex.spec is not None
            src, tgt = render_pair(ex.spec)
            s, t = f"{split}/{i:05d}_src.mp4", f"{split}/{i:05d}_tgt.mp4"
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            write_video(out_dir / s, src, fps=fps, crf=12)
            write_video(out_dir / t, tgt, fps=fps, crf=12)
            done.append(Example(ex.prompt, ex.reverse_prompt, s, t, ex.spec))
        rows = done
    return write_manifest(out_dir / f"{split}.jsonl", rows)


def load_pair(
    ex: Example, height: int, width: int, num_frames: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(source, target or None) uint8 (n, H, W, 3) frames of an example."""
    if ex.source is None:
        assert ex.spec is not None
        src, tgt = render_pair(ex.spec, height, width)
    else:
        from engine.video_io import read_video

        src = read_video(ex.source, height, width, num_frames=num_frames).frames
        tgt = None if ex.target is None else read_video(ex.target, height, width, num_frames=num_frames).frames
    if num_frames is not None:
        src = src[:num_frames]
        tgt = None if tgt is None else tgt[:num_frames]
    return src, tgt
