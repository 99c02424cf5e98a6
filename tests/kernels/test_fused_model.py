"""The whole fast path of the DiT (fused GDN kernels, fused norm / modulate / conv kernels, concatenated
projections, per-forward RoPE tables, custom ops) against the plain-PyTorch reference path, on a small model
over streaming chunks, run by Triton's interpreter on the CPU (the GPU figures are in loadtest/results/); the
fast path's t = 0 refresh computes only what the cache keeps (`cache_only`), the reference's the whole forward.

fp32: the two paths differ by summation order only (bound 1e-5 relative to the output's scale; observed ~3e-7).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.interpreter import fresh_process, in_process, require_interpreter, run_in_fresh_process

require_interpreter()

from engine.config import get_preset  # noqa: E402
from engine.model.hybrid_dit import SanaStreamingDiT  # noqa: E402


def _run(model: SanaStreamingDiT, monkeypatch, fast: bool, inputs: tuple) -> tuple[torch.Tensor, dict]:
    monkeypatch.setenv("SANA_STREAM_GDN", "triton" if fast else "naive")
    monkeypatch.setenv("SANA_STREAM_FUSED", "1" if fast else "0")
    monkeypatch.setenv("SANA_STREAM_ROPE", "fast")  # the fast path's RoPE tables are fp32 cos / sin
    model.fuse_projections() if fast else model.unfuse_projections()
    x, src, t, text, mask = inputs
    cache, outs = model.new_cache(), []
    with torch.no_grad():
        for i in range(3):  # no history, sink only, full window; the t = 0 refresh writes each chunk
            outs.append(model(x[:, :, 3 * i : 3 * i + 3], src[:, :, 3 * i : 3 * i + 3], t, text, mask, cache=cache))
            # The fast path refreshes as the runner does (only what the cache keeps), the reference in full.
            model(x[:, :, 3 * i : 3 * i + 3], src[:, :, 3 * i : 3 * i + 3], t * 0, text, mask, cache=cache,
                  save_cache=True, cache_only=fast)  # fmt: skip
    return torch.cat(outs, dim=2), {"gdn": cache.gdn, "ffn": cache.ffn, "kv": cache.kv}


@in_process
@pytest.mark.parametrize("streaming", [True, False])
def test_fast_path_equals_reference_path(monkeypatch, streaming):
    cfg = dataclasses.replace(get_preset("tiny").dit, streaming=streaming, depth=4, softmax_ratio=0.5)
    model = SanaStreamingDiT(cfg).init_weights(3).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 9, 3, 5, generator=g)  # 15 tokens per frame: not a block multiple
    src = torch.randn(x.shape, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.caption_channels, generator=g)
    mask = torch.ones(1, cfg.text_len)
    mask[:, 20:] = 0
    inputs = (x, src, torch.tensor([700.0]), text, mask)
    ref, ref_cache = _run(model, monkeypatch, False, inputs)
    fast, fast_cache = _run(model, monkeypatch, True, inputs)
    scale = ref.abs().max()
    torch.testing.assert_close(fast, ref, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(fast_cache, ref_cache, atol=1e-5, rtol=1e-4)


@fresh_process
def test_in_fresh_process():
    """All of the above, in a fresh interpreter where TRITON_INTERPRET is set before triton loads."""
    run_in_fresh_process(__file__)
