"""Model structure and the streaming invariants: checkpoint keys, GDN chunking, softmax window."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import get_preset, softmax_layer_indices
from engine.model.cache import softmax_window
from engine.model.hybrid_dit import SanaStreamingDiT
from kernels.gdn.naive import bidirectional_gdn, gdn_scan
from tests.conftest import REFERENCE


def tsv(name: str) -> dict[str, str]:
    rows = [line.split("\t") for line in (REFERENCE / name).read_text().splitlines() if not line.startswith("#")]
    return dict(rows)


@pytest.mark.parametrize(
    "preset,file",
    [
        ("sana-streaming-2b-ar", "sana_streaming_2b_streaming_ar_keys.tsv"),
        ("sana-streaming-2b-bidirectional", "sana_streaming_2b_bidirectional_keys.tsv"),
    ],
)
def test_2b_state_dict_equals_release_keys(preset, file):
    with torch.device("meta"):
        model = SanaStreamingDiT(get_preset(preset).dit)
    ours = {k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    expected = tsv(file)
    assert len(expected) == 587
    assert ours == expected


def test_softmax_layer_rule():
    assert softmax_layer_indices(20, 0.25) == [3, 7, 11, 15, 19]
    assert softmax_layer_indices(4, 0.25) == [3]
    assert get_preset("tiny").dit.softmax_layer_ids == (3,)


def _random_gdn(T: int, S: int = 5, H: int = 2, D: int = 6, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k = r(1, H, T, S, D).relu(), r(1, H, T, S, D).relu() / math.sqrt(D * S)
    v = r(1, H, T, S, D)
    q_rot, k_rot = q + 0.1 * r(1, H, T, S, D), k + 0.1 * r(1, H, T, S, D) / math.sqrt(D * S)
    beta = torch.sigmoid(r(1, H, T, S))
    decay = torch.exp(-torch.nn.functional.softplus(r(1, H, T)))
    return q, k, v, q_rot, k_rot, beta, decay


def test_gdn_chunked_forward_equals_whole_sequence():
    args = _random_gdn(T=8)
    num, den, m, z = gdn_scan(*args)
    state, nums, dens = (None, None), [], []
    for s, e in [(0, 2), (2, 5), (5, 6), (6, 8)]:
        n_c, d_c, *state = gdn_scan(*[a[:, :, s:e] for a in args], *state)
        nums.append(n_c)
        dens.append(d_c)
    torch.testing.assert_close(torch.cat(nums, 2), num, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(dens, 2), den, atol=1e-12, rtol=0)
    torch.testing.assert_close(state[0], m, atol=1e-12, rtol=0)
    torch.testing.assert_close(state[1], z, atol=1e-12, rtol=0)


def _backward_part(args):
    """The reverse scan's numerator and denominator per output frame, from the layer minus its forward scan."""
    out, _, _ = bidirectional_gdn(*args)
    num_f, den_f, _, _ = gdn_scan(*args)
    return out, num_f, den_f


@pytest.mark.parametrize("t", [0, 2, 4])
def test_gdn_backward_scan_sees_only_strictly_later_frames(t):
    """Perturbing frame t's keys/values/gates changes the backward scan's output at frames before t only."""
    T = 5
    args = _random_gdn(T=T)
    q, k, v, q_rot, k_rot, beta, decay = (a.clone() for a in args)
    k[:, :, t] += 0.3
    k_rot[:, :, t] += 0.3
    v[:, :, t] -= 1.0
    beta[:, :, t] = 0.5 * beta[:, :, t]
    decay[:, :, t] = 0.5 * decay[:, :, t]
    perturbed = (q, k, v, q_rot, k_rot, beta, decay)
    out0, nf0, df0 = _backward_part(args)
    out1, nf1, df1 = _backward_part(perturbed)
    # The backward scan on its own, fed exactly as the layer feeds it (flip, then shift by one frame).
    flip = lambda x: torch.flip(x, dims=[2])  # noqa: E731

    def shift(x, fill):
        return torch.cat([torch.full_like(flip(x)[:, :, :1], fill), flip(x)[:, :, :-1]], 2)

    def bwd(a):
        q_, k_, v_, qr_, kr_, b_, g_ = a
        n, d, _, _ = gdn_scan(
            flip(q_), shift(k_, 0.0), shift(v_, 0.0), flip(qr_), shift(kr_, 0.0), shift(b_, 0.0), shift(g_, 1.0)
        )
        return flip(n), flip(d)

    n0, d0 = bwd(args)
    n1, d1 = bwd(perturbed)
    assert torch.equal(n0[:, :, t:], n1[:, :, t:]) and torch.equal(d0[:, :, t:], d1[:, :, t:])
    if t > 0:
        assert not torch.allclose(n0[:, :, :t], n1[:, :, :t])
    assert torch.equal(n0[:, :, -1], torch.zeros_like(n0[:, :, -1]))  # the last frame has no future
    # And the layer really is forward + this backward scan.
    torch.testing.assert_close(out0, (nf0 + n0) / (df0 + d0).unsqueeze(-1).add(1e-8), atol=1e-12, rtol=0)
    torch.testing.assert_close(out1, (nf1 + n1) / (df1 + d1).unsqueeze(-1).add(1e-8), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "n,sink,expected",
    [
        (2, True, {0: [], 1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 3]}),
        (2, False, {0: [], 1: [0], 2: [0, 1], 3: [1, 2], 4: [2, 3]}),
        (1, True, {1: [0], 2: [0], 3: [0]}),
        (1, False, {1: [0], 2: [1], 3: [2]}),
        (3, True, {2: [0, 1], 3: [0, 1, 2], 4: [0, 2, 3]}),
        (-1, True, {3: [0, 1, 2]}),
        (0, False, {2: [0, 1]}),
    ],
)
def test_softmax_window_rule(n, sink, expected):
    for chunk, window in expected.items():
        assert softmax_window(chunk, n, sink) == window


@pytest.mark.parametrize("n,sink", [(2, True), (2, False), (1, True)])
def test_cached_softmax_equals_explicit_window_attention(n, sink):
    """For chunks 0..4 the cached softmax layer equals attention over [window chunks' keys, current keys]."""
    cfg = get_preset("tiny").dit
    torch.manual_seed(0)
    model = SanaStreamingDiT(cfg).init_weights(seed=1).eval()
    layer = cfg.softmax_layer_ids[0]
    attn = model.blocks[layer].attn
    recorded_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    captured = {}

    def hook(mod, inputs, output):
        captured["x"], captured["rope"] = inputs[0], inputs[1]
        captured["out"], captured["kv"] = output

    handle = attn.register_forward_hook(hook)
    cache = model.new_cache(n, sink)
    text, mask = torch.randn(1, cfg.text_len, cfg.caption_channels), torch.ones(1, cfg.text_len)
    sizes = [5, 3, 3, 3, 3]
    try:
        with torch.no_grad():
            for chunk, T in enumerate(sizes):
                x, src = torch.randn(1, cfg.in_channels, T, 2, 3), torch.randn(1, cfg.source_channels, T, 2, 3)
                model(x, src, torch.tensor([500]), text, mask, cache=cache)
                h, out = captured["x"], captured["out"]
                # Explicit attention over the reference window, from independently recorded keys/values.
                window = softmax_window(chunk, n, sink)
                q = attn.q_norm(torch.nn.functional.linear(h, attn.q.weight[:, :, 1]))
                q = q.reshape(1, -1, attn.heads, attn.head_dim)
                from engine.model.layers import apply_rope

                q = apply_rope(q, captured["rope"])
                k_cur, v_cur = captured["kv"]
                ks = [recorded_kv[c][0] for c in window] + [k_cur]
                vs = [recorded_kv[c][1] for c in window] + [v_cur]
                k, v = torch.cat(ks, 1), torch.cat(vs, 1)
                logits = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(attn.head_dim)
                ref = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(h.shape)
                ref = ref * torch.nn.functional.silu(attn.output_gate(h))
                torch.testing.assert_close(out, attn.proj(ref), atol=1e-5, rtol=1e-5)
                # Refresh writes this chunk; record its keys independently of the cache.
                model(x, src, torch.zeros(1), text, mask, cache=cache, save_cache=True)
                recorded_kv[chunk] = captured["kv"]
    finally:
        handle.remove()
    kept = set(cache.kv[layer])
    needed = set(softmax_window(len(sizes), n, sink))
    assert needed <= kept and len(kept) <= len(needed) + 1


def test_fast_rope_matches_exact_rope(monkeypatch):
    """The fp32 cos/sin rotation (accelerators) equals the release's complex128 rotation up to fp32 rounding."""
    from engine.model.layers import RoPE3D, apply_rope

    table = RoPE3D(32).table(7, 3, 4, 6, torch.device("cpu"))
    x = torch.randn(2, 72, 3, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("SANA_STREAM_ROPE", "exact")
    exact = apply_rope(x, table)
    monkeypatch.setenv("SANA_STREAM_ROPE", "fast")
    fast = apply_rope(x, table)
    torch.testing.assert_close(fast, exact, atol=2e-6, rtol=1e-6)
    per_sample = apply_rope(x, torch.stack([table, table]))
    torch.testing.assert_close(per_sample, fast, atol=0, rtol=0)


@pytest.mark.parametrize("streaming", [True, False])
def test_fused_projections_compute_the_same_function(streaming):
    """`fuse_projections` (one GEMM per layer for the projections that read the same input) is the same function:
    velocities and every cache write agree across streaming chunks; the fused copies never reach a state dict and
    are dropped when the weights may change (load_state_dict, train(), init_weights)."""
    import dataclasses

    cfg = dataclasses.replace(get_preset("tiny").dit, streaming=streaming, depth=4, softmax_ratio=0.5)
    model = SanaStreamingDiT(cfg).init_weights(1).eval().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 3, 4, 6, generator=g, dtype=torch.float64)
    src = torch.randn(x.shape, generator=g, dtype=torch.float64)
    text = torch.randn(2, cfg.text_len, cfg.caption_channels, generator=g, dtype=torch.float64)
    mask = torch.ones(2, cfg.text_len)
    mask[1, 40:] = 0
    t = torch.tensor([500.0, 20.0])
    plain, fused = model.new_cache(), model.new_cache()
    with torch.no_grad():
        for _ in range(3):
            a = model(x, src, t, text, mask, cache=plain, save_cache=True)
            model.fuse_projections()
            b = model(x, src, t, text, mask, cache=fused, save_cache=True)
            model.unfuse_projections()
            # The gate's frame mean is taken in fp32 on either path, at a different point: fp32-level differences.
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.gdn, plain.gdn, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.ffn, plain.ffn, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.kv, plain.kv, atol=1e-6, rtol=1e-6)
    state = model.fuse_projections().state_dict()
    assert not [k for k in state if "fused" in k] and model.projections_fused
    model.load_state_dict(state)
    assert not model.projections_fused
    model.fuse_projections().train()
    assert not model.projections_fused
    model.eval().fuse_projections().init_weights(2)
    assert not model.projections_fused


@pytest.mark.parametrize(
    "streaming,softmax_layers", [(True, (1, 3)), (False, (1, 3)), (True, (1, 2))], ids=["ar", "bidi", "gdn_last"]
)
def test_cache_only_forward_writes_what_the_full_forward_writes(streaming, softmax_layers):
    """`forward_step(cache_only=True)` (the t = 0 refresh: no velocity, the last block's output for the last frame
    alone) writes exactly what the full forward writes: every block's keys/values or GDN state and its FFN context,
    over chunks that read what the previous one wrote; with a softmax or a GDN block last."""
    import dataclasses

    cfg = dataclasses.replace(get_preset("tiny").dit, streaming=streaming, depth=4, softmax_layers=softmax_layers)
    model = SanaStreamingDiT(cfg).init_weights(2).eval().double()
    g = torch.Generator().manual_seed(1)
    T, H, W = 3, 4, 6
    x = torch.randn(2, cfg.in_channels, T, H, W, generator=g, dtype=torch.float64)
    src = torch.randn(x.shape, generator=g, dtype=torch.float64)
    text = torch.randn(2, cfg.text_len, cfg.caption_channels, generator=g, dtype=torch.float64)
    mask = torch.ones(2, cfg.text_len)
    mask[1, 30:] = 0
    t = torch.zeros(2)
    cache = model.new_cache()
    with torch.no_grad():
        for _ in range(3):
            rope = model.rope.table(cache.next_frame, T, H, W, x.device)

            # Fresh reads for each call: a read's window buffers take the chunk's own keys in their tail rows.
            def reads():
                return [cache.read(i, T * H * W) for i in range(4)]

            full_v, full, _ = model.forward_step(x, src, t, text, mask, rope, reads())
            none, pruned, _ = model.forward_step(x, src, t, text, mask, rope, reads(), cache_only=True)
            assert none is None and full_v.shape == x.shape
            for i, (a, b) in enumerate(zip(full, pruned, strict=True)):
                assert (a.kv is None) == (b.kv is None) == (i not in softmax_layers)
                assert (a.gdn_state is None) == (b.gdn_state is None) == (i in softmax_layers)
                assert b.ffn_last.shape == a.ffn_last.shape == (2, cfg.hidden_size, 1, H * W)
                torch.testing.assert_close(b.kv, a.kv, atol=1e-12, rtol=1e-12)
                torch.testing.assert_close(b.gdn_state, a.gdn_state, atol=1e-12, rtol=1e-12)
                torch.testing.assert_close(b.ffn_last, a.ffn_last, atol=1e-12, rtol=1e-12)
            cache.write(pruned, T)
    with pytest.raises(ValueError, match="cache_only needs a cache and save_cache=True"):
        model(x, src, t, text, mask, cache=cache, cache_only=True)
