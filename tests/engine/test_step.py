"""Cross-session batching: several sessions' chunks in one forward equal each session run alone."""

from __future__ import annotations

import pytest
import torch

from engine.config import get_preset
from engine.pipeline import Engine, StreamingEditor
from engine.session import SessionSettings
from engine.step import ChunkRunner

LAT = get_preset("tiny").dit.in_channels  # latent channels of the tiny preset


@pytest.fixture(scope="module")
def editor():
    return StreamingEditor(Engine.load("tiny", seed=0))


def _settings(prompt: str, seed: int, **kw) -> SessionSettings:
    return SessionSettings(prompt=prompt, seed=seed, height=128, width=192, **kw)


def _sources(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, LAT, n, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_batched_sessions_equal_solo_runs(editor):
    specs = [
        ("make the red circle blue", 1),
        ("convert to grayscale", 2),
        ("turn the background into a checkerboard", 3),
    ]
    sources = [_sources(11, 10 + i) for i in range(3)]
    solo = []
    for (prompt, seed), src in zip(specs, sources):
        state = editor.open(_settings(prompt, seed))
        solo.append(editor.generate(state, src, final=True))

    states = [editor.open(_settings(p, s)) for p, s in specs]
    calls = []
    runner_run = editor.runner.run

    def spy(jobs):
        calls.append(len(jobs))
        return runner_run(jobs)

    editor.runner.run = spy
    try:
        batched = editor.generate_batch([(st, src, True) for st, src in zip(states, sources)])
    finally:
        editor.runner.run = runner_run
    assert calls == [3, 3, 3, 3]  # live streams: chunks 3 + 3 + 3 + 2, every round batched
    for a, b in zip(solo, batched):  # fp32; batched GEMMs sum in another order (measured max 1.8e-5 on ~1)
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-5)


def test_sessions_at_different_chunks_batch_by_window(editor):
    """A session at chunk 3 and one at chunk 2 have equal windows (sink + 1 chunk) and share forwards; a new
    session (no history) runs in its own group; all equal their solo runs."""
    old = editor.open(_settings("a", 1))
    mid = editor.open(_settings("b", 2))
    editor.generate(old, _sources(9, 1))  # chunks 0, 1, 2 done
    editor.generate(mid, _sources(6, 2))  # chunks 0, 1 done
    snap_old, snap_mid = old.snapshot(), mid.snapshot()
    new = editor.open(_settings("c", 3))
    srcs = [_sources(3, 7), _sources(3, 8), _sources(3, 9)]

    solo = []
    for blob, src in ((snap_old, srcs[0]), (snap_mid, srcs[1])):
        st = editor.restore(blob)
        solo.append(editor.generate(st, src))
    solo.append(editor.generate(editor.open(_settings("c", 3)), srcs[2]))

    groups = []
    real = ChunkRunner._run_group

    def spy(self, sig, jobs):
        groups.append(len(jobs))
        return real(self, sig, jobs)

    ChunkRunner._run_group = spy
    try:
        out = editor.generate_batch(
            [
                (editor.restore(snap_old), srcs[0], False),
                (editor.restore(snap_mid), srcs[1], False),
                (new, srcs[2], False),
            ]
        )
    finally:
        ChunkRunner._run_group = real
    assert sorted(groups) == [1, 2]
    for a, b in zip(solo, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_same_session_twice_is_refused(editor):
    st = editor.open(_settings("a", 1))
    with pytest.raises(ValueError, match="twice"):
        editor.generate_batch([(st, _sources(3, 1), False), (st, _sources(3, 2), False)])


def test_text_context_is_computed_once_per_prompt(editor, monkeypatch):
    """The runner projects a session's text for cross-attention once per prompt, not per chunk; a new prompt
    (set_prompt) is projected again, and a restored session recomputes it (never serialised)."""
    dit = editor.engine.dit
    calls = []
    original = dit.text_context
    monkeypatch.setattr(dit, "text_context", lambda text: calls.append(text.shape) or original(text))
    C = dit.cfg.in_channels
    state = editor.open(_settings("make the red circle blue", 1))
    editor.generate(state, torch.randn(1, C, 11, 4, 6, generator=torch.Generator().manual_seed(0)))
    assert len(calls) == 1  # three chunks, one projection
    editor.set_prompt(state, "convert to grayscale")
    editor.generate(state, torch.randn(1, C, 3, 4, 6))
    assert len(calls) == 2
    restored = editor.restore(state.snapshot())
    assert "dit_text_ctx" not in restored.derived
    editor.generate(restored, torch.randn(1, C, 3, 4, 6))
    assert len(calls) == 3


def test_unpadded_text_runs_without_a_mask(editor):
    """text_mask None (no padding anywhere) computes what an all-ones mask computes."""
    dit = editor.engine.dit
    g = torch.Generator().manual_seed(5)
    C, L = dit.cfg.in_channels, dit.cfg.text_len
    x, src = torch.randn(1, C, 3, 4, 6, generator=g), torch.randn(1, C, 3, 4, 6, generator=g)
    text = torch.randn(1, L, dit.cfg.caption_channels, generator=g)
    t = torch.full((1,), 700.0)
    with torch.no_grad():
        masked = dit(x, src, t, text, torch.ones(1, L, dtype=torch.int64))
        unmasked = dit(x, src, t, text, None)
    torch.testing.assert_close(unmasked, masked, atol=1e-5, rtol=1e-5)
