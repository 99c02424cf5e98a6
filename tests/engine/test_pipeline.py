"""StreamingEditor and SessionState on the tiny preset: chunking, snapshots, prompt changes, modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.config import get_preset
from engine.pipeline import Engine, StreamingEditor, edit_bidirectional, frame_noise
from engine.session import SessionSettings, SessionState, SnapshotError, SnapshotMismatchError
from engine.testclips import make_clip

LAT = get_preset("tiny").dit.in_channels  # latent channels of the tiny preset

H, W = 128, 192


@pytest.fixture(scope="module")
def engine():
    return Engine.load("tiny", seed=0)


@pytest.fixture(scope="module")
def clip():
    return make_clip(57, H, W, seed=5)  # 57 = 8*7 + 1 frames -> 8 latent frames -> chunks 5 + 3


def settings(**kw) -> SessionSettings:
    return SessionSettings(**{"prompt": "make the red circle blue", "height": H, "width": W, **kw})


def run(editor: StreamingEditor, frames: np.ndarray, cut: int, s: SessionSettings) -> np.ndarray:
    state = editor.open(s)
    outs = [editor.push(state, frames[i : i + cut]) for i in range(0, len(frames), cut)]
    return np.concatenate([*outs, editor.finish(state)])


def test_output_has_one_frame_per_input_frame(engine, clip):
    editor = StreamingEditor(engine)
    for n in (57, 50, 17):  # 8k+1 and not: the input is padded for the VAE and the output trimmed back
        out = run(editor, clip[:n], 24, settings(total_frames=n))
        assert out.shape == (n, H, W, 3) and out.dtype == np.uint8


def test_output_does_not_depend_on_how_frames_arrive(engine, clip):
    editor = StreamingEditor(engine)
    s = settings(total_frames=len(clip))
    a = run(editor, clip, 1, s)
    b = run(editor, clip, 57, s)
    c = run(editor, clip, 10, s)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_stages_release_frames_while_streaming(engine, clip):
    """Frames come out before the input ends (a live stream: total length unknown)."""
    editor = StreamingEditor(engine)
    state = editor.open(settings())
    emitted_before_end = sum(editor.push(state, clip[i : i + 8]).shape[0] for i in range(0, 56, 8))
    assert emitted_before_end > 0
    assert emitted_before_end + editor.finish(state).shape[0] == 56


@pytest.mark.parametrize("after_chunk", [1, 2])
def test_snapshot_restore_continue_is_bit_identical(engine, clip, after_chunk):
    """Snapshot after chunk k, restore into a freshly built engine, continue: same bytes as uninterrupted."""
    n = 81
    frames = make_clip(n, H, W, seed=9)
    editor = StreamingEditor(engine)
    s = settings(total_frames=n)
    reference = run(editor, frames, 24, s)

    state = editor.open(s)
    cut = 1 + 8 * (5 + 3 * (after_chunk - 1)) + 3  # past chunk k's last source frame, mid encode step
    first = editor.push(state, frames[:cut])
    assert state.dit.chunk_index == after_chunk
    blob = state.snapshot()
    del state

    fresh = StreamingEditor(Engine.load("tiny", seed=0))
    restored = fresh.restore(blob)
    rest = [fresh.push(restored, frames[cut:]), fresh.finish(restored)]
    assert np.array_equal(np.concatenate([first, *rest]), reference)


def test_snapshot_round_trip_is_bit_exact_in_bf16(engine, clip):
    editor = StreamingEditor(engine)
    state = editor.open(settings())
    editor.push(state, clip[:41])
    for k, t in list(state.dit.gdn.items()):
        state.dit.gdn[k] = (t[0].bfloat16(), t[1])
    state.buffers["edited"] = torch.randn(1, LAT, 2, 4, 6).bfloat16()
    blob = state.snapshot()
    back = SessionState.restore(blob, editor.config_hash)
    assert back.tensors().keys() == state.tensors().keys()
    for name, t in state.tensors().items():
        r = back.tensors()[name]
        assert r.dtype == t.dtype and torch.equal(r, t), name
    assert back.snapshot() == blob
    assert back.cursor == state.cursor and back.settings == state.settings


def test_snapshot_refuses_other_config_and_damage(engine, clip):
    editor = StreamingEditor(engine)
    state = editor.open(settings())
    editor.push(state, clip[:17])
    blob = state.snapshot()
    other = dataclasses.replace(get_preset("tiny"), dit=dataclasses.replace(get_preset("tiny").dit, depth=8))
    with pytest.raises(SnapshotMismatchError, match="model configuration"):
        SessionState.restore(blob, other.config_hash())
    with pytest.raises(SnapshotError, match="bad magic"):
        SessionState.restore(b"hello" + blob, editor.config_hash)
    with pytest.raises(SnapshotError, match="damaged"):
        SessionState.restore(blob[: len(blob) // 2], editor.config_hash)


def test_prompt_change_takes_effect_at_next_chunk(engine, clip):
    editor = StreamingEditor(engine)
    s = settings(total_frames=len(clip))
    base_state, new_state = editor.open(s), editor.open(s)
    # Feed the first chunk's frames (5 latents = 33 pixel frames) to both; then change one prompt.
    lat_a = editor.generate(base_state, editor.encode(base_state, clip[:33]))
    lat_b = editor.generate(new_state, editor.encode(new_state, clip[:33]))
    assert torch.equal(lat_a, lat_b)
    editor.set_prompt(new_state, "turn the background into a checkerboard")
    assert new_state.cursor.prompt_version == 1
    rest_a = editor.generate(base_state, editor.encode(base_state, clip[33:], final=True), final=True)
    rest_b = editor.generate(new_state, editor.encode(new_state, clip[33:], final=True), final=True)
    assert rest_a.shape == rest_b.shape and not torch.allclose(rest_a, rest_b)


def test_chunk_plan_follows_the_release(engine):
    editor = StreamingEditor(engine)
    seen = []
    state = editor.open(settings(total_frames=8 * 10 + 1))  # 11 latent frames -> 5 + 3 + 3
    src = torch.randn(1, LAT, 11, 4, 6)
    editor.generate(state, src, final=True, on_chunk=lambda c, t: seen.append(t))
    assert seen == [5, 3, 3]
    live = editor.open(settings())  # unknown length: 3 + 3 + ... and a short last chunk
    seen.clear()
    editor.generate(live, src, final=True, on_chunk=lambda c, t: seen.append(t))
    assert seen == [3, 3, 3, 2]


def test_cfg_and_efficient_cache_run_and_differ(engine):
    editor = StreamingEditor(engine)
    src = torch.randn(1, LAT, 8, 4, 6)
    outs = {}
    for name, kw in {"base": {}, "cfg": {"cfg_scale": 3.0}, "eff": {"efficient_cache": True}}.items():
        state = editor.open(settings(total_frames=57, **kw))
        outs[name] = editor.generate(state, src, final=True)
        assert outs[name].shape == (1, LAT, 8, 4, 6) and torch.isfinite(outs[name]).all()
    assert torch.equal(outs["base"][:, :, :5], outs["eff"][:, :, :5])  # chunk 0 never reads the cache
    assert not torch.equal(outs["base"][:, :, 5:], outs["eff"][:, :, 5:])
    assert not torch.equal(outs["base"], outs["cfg"])


def test_frame_noise_is_per_frame():
    a = frame_noise(7, 0, 5, (2, 3, 4))
    b = torch.cat([frame_noise(7, 0, 2, (2, 3, 4)), frame_noise(7, 2, 3, (2, 3, 4))], dim=2)
    assert torch.equal(a, b) and not torch.equal(a, frame_noise(8, 0, 5, (2, 3, 4)))


def test_bidirectional_edit_runs(clip):
    engine = Engine.load("tiny", mode="bidirectional_short", seed=0)
    assert not engine.dit.cfg.streaming
    out = edit_bidirectional(engine, clip[:17], settings(steps=3, cfg_scale=2.0))
    assert out.shape == (17, H, W, 3)


def test_state_sizes_are_reported(engine, clip):
    editor = StreamingEditor(engine)
    state = editor.open(settings())
    editor.push(state, clip[:41])
    sizes = state.nbytes()
    assert (
        sizes["dit"] > 0 and sizes["vae_enc"] > 0 and sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
    )
