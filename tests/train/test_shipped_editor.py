"""The shipped tiny editor (engine/assets/tiny/) edits held-out clips better than doing nothing."""

from __future__ import annotations

import dataclasses

import pytest

from engine.data.procedural import sample_spec
from engine.train.evaluate import ASSETS, edit_clip, load_engine, psnr, render_pair

MARGIN_DB = 1.0
"""Whole-frame PSNR vs ground truth: edited output >= unedited source + this margin."""


@pytest.mark.skipif(not (ASSETS / "dit_streaming.safetensors").exists(), reason="shipped weights missing")
@pytest.mark.parametrize("index", [5, 11])  # held-out scenes: a checkerboard background, a grayscale conversion
def test_shipped_editor_beats_source(index):
    spec = dataclasses.replace(sample_spec("test", index), num_frames=25)  # shortened to keep CI fast
    src, truth = render_pair(spec)
    engine = load_engine("long_streaming", str(ASSETS / "dit_streaming.safetensors"))
    prompt = {"checkerboard": "turn the background into a checkerboard", "grayscale": "convert to grayscale"}[spec.edit]
    out = edit_clip(engine, src, prompt, "long_streaming")
    assert out.shape == src.shape
    assert psnr(out, truth) >= psnr(src, truth) + MARGIN_DB, (psnr(out, truth), psnr(src, truth))
