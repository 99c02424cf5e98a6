"""engine.data.procedural and engine.train.evaluate helpers: the default eval set, metrics, strips, VAE PSNR."""

from __future__ import annotations

import numpy as np
import torch

from engine.config import PRESETS
from engine.data.procedural import HELD_OUT_PAIRS, prompts, render_pair
from engine.train.evaluate import eval_examples, multi_strip, psnr, score, seen_pair_recolor
from engine.train.trainer import TrainConfig, train_vae, vae_psnr
from engine.vae import VideoVAE


def test_default_eval_set_covers_the_categories():
    ex = eval_examples()
    assert len(ex) >= 12
    cats = {c for c, _ in ex}
    assert {"recolor (unseen pair)", "recolor (seen pair)", "checkerboard", "grayscale"} <= cats
    assert any(s.num_frames > 73 for _, s in ex)
    for cat, spec in ex:
        assert spec.seed >= 1_000_000  # unseen scenes
        if spec.edit == "recolor":
            held = frozenset((spec.old_color, spec.new_color)) in HELD_OUT_PAIRS
            assert held == (cat != "recolor (seen pair)"), (cat, spec)
    assert len({(s.seed, s.num_frames) for _, s in ex}) == len(ex)


def test_seen_pair_recolor_renders_a_local_edit():
    spec = seen_pair_recolor(1_000_500)
    src, tgt = render_pair(spec)
    assert prompts(spec)[0].startswith(f"make the {spec.old_color} ")
    changed = np.abs(src.astype(int) - tgt.astype(int)).max(-1) > 12
    assert 0 < changed.mean() < 0.2  # one shape changes, the rest of the frame does not


def test_score_and_strip_shapes():
    g = np.random.default_rng(0)
    src = g.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)
    tgt = src.copy()
    tgt[:, :8, :8] = 0
    m = score(src, tgt, tgt)
    assert m.psnr == psnr(tgt, tgt) and m.psnr_src < 40
    img = multi_strip([("source", src), ("a model with a long name", tgt), ("truth", tgt)], frames=3)
    assert img.shape == (3 * 32, 112 + 3 * 48, 3) and img.dtype == np.uint8


def test_vae_training_step_and_psnr(tmp_path):
    cfg = PRESETS["tiny"].vae
    vae = VideoVAE(cfg, None, seed=0)
    clip = np.random.default_rng(1).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8)

    def sample(batch, g):
        x = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1
        return x[None].expand(batch, -1, -1, -1, -1)

    before = vae_psnr(vae, [clip])
    row = train_vae(vae, sample, TrainConfig(steps=2, batch_size=1, lr=1e-3, warmup=0, log_every=1), tmp_path,
                    log=None)  # fmt: skip
    assert row["step"] == 2 and (tmp_path / "vae.safetensors").exists()
    after = vae_psnr(VideoVAE(cfg, str(tmp_path / "vae.safetensors")), [clip])
    assert after["clips"] == 1 and np.isfinite(after["psnr"]) and np.isfinite(before["psnr"])
