"""Per-stage session parts (`StreamingEditor.open_part`, `prompt_conditioning`, `set_prompt_text`): the three
stages run on separate states give exactly what one full session gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engine.pipeline import Engine, StreamingEditor, prompt_conditioning
from engine.session import SessionSettings
from engine.testclips import make_clip

H, W = 128, 192


def test_parts_equal_a_full_session():
    torch.set_num_threads(1)  # CPU reductions depend on the thread count; compare like with like
    editor = StreamingEditor(Engine.load("tiny", seed=0))
    clip = make_clip(41, H, W, seed=2)
    s = SessionSettings(prompt="make it blue", height=H, width=W, total_frames=len(clip))
    full = editor.open(dataclasses.replace(s))  # set_prompt changes the settings object it is given
    want = [editor.push(full, clip[i : i + 16]) for i in range(0, len(clip), 16)]
    editor.set_prompt(full, "make it red")
    want.append(editor.finish(full))

    text = prompt_conditioning(editor.engine.text, s)
    assert torch.equal(text["embeds"], editor.open(s).text["embeds"])
    enc, gen, dec = (editor.open_part(s, p, **({"text": text} if p == "generator" else {}))
                     for p in ("encoder", "generator", "decoder"))  # fmt: skip
    assert not enc.dit.tensors() and not enc.vae_decoder and not gen.vae_encoder and not dec.text
    got = [editor.decode(dec, editor.generate(gen, editor.encode(enc, clip[i : i + 16]))) for i in range(0, 41, 16)]
    new = SessionSettings(prompt="make it red", height=H, width=W)
    editor.set_prompt_text(gen, "make it red", prompt_conditioning(editor.engine.text, new))
    lat = editor.generate(gen, editor.encode(enc, clip[:0], final=True), final=True)
    dec.cursor.frames_in = enc.cursor.frames_in
    got.append(editor.decode(dec, lat, final=True))
    assert np.array_equal(np.concatenate(got), np.concatenate(want))
    assert gen.cursor.prompt_version == 1
    torch.set_num_threads(2)
