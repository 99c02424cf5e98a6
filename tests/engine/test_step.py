"""Cross-session batching: several sessions' chunks in one forward equal each session run alone; the static input
buffers of the CUDA-graph path hold exactly what the caches read."""

from __future__ import annotations

import pytest
import torch

from engine.config import get_preset
from engine.model.cache import DiTCache, LayerRead, LayerWrite
from engine.pipeline import Engine, StreamingEditor
from engine.session import SessionSettings
from engine.step import ChunkRunner, StaticInputs

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


# --- the graph paths, with an eager stand-in for the capture (CPU has no CUDA graphs) ---------------------------


def _copy_into(dst, src) -> None:
    """Every tensor of `src` into the same place of `dst` (what a graph replay does to its output buffers)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)
    elif isinstance(dst, LayerWrite):
        for name in ("gdn_state", "kv", "ffn_last"):
            _copy_into(getattr(dst, name), getattr(src, name))
    elif isinstance(dst, dict):
        assert dst.keys() == src.keys()
        for k in dst:
            _copy_into(dst[k], src[k])
    else:
        assert dst is None and src is None, (dst, src)


def test_pruned_refresh_streams_what_the_full_refresh_streams(editor):
    """The t = 0 refresh computing only what the cache keeps (the default: no velocity, the last block for the last
    frame alone) streams the same video as the full forward it replaces (SANA_STREAM_PRUNED_REFRESH=0), with and
    without CFG, chunk after chunk (each chunk reads the caches the previous refresh wrote)."""
    specs = [("make the red circle blue", 1, 1.0), ("convert to grayscale", 2, 3.0)]
    sources = [_sources(11, 40 + i) for i in range(2)]
    saved = editor.runner
    outs = {}
    try:
        for pruned in (False, True):
            editor.runner = ChunkRunner(editor.engine.dit, cuda_graphs=False, pruned_refresh=pruned)
            states = [editor.open(_settings(p, s, cfg_scale=c)) for p, s, c in specs]
            outs[pruned] = [editor.generate(st, src, final=True) for st, src in zip(states, sources)]
    finally:
        editor.runner = saved
    for full, pruned in zip(outs[False], outs[True], strict=True):
        assert full.shape == pruned.shape == (1, LAT, 11, 4, 6)
        # fp32: the last block's GEMMs over one frame's rows instead of the chunk's (measured max ~1e-6 on ~1)
        torch.testing.assert_close(pruned, full, atol=2e-5, rtol=1e-5)


@pytest.fixture
def replaying_capture(monkeypatch):
    """engine.step's capture replaced by one with the same contract on the CPU: the captured function reads only
    the static buffers, its first outputs are the graph's output buffers, and each replay overwrites them."""
    from engine import step

    counts = {"captures": 0, "replays": 0}

    def capture(fn, pool):
        counts["captures"] += 1
        outputs = fn()

        def replay():
            counts["replays"] += 1
            _copy_into(outputs, fn())

        return replay, outputs

    monkeypatch.setattr(step, "_capture", capture)
    monkeypatch.setattr(step, "_graph_pool", lambda: None)
    return counts


@pytest.mark.parametrize("chunk_graphs", [True, False], ids=["chunk_graphs", "forward_graphs"])
def test_graph_paths_equal_the_eager_path(editor, replaying_capture, chunk_graphs):
    """Two sessions (one with CFG) streamed through graphs, then a third session replaying the graphs the first
    two captured: every chunk equals the eager runner's, bit for bit (same ops on the CPU), and the captures are
    one per signature and batch composition, not per chunk or session."""
    specs = [("make the red circle blue", 1, 1.0), ("convert to grayscale", 2, 3.0)]
    sources = [_sources(14, 20 + i) for i in range(3)]

    def stream(runner) -> list[torch.Tensor]:
        editor.runner = runner
        states = [editor.open(_settings(p, s, cfg_scale=c)) for p, s, c in specs]
        outs = [[] for _ in states]
        for a in range(0, 12, 3):  # live: chunk by chunk, the two sessions each on their own
            for k, st in enumerate(states):
                outs[k].append(editor.generate(st, sources[k][:, :, a : a + 3]))
        for k, st in enumerate(states):
            outs[k].append(editor.generate(st, sources[k][:, :, 12:], final=True))
        # A third session replays session 0's graphs, its steady chunks in one call (the same graph twice in a row).
        third = editor.open(_settings("turn the background into a checkerboard", 3))
        outs.append([editor.generate(third, sources[2], final=True)])
        return [torch.cat(o, dim=2) for o in outs]

    saved = editor.runner
    try:
        eager = stream(ChunkRunner(editor.engine.dit, cuda_graphs=False))
        graphed = stream(ChunkRunner(editor.engine.dit, cuda_graphs=True, chunk_graphs=chunk_graphs))
        runner = editor.runner
    finally:
        editor.runner = saved
    for e, g in zip(eager, graphed, strict=True):
        assert e.shape == g.shape
        assert torch.equal(g, e)
    # Chunks 0, 1, steady, last (2 frames), for each of branches 1 / 2: 8 signatures, each captured once; with one
    # graph per forward the t = 0 refresh of the first three (the last chunk has none) is one more each (cache_only).
    expected = 8 if chunk_graphs else 8 + 6
    assert runner.num_graphs == replaying_capture["captures"] == expected
    forwards_per_chunk = 1 if chunk_graphs else SessionSettings(prompt="").steps + 1
    assert replaying_capture["replays"] > 3 * forwards_per_chunk * 3


# --- StaticInputs: what the CUDA-graph path copies into its buffers (CPU: no graph, same loading code) ---------

S_TOK, HEADS, HD, CH = 4, 2, 3, 5  # tokens per frame, heads, head dim, channels of a toy cache


def _toy_cache(frames: list[int], seed: int, n: int = 2, sink: bool = True) -> DiTCache:
    """A cache of two blocks (0: GDN, 1: softmax) with `frames` chunks written, random contents."""
    g = torch.Generator().manual_seed(seed)
    cache = DiTCache(softmax_layers=(1,), num_cached_blocks=n, sink_token=sink)
    for f in frames:
        toks = f * S_TOK
        ffn = torch.randn(1, S_TOK, CH, generator=g).permute(0, 2, 1)[:, :, None]  # (1, C, 1, S), a strided view
        state = (torch.randn(1, HEADS, HD, HD, generator=g), torch.randn(1, HEADS, HD, 1, generator=g))
        gdn = LayerWrite(gdn_state=state, ffn_last=ffn)
        kv = (torch.randn(1, toks, HEADS, HD, generator=g), torch.randn(1, toks, HEADS, HD, generator=g))
        cache.write([gdn, LayerWrite(kv=kv, ffn_last=ffn.clone())], f)
    return cache


def _tail(cache: DiTCache) -> list:
    return [cache.read(layer, 3 * S_TOK) for layer in (0, 1)]


def _assert_holds(static: StaticInputs, cache: DiTCache, start: int = 0) -> None:
    """The static buffers' batch row `start` holds what cache.read gives (the window rows; the tail is free)."""
    at = slice(start, start + 1)
    for got, want in zip(static.inputs["reads"], _tail(cache)):
        if want.gdn_state is not None:
            assert torch.equal(got.gdn_state[0][at], want.gdn_state[0])
            assert torch.equal(got.gdn_state[1][at], want.gdn_state[1])
        assert torch.equal(got.ffn_ctx[at], want.ffn_ctx)
        if want.past_kv is not None:
            rows = want.past_kv[0].shape[1] - want.kv_tail
            assert torch.equal(got.past_kv[0][at, :rows], want.past_kv[0][:, :rows])
            assert torch.equal(got.past_kv[1][at, :rows], want.past_kv[1][:, :rows])


def _load(static: StaticInputs, *caches: DiTCache) -> int:
    before = static.copies
    sources = [([c.source(0), c.source(1)], i, 1) for i, c in enumerate(caches)]
    static.load_chunk({"text_ctx": TEXT}, sources)
    return static.copies - before


TEXT = [(torch.randn(1, HEADS, 7, HD), torch.randn(1, HEADS, 7, HD))]


def test_static_inputs_hold_what_the_cache_reads():
    a, b = _toy_cache([5, 3, 3], seed=1), _toy_cache([5, 3, 3], seed=2)
    template = {"x": torch.zeros(1), "timestep": torch.zeros(1), "text_ctx": TEXT, "reads": _tail(a)}
    static = StaticInputs(template)
    for r in static.inputs["reads"]:  # the buffers start from garbage, not from a's values
        for t in (*(r.gdn_state or ()), *(r.past_kv or ()), r.ffn_ctx):
            t.fill_(float("nan"))
    static.inputs["text_ctx"][0][0].fill_(float("nan"))
    assert _load(static, a) == 2 + 2 + 1 + 1 + 2 * 2  # text k, v; M, z; 2 FFN frames; sink + previous chunk k, v
    _assert_holds(static, a)
    assert torch.equal(static.inputs["text_ctx"][0][0], TEXT[0][0])
    assert _load(static, a) == 0  # the same chunk again: everything is held

    _toy_write(a, seed=3)  # a's next chunk: new GDN state, FFN frames and previous chunk; the sink stays
    assert _load(static, a) == 2 + 2 + 2  # M, z, 2 FFN frames, the new previous chunk's k and v
    _assert_holds(static, a)

    assert _load(static, b) == 2 + 2 + 2 * 2  # another session in the slot: all of its cache
    _assert_holds(static, b)
    assert _load(static, a) == 2 + 2 + 2 * 2  # and back: a's sink was overwritten, so it is copied again
    _assert_holds(static, a)


def _toy_write(cache: DiTCache, seed: int) -> None:
    other = _toy_cache([3], seed)
    w = [LayerWrite(gdn_state=other.gdn[0], ffn_last=other.ffn[0]),
         LayerWrite(kv=(other.kv[1][0]["k"], other.kv[1][0]["v"]), ffn_last=other.kv[1][0]["ffn"])]  # fmt: skip
    cache.write(w, 3)


def test_static_inputs_with_another_window_layout_and_batch_rows():
    """Equal window lengths split into other chunks (sink 5 + 3 frames vs 2 + 3 + 3 frames, no sink) share the
    buffers: switching layouts must not trust rows that a part of the other layout overwrote."""
    a = _toy_cache([5, 3, 3], seed=1)
    c = _toy_cache([2, 3, 3], seed=4, n=3, sink=False)
    assert [k.shape[1] for k, _ in a.source(1).kv_parts] == [5 * S_TOK, 3 * S_TOK]
    assert [k.shape[1] for k, _ in c.source(1).kv_parts] == [2 * S_TOK, 3 * S_TOK, 3 * S_TOK]
    two = [a.read(0, 3 * S_TOK), a.read(1, 3 * S_TOK)]
    two = [LayerRead(*(None if t is None else (tuple(torch.cat([x, x]) for x in t) if isinstance(t, tuple)
                                               else torch.cat([t, t])) for t in (r.gdn_state, r.past_kv, r.ffn_ctx)),
                     r.kv_tail) for r in two]  # fmt: skip
    static = StaticInputs({"x": torch.zeros(2), "timestep": torch.zeros(2), "text_ctx": TEXT, "reads": two})
    _load(static, a, c)
    _assert_holds(static, a, 0)
    _assert_holds(static, c, 1)
    _load(static, c, a)  # swapped rows
    _assert_holds(static, c, 0)
    _assert_holds(static, a, 1)
    _load(static, a, c)
    _assert_holds(static, a, 0)
    _assert_holds(static, c, 1)
    short = _toy_cache([3, 3], seed=5)  # a window of other length: refused, not silently misplaced
    with pytest.raises(RuntimeError, match="window of"):
        _load(static, short, c)
