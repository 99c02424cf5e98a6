"""Fidelity: the engine against numbers computed by the released SANA-Streaming code (tests/golden/README.md).

Tolerances are the fixture README's (atol = rtol = 1e-4 for float32, atol 1e-10 for the float64 GDN op) and
are not loosened to pass: a mismatch is a bug in the maths.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import StreamingSchedule
from kernels.gdn.naive import bidirectional_gdn, gdn_scan
from tests.conftest import GOLDEN

ATOL = RTOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("variant", ["A", "B"])
def test_forward_matches_release(variant, golden_model):
    model = golden_model(variant)
    f = load_file(GOLDEN / f"forward_{variant}.safetensors")
    with torch.no_grad():
        v, mids = model(
            f["in.noisy_latent"],
            f["in.source_latent"],
            f["in.timestep"],
            f["in.text_embeds"],
            f["in.text_mask"],
            return_intermediates=True,
        )
    close(mids["tokens"][:1], f["mid.tokens_after_x_embedder.batch0"], "patch embed")
    close(mids["t_emb"], f["mid.t_emb"], "t_emb")
    close(mids["t0"], f["mid.t0"], "t0")
    close(mids["y"], f["mid.y_after_y_norm"].squeeze(1), "text after y_norm")
    for i in range(model.cfg.depth):
        close(
            mids[f"block{i}.self_attn_out"][:1],
            f[f"mid.block{i}.self_attn_out.batch0"],
            f"block {i} self-attn",
        )
        close(mids[f"block{i}.out"][:1], f[f"mid.block{i}.out.batch0"], f"block {i} out")
    close(v, f["out.velocity"], "velocity")


def test_timestep_is_truncated(golden_model):
    """893.7 must act as 893 (the release calls timestep.long())."""
    model = golden_model("A")
    f = load_file(GOLDEN / "forward_A.safetensors")
    args = (f["in.noisy_latent"], f["in.source_latent"])
    with torch.no_grad():
        a = model(*args, f["in.timestep"], f["in.text_embeds"], f["in.text_mask"])
        b = model(*args, f["in.timestep_as_used"], f["in.text_embeds"], f["in.text_mask"])
    assert torch.equal(a, b)


def run_streaming(model: SanaStreamingDiT, f: dict, num_cached_blocks: int, sink: bool, on_step=None, on_cache=None):
    """The released streaming sampler's loop on the fixture's chunks [0,5), [5,8), [8,11)."""
    bounds = f["in.chunk_boundaries"].tolist()
    cache = model.new_cache(num_cached_blocks, sink)
    outs = []
    for c in range(len(bounds) - 1):
        s, e = bounds[c], bounds[c + 1]
        sched = StreamingSchedule(4)
        x = f["in.noise"][:, :, s:e].clone()
        src = f["in.source_latent"][:, :, s:e]
        for i in range(len(sched)):
            v = model(x, src, sched.timestep(i, 1), f["in.text_embeds"], f["in.text_mask"], cache=cache)
            if on_step:
                on_step(c, int(sched.timesteps[i]), v)
            x = sched.step(v, i, x)
        if c < len(bounds) - 2:
            model(x, src, torch.zeros(1), f["in.text_embeds"], f["in.text_mask"], cache=cache, save_cache=True)
            if on_cache:
                on_cache(c, cache)
        outs.append(x)
    return torch.cat(outs, dim=2)


def test_streaming_matches_release(golden_model):
    model = golden_model("A")
    f = load_file(GOLDEN / "streaming_A.safetensors")
    assert StreamingSchedule(4).timesteps.tolist() == f["in.timesteps"].tolist()
    torch.testing.assert_close(StreamingSchedule(4).sigmas, f["in.sigmas"], atol=0, rtol=0)
    seen_steps, seen_caches = [], []

    def on_step(c, t, v):
        close(v, f[f"step.chunk{c}.t{t}.velocity"], f"chunk {c} t {t} velocity")
        seen_steps.append((c, t))

    def on_cache(c, cache):
        pre = f"cache.after_chunk{c}"
        for b in range(3):
            close(cache.gdn[b][0], f[f"{pre}.block{b}.gdn_state_kv"], f"chunk {c} block {b} M")
            close(cache.gdn[b][1], f[f"{pre}.block{b}.gdn_state_z"], f"chunk {c} block {b} z")
            close(cache.ffn[b], f[f"{pre}.block{b}.ffn_tconv_last_frame"], f"chunk {c} block {b} ffn ctx")
        kv = cache.kv[3][c]  # ours (B, tokens, H, D); the fixture's (B, H, D, tokens)
        close(kv["k"].permute(0, 2, 3, 1), f[f"{pre}.block3.softmax_k_post_rope"], f"chunk {c} softmax k")
        close(kv["v"].permute(0, 2, 3, 1), f[f"{pre}.block3.softmax_v"], f"chunk {c} softmax v")
        close(kv["ffn"], f[f"{pre}.block3.ffn_tconv_last_frame"], f"chunk {c} softmax ffn ctx")
        seen_caches.append(c)

    with torch.no_grad():
        out = run_streaming(model, f, 2, True, on_step, on_cache)
    assert len(seen_steps) == 12 and seen_caches == [0, 1]
    for c in range(3):
        s, e = f["in.chunk_boundaries"][c : c + 2].tolist()
        close(out[:, :, s:e], f[f"out.final_latents_chunk{c}"], f"chunk {c} final latents")


@pytest.mark.parametrize("sink", [False, True])
def test_streaming_window_rules(golden_model, sink):
    """num_cached_blocks = 1 with and without the sink (the only run where cached keys are not contiguous)."""
    f = load_file(GOLDEN / "streaming_A.safetensors")
    with torch.no_grad():
        out = run_streaming(golden_model("A"), f, 1, sink)
    close(out, f[f"out.final_latents_ncb1_{'sink' if sink else 'nosink'}"], "final latents")


def _gdn_inputs(f: dict) -> tuple:
    """The fixture's (B, H, D, T*S) tensors in our (B, H, T, S, D) layout."""
    B, H, D, N = f["in.q"].shape
    T = f["in.decay"].shape[-1]

    def frames(x):
        return x.reshape(B, H, x.shape[2], T, N // T).permute(0, 1, 3, 4, 2)

    qkv = [frames(f[f"in.{n}"]) for n in ("q", "k", "v", "q_rot", "k_rot")]
    return (*qkv, f["in.beta"].permute(0, 3, 1, 2), f["in.decay"]), frames


@pytest.mark.parametrize("init", ["zero_init", "with_init"])
def test_gdn_op_matches_release(init):
    f = load_file(GOLDEN / "gdn_op.safetensors")
    args, frames = _gdn_inputs(f)
    state = (f["in.state_kv_init"], f["in.state_z_init"]) if init == "with_init" else (None, None)
    num, den, m, z = gdn_scan(*args, *state)
    tol = dict(atol=1e-10, rtol=0)
    torch.testing.assert_close(num, frames(f[f"{init}.num"]), **tol)
    torch.testing.assert_close(den, frames(f[f"{init}.den"])[..., 0], **tol)
    torch.testing.assert_close(num / (den.unsqueeze(-1) + 1e-8), frames(f[f"{init}.out"]), **tol)
    torch.testing.assert_close(m, f[f"{init}.final_state_kv"], **tol)
    torch.testing.assert_close(z, f[f"{init}.final_state_z"], **tol)
    if init == "with_init":  # state after frames 0 and 1 = the scan of the first two frames
        two = [a[:, :, :2] for a in args]
        _, _, m2, z2 = gdn_scan(*two, *state)
        torch.testing.assert_close(m2, f["with_init.state_kv_after_frame1"], **tol)
        torch.testing.assert_close(z2, f["with_init.state_z_after_frame1"], **tol)


def test_bidirectional_gdn_forward_part_is_the_scan():
    """With one frame there is no backward contribution: the layer output is the forward scan's num/den."""
    f = load_file(GOLDEN / "gdn_op.safetensors")
    args, _ = _gdn_inputs(f)
    one = [a[:, :, :1] for a in args]
    num, den, _, _ = gdn_scan(*one)
    out, _, _ = bidirectional_gdn(*one)
    torch.testing.assert_close(out, num / (den.unsqueeze(-1) + 1e-8), atol=1e-12, rtol=0)
