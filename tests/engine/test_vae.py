"""engine.vae on the tiny preset (random init, CPU): shapes, normalisation, streaming == offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLLTX2Video
from safetensors.torch import save_file

from engine.config import get_preset
from engine.vae import StreamingEncoder, VideoVAE, encoder_state_shapes, state_nbytes

CFG = get_preset("tiny").vae
LAT = CFG.latent_channels  # the tiny VAE's latent channels
H, W = 64, 96  # 2x3 latents: small enough for CPU, large enough for the decoder's reflect padding

# Streaming and whole-clip encode do the same arithmetic, but CPU conv3d picks its algorithm and reduction
# order by input shape (oneDNN vs the native kernel; an 8-frame step is not a 25-frame clip), so fp32 results
# differ in the last bits: measured max |diff| ~8e-7 on latents of magnitude ~1. Tolerance 1e-5 abs + 1e-5
# rel; a wrong cache (see test_streaming_encode_matches_whole) is off by more than 1e-2. (On an H100 with TF32
# off, the full-size fp32 encoder streamed in steps 1, 8, 8 matched the whole clip bit for bit.)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    v = VideoVAE(CFG, seed=0)
    g = torch.Generator().manual_seed(123)  # non-trivial latent statistics so normalisation is exercised
    v.model.latents_mean.copy_(torch.randn(CFG.latent_channels, generator=g) * 0.2)
    v.model.latents_std.copy_(torch.rand(CFG.latent_channels, generator=g) + 0.5)
    return v


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(1, 3, 25, H, W, generator=torch.Generator().manual_seed(7)) * 2 - 1


@pytest.fixture(scope="module")
def latents(vae: VideoVAE, video: torch.Tensor) -> torch.Tensor:
    return vae.encode(video)


# ---- shapes and construction


def test_tiny_preset_shapes(vae: VideoVAE) -> None:
    assert (vae.latent_channels, vae.spatial_compression, vae.temporal_compression) == (LAT, 32, 8)
    assert vae.latent_shape(49, 128, 192) == (LAT, 7, 4, 6)
    assert vae.num_pixel_frames(7) == 49 and vae.num_pixel_frames(1) == 1
    x = torch.rand(1, 3, 9, 128, 192) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, LAT, 2, 4, 6) and z.dtype == torch.float32
    assert vae.decode(z).shape == (1, 3, 9, 128, 192)


def test_bad_geometry_is_refused(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="8k \\+ 1"):
        vae.encode(torch.zeros(1, 3, 24, H, W))
    with pytest.raises(ValueError, match="multiples of 32"):
        vae.encode(torch.zeros(1, 3, 9, 100, W))
    with pytest.raises(ValueError, match="8k \\+ 1"):
        vae.latent_shape(48, 128, 192)
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 8, 3, 2, 3))


def test_random_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a, b, c = VideoVAE(CFG, seed=0), VideoVAE(CFG, seed=0), VideoVAE(CFG, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_config_mismatch_is_refused() -> None:
    bad = type(CFG)(diffusers_kwargs=CFG.diffusers_kwargs, latent_channels=32)
    with pytest.raises(ValueError, match=f"{LAT} latent channels"):
        VideoVAE(bad)
    with pytest.raises(ValueError, match="hf://owner/repo"):
        VideoVAE(CFG, weights="hf://just-a-name")


def test_loads_safetensors_and_diffusers_folder(tmp_path: Path, vae: VideoVAE, video: torch.Tensor) -> None:
    sd = {k: v.contiguous() for k, v in vae.model.state_dict().items()}
    save_file(sd, str(tmp_path / "vae.safetensors"))
    from_file = VideoVAE(CFG, weights=str(tmp_path / "vae.safetensors"), seed=99)
    vae.model.save_pretrained(tmp_path / "folder")
    from_folder = VideoVAE(CFG, weights=str(tmp_path / "folder"), seed=99)
    x = video[:, :, :9]
    ref = vae.encode(x)
    assert torch.equal(from_file.encode(x), ref) and torch.equal(from_folder.encode(x), ref)
    assert torch.equal(from_file.model.latents_std, vae.model.latents_std)  # statistics come with the weights
    del sd["latents_mean"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="1 missing"):
        VideoVAE(CFG, weights=str(tmp_path / "partial.safetensors"))


# ---- normalisation


def test_latent_normalisation_matches_reference_formula(vae: VideoVAE, video: torch.Tensor) -> None:
    x = video[:, :, :9]
    mode = vae.model.encode(x, causal=True).latent_dist.mode()
    mean = vae.model.latents_mean.view(1, -1, 1, 1, 1)
    std = vae.model.latents_std.view(1, -1, 1, 1, 1)
    sf = vae.model.config.scaling_factor
    assert torch.equal(vae.encode(x), (mode - mean) * sf / std)
    z = vae.encode(x)
    direct = vae.model.decoder(z * std / sf + mean, None, causal=False)  # 2 latents = one tile
    assert torch.equal(vae.decode(z), direct)


# ---- streaming encode


def test_streaming_encode_matches_whole(vae: VideoVAE, video: torch.Tensor, latents: torch.Tensor) -> None:
    state = vae.encoder_init_state()
    outs, keys = [], []
    for a, b in [(0, 1), (1, 9), (9, 17), (17, 25)]:
        z, state = vae.encode_step(video[:, :, a:b], state)
        assert z.shape == (1, LAT, 1, 2, 3)
        outs.append(z)
        keys.append(sorted(state))
    assert latents.shape == (1, LAT, 4, 2, 3)
    torch.testing.assert_close(torch.cat(outs, dim=2), latents, **TOL)
    assert keys[1] == keys[2] == keys[3] and all(isinstance(v, torch.Tensor) for v in state.values())
    assert int(state["frames"]) == 25 and any(k.startswith("ctx.down_blocks.1.downsamplers") for k in state)
    assert {k: tuple(v.shape) for k, v in state.items()} == encoder_state_shapes(CFG, 1, H, W)

    # the cache matters: the same last step with a zeroed context is far off
    _, s2 = vae.encode_step(video[:, :, :1], vae.encoder_init_state())
    for a, b in [(1, 9), (9, 17)]:
        _, s2 = vae.encode_step(video[:, :, a:b], s2)
    zeroed = {k: torch.zeros_like(v) if k.startswith("ctx.") else v for k, v in s2.items()}
    wrong, _ = vae.encode_step(video[:, :, 17:25], zeroed)
    assert (wrong - latents[:, :, 3:]).abs().max() > 1e-2


def test_encoder_state_serialises_and_resumes_exactly(vae: VideoVAE, video: torch.Tensor) -> None:
    _, state = vae.encode_step(video[:, :, :1], vae.encoder_init_state())
    _, state = vae.encode_step(video[:, :, 1:9], state)
    buf = io.BytesIO()
    torch.save(state, buf)
    restored = torch.load(io.BytesIO(buf.getvalue()))
    a, _ = vae.encode_step(video[:, :, 9:17], state)
    b, _ = vae.encode_step(video[:, :, 9:17], restored)
    assert torch.equal(a, b)
    assert state_nbytes(state) == sum(v.numel() * v.element_size() for v in state.values()) > 0


def test_encode_step_validation(vae: VideoVAE, video: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="8k \\+ 1"):
        vae.encode_step(video[:, :, :8], vae.encoder_init_state())
    _, state = vae.encode_step(video[:, :, :1], vae.encoder_init_state())
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode_step(video[:, :, 1:6], state)
    with pytest.raises(ValueError, match="do not match the session"):
        vae.encode_step(torch.zeros(1, 3, 8, 32, 32), state)
    with pytest.raises(ValueError, match="not from this VAE"):
        vae.encode_step(video[:, :, 1:9], {"frames": state["frames"]})


def test_streaming_encoder_any_chunking(vae: VideoVAE, video: torch.Tensor, latents: torch.Tensor) -> None:
    enc = StreamingEncoder(vae)
    counts, outs = [], []
    for a, b in [(0, 3), (3, 13), (13, 14), (14, 25)]:
        z = enc.push(video[:, :, a:b])
        counts.append(z.shape[2])
        outs.append(z)
        if a == 3:  # resume from a serialised state half-way (pending frames included)
            enc = StreamingEncoder(vae, state=enc.state_dict())
    assert counts == [1, 1, 0, 2] and enc.pending_frames == 0 and enc.frames_in == 25
    torch.testing.assert_close(torch.cat(outs, dim=2), latents, **TOL)


# ---- decode


def reference_decode(vae: VideoVAE, latents: torch.Tensor) -> torch.Tensor:
    """SANA_STREAMING.md section 5 written out literally: every tile [i, i + 4) (the one-latent tail included)
    decoded alone, first frame dropped for i > 0, diffusers' own in-place `blend_t` over 16 frames, cut."""
    mean = vae.model.latents_mean.view(1, -1, 1, 1, 1)
    std = vae.model.latents_std.view(1, -1, 1, 1, 1)
    z = latents * std / vae.model.config.scaling_factor + mean
    tiles = []
    for i in range(z.shape[2]):
        dec = vae.model.decoder(z[:, :, i : i + 4], None, causal=False)
        tiles.append(dec[:, :, 1:] if i > 0 else dec)
    kept = [tiles[0][:, :, :9]]
    for i in range(1, len(tiles)):
        kept.append(AutoencoderKLLTX2Video.blend_t(vae.model, tiles[i - 1], tiles[i], 16)[:, :, :8])
    return torch.cat(kept, dim=2)[:, :, : (z.shape[2] - 1) * 8 + 1]


@pytest.fixture(scope="module")
def latents11() -> torch.Tensor:
    return torch.randn(1, LAT, 11, 2, 3, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def decoded11(vae: VideoVAE, latents11: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents11)


def test_decode_is_the_reference_algorithm(vae: VideoVAE, latents11: torch.Tensor, decoded11: torch.Tensor) -> None:
    assert decoded11.shape == (1, 3, 81, H, W)
    with torch.no_grad():
        assert torch.equal(decoded11, reference_decode(vae, latents11))
        for t in (1, 2, 3, 5):  # short clips: every tile is a partial one
            z = latents11[:, :, :t]
            out = vae.decode(z)
            assert out.shape[2] == (t - 1) * 8 + 1 and torch.equal(out, reference_decode(vae, z))


def test_streaming_decode_matches_offline(vae: VideoVAE, latents11: torch.Tensor, decoded11: torch.Tensor) -> None:
    state = vae.decoder_init_state()
    outs, i = [], 0
    for n in (5, 3, 3):
        frames, state = vae.decode_step(latents11[:, :, i : i + n], state, final=False)
        outs.append(frames)
        i += n
        assert state["latents"].shape[2] <= 3 and state["tail"].shape[2] <= 16  # minimal context only
    frames, state = vae.decode_step(None, state, final=True)  # flush: no new latents
    outs.append(frames)
    assert [o.shape[2] for o in outs] == [17, 24, 24, 16]  # n = 5, 8, 11 -> 8n - 23 released, then the rest
    streamed = torch.cat(outs, dim=2)
    assert streamed.shape[2] == vae.num_pixel_frames(11) == 81
    assert torch.equal(streamed, decoded11)
    with pytest.raises(ValueError, match="already finished"):
        vae.decode_step(latents11[:, :, :1], state)


def test_streaming_decode_other_chunkings(vae: VideoVAE, latents11: torch.Tensor, decoded11: torch.Tensor) -> None:
    # one latent at a time with the flush on the last chunk, and a serialised state half-way
    state, outs = vae.decoder_init_state(), []
    for i in range(11):
        frames, state = vae.decode_step(latents11[:, :, i : i + 1], state, final=i == 10)
        outs.append(frames)
        if i == 5:
            buf = io.BytesIO()
            torch.save(state, buf)
            state = torch.load(io.BytesIO(buf.getvalue()))
    assert [o.shape[2] for o in outs] == [0, 0, 0, 9, 8, 8, 8, 8, 8, 8, 24]  # the flush: tiles 7, 8, 9
    assert torch.equal(torch.cat(outs, dim=2), decoded11)
    # a stream shorter than one tile
    frames, _ = vae.decode_step(latents11[:, :, :2], vae.decoder_init_state(), final=True)
    assert torch.equal(frames, vae.decode(latents11[:, :, :2]))
    with pytest.raises(ValueError, match="no latent frames"):
        vae.decode_step(latents11[:, :, :0], vae.decoder_init_state(), final=True)
    with pytest.raises(ValueError, match="no latent frames"):
        vae.decode_step(None, vae.decoder_init_state(), final=True)
    empty, _ = vae.decode_step(latents11[:, :, :0], vae.decoder_init_state())
    assert empty.shape == (1, 3, 0, H, W)


def test_decoder_state_bytes(vae: VideoVAE, latents11: torch.Tensor) -> None:
    _, state = vae.decode_step(latents11[:, :, :8], vae.decoder_init_state())
    assert state_nbytes(state) == vae.decoder_state_bytes(1, H, W)
