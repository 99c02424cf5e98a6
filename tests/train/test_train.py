"""engine.train on CPU: one step of each stage lowers its loss on a fixed tiny batch, the reverse term's gradient
path, checkpoint layouts through the inference loader, resumption."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import PRESETS
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.sampler import chunk_bounds
from engine.train.dmd import critic_loss, dmd_loss, rollout
from engine.train.flow import flow_matching_loss, reverse_reg_loss
from engine.train.trainer import Ema, LatentData, TrainConfig, train_flow, train_streaming, training_init
from engine.weights import load_model, load_state_dict_file, save_checkpoint

TINY = PRESETS["tiny"].dit
B, T, H, W = 2, 7, 4, 6
C = TINY.in_channels


def _dit(streaming: bool, seed: int) -> SanaStreamingDiT:
    model = training_init(SanaStreamingDiT(dataclasses.replace(TINY, streaming=streaming)), seed)
    with torch.no_grad():  # a non-zero head so every loss has a gradient path from the start
        model.final_layer.linear.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(B, C, T, H, W, generator=g)
    return {
        "source": src,
        "target": src + 0.5 * torch.randn(B, C, T, H, W, generator=g),
        "text": torch.randn(B, 64, 64, generator=g),
        "mask": torch.ones(B, 64, dtype=torch.long),
        "reverse_text": torch.randn(B, 64, 64, generator=g),
        "reverse_mask": torch.ones(B, 64, dtype=torch.long),
    }


def _data(b) -> LatentData:
    n = b["source"].shape[0]
    return LatentData(b["source"], b["target"], torch.cat([b["text"], b["reverse_text"]]),
                      torch.cat([b["mask"], b["reverse_mask"]]), torch.arange(n), torch.arange(n) + n,
                      [str(i) for i in range(2 * n)])  # fmt: skip


def test_chunk_bounds_match_the_release():
    assert chunk_bounds(7) == [(0, 4), (4, 7)]
    assert chunk_bounds(10) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(122)[:2] == [(0, 5), (5, 8)]
    assert chunk_bounds(3) == [(0, 3)]


@pytest.mark.parametrize(("streaming", "crr"), [(False, 0.0), (True, 0.5)])
def test_flow_step_lowers_loss(batch, streaming, crr):
    model = _dit(streaming, 0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)

    def loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        fm, x0 = flow_matching_loss(model, batch["target"], batch["source"], batch["text"], batch["mask"],
                                    text_drop=0.0, generator=g)  # fmt: skip
        if crr == 0:
            return fm
        rev = reverse_reg_loss(model, x0, batch["source"], batch["reverse_text"], batch["reverse_mask"], generator=g)
        return fm + crr * rev

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_streaming_stage_step_lowers_losses(batch):
    gen, teacher, critic = _dit(True, 0), _dit(False, 1), _dit(False, 2)
    teacher.requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4)
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-3)
    src, text, mask = batch["source"], batch["text"], batch["mask"]

    def gen_loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        x_hat = rollout(gen, src, text, mask, exit_step=2, generator=g)
        l_dmd = dmd_loss(x_hat, teacher, critic, src, text, mask, guidance=3.0, generator=g)
        return l_dmd + 0.5 * reverse_reg_loss(
            gen, x_hat, src, batch["reverse_text"], batch["reverse_mask"], generator=g
        )

    before = gen_loss()
    opt_g.zero_grad()
    before.backward()
    opt_g.step()
    with torch.no_grad():
        after = gen_loss()
    assert after.item() < before.item()

    with torch.no_grad():
        x_hat = rollout(gen, src, text, mask, exit_step=1, generator=torch.Generator().manual_seed(6))

    def c_loss() -> torch.Tensor:
        return critic_loss(critic, x_hat, src, text, mask, generator=torch.Generator().manual_seed(7))

    before = c_loss()
    opt_c.zero_grad()
    before.backward()
    opt_c.step()
    with torch.no_grad():
        assert c_loss().item() < before.item()


def test_reverse_gradient_only_through_reverse_pass(batch):
    gen = _dit(True, 0)
    src, rt, rm = batch["source"], batch["reverse_text"], batch["reverse_mask"]
    x_hat = rollout(gen, src, batch["text"], batch["mask"], exit_step=0, generator=torch.Generator().manual_seed(1))
    assert x_hat.requires_grad
    rev = reverse_reg_loss(gen, x_hat, src, rt, rm, generator=torch.Generator().manual_seed(2))
    # no path from the reverse loss back into the edited chunk (it is detached) ...
    assert torch.autograd.grad(rev, x_hat, retain_graph=True, allow_unused=True)[0] is None
    params = [p for p in gen.parameters() if p.requires_grad]
    through = torch.autograd.grad(rev, params, allow_unused=True)
    # ... so the generator's gradient equals that of the reverse pass alone on a constant edited input
    alone = reverse_reg_loss(gen, x_hat.detach().clone(), src, rt, rm, generator=torch.Generator().manual_seed(2))
    ref = torch.autograd.grad(alone, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in through)
    for a, b in zip(through, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_training_checkpoints_load_with_inference_loader(batch, tmp_path):
    data = _data(batch)
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-4, warmup=0, log_every=1, text_drop=0.0)
    bidi = _dit(False, 1)
    train_flow(bidi, data, cfg, tmp_path / "flow", log=None)
    build_bidi = lambda: SanaStreamingDiT(bidi.cfg)  # noqa: E731
    _same(bidi, load_model(build_bidi, tmp_path / "flow" / "checkpoint.pt"))  # {"state_dict": ...}
    _same(bidi, load_model(build_bidi, tmp_path / "flow" / "weights.safetensors"))  # flat safetensors
    gen, critic = _dit(True, 0), _dit(False, 2)
    train_streaming(
        gen, bidi, critic, data, dataclasses.replace(cfg, reverse_reg_weight=0.5), tmp_path / "st", log=None
    )
    build_gen = lambda: SanaStreamingDiT(gen.cfg)  # noqa: E731
    _same(gen, load_model(build_gen, tmp_path / "st" / "checkpoint.pt"))  # {"generator": {"model." ...}}
    _same(critic, load_model(build_bidi, tmp_path / "st" / "checkpoint.pt", select="critic"))
    _same(gen, load_model(build_gen, tmp_path / "st" / "weights.safetensors"))
    save_checkpoint(gen.state_dict(), tmp_path / "flat.pth", prefix="module.")  # flat, prefixed
    _same(gen, load_model(build_gen, tmp_path / "flat.pth"))


def test_flow_training_resumes_exactly(batch, tmp_path):
    data = _data(batch)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-4, warmup=0, log_every=1)
    straight = _dit(False, 1)
    train_flow(straight, data, cfg, tmp_path / "a", log=None)
    resumed = _dit(False, 1)
    train_flow(resumed, data, dataclasses.replace(cfg, steps=1), tmp_path / "b", log=None)
    again = _dit(False, 9)  # a fresh process would rebuild the model: the run folder must restore it
    train_flow(again, data, cfg, tmp_path / "b", log=None)
    _same(straight, again)


def test_ema_and_cosine_schedule(batch, tmp_path):
    data = _data(batch)
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup=0, log_every=1, lr_schedule="cosine", lr_min_ratio=0.1,
                      ema_decay=0.5, ema_start=1)  # fmt: skip
    model = _dit(False, 1)
    rows = []
    train_flow(model, data, cfg, tmp_path / "run", log=rows.append)
    assert [round(r["lr"], 6) for r in rows] == [1e-3, round(1e-4 + 9e-4 * 0.75, 6), round(1e-4 + 9e-4 * 0.25, 6)]
    raw = load_state_dict_file(tmp_path / "run" / "weights.safetensors")
    ema = load_state_dict_file(tmp_path / "run" / "weights_ema.safetensors")
    assert raw.keys() == ema.keys()
    # the EMA started as a copy after step 1 and moved half-way towards the weights after steps 2 and 3
    key = "final_layer.linear.weight"
    assert not torch.equal(raw[key], ema[key])
    resumed = _dit(False, 9)  # resuming restores the EMA from train_state.pt
    train_flow(resumed, data, dataclasses.replace(cfg, steps=4), tmp_path / "run", log=None)
    ema2 = load_state_dict_file(tmp_path / "run" / "weights_ema.safetensors")
    raw2 = load_state_dict_file(tmp_path / "run" / "weights.safetensors")
    torch.testing.assert_close(ema2[key], 0.5 * ema[key] + 0.5 * raw2[key])


def test_ema_matches_formula():
    lin = torch.nn.Linear(2, 2)
    ema = Ema(lin, 0.9)
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.state_dict(lin)["weight"], before + 0.1)


def test_latent_data_to_keeps_everything(batch):
    data = _data(batch)
    moved = data.to("cpu")
    assert moved.prompts == data.prompts and torch.equal(moved.source, data.source)
    b = moved.batch(torch.tensor([1, 0]), torch.device("cpu"))
    assert b["target"].shape == (2, C, T, H, W)


def test_streaming_stage_writes_ema(batch, tmp_path):
    data = _data(batch)
    gen, teacher, critic = _dit(True, 0), _dit(False, 1), _dit(False, 2)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-4, critic_lr=1e-4, warmup=0, log_every=1, critic_ratio=1,
                      guidance=3.0, reverse_reg_weight=0.5, ema_decay=0.99, ema_start=1)  # fmt: skip
    row = train_streaming(gen, teacher, critic, data, cfg, tmp_path / "st", log=None)
    assert row["generator_steps"] == 2
    ema = load_state_dict_file(tmp_path / "st" / "weights_ema.safetensors")
    _same(gen, load_model(lambda: SanaStreamingDiT(gen.cfg), tmp_path / "st" / "weights.safetensors"))
    assert ema.keys() == gen.state_dict().keys()


def test_joint_text_training_updates_and_ships_the_encoder(tmp_path):
    """train_flow_text: the encoder gets gradients through both DiTs' losses, its saved weights load through the
    inference TextEncoder and change the prompt embeddings (so a trained encoder can ship in assets/tiny/text)."""
    from engine.text import TextEncoder
    from engine.train.trainer import text_forward, train_flow_text

    text = TextEncoder(PRESETS["tiny"].text)  # random init, seed 0 (what the shipped encoder started from)
    prompts = ["make the red circle blue", "make the blue circle red"]
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, C, T, H, W, generator=g)
    emb, mask = text.encode(prompts)
    data = LatentData(src, src + 0.5 * torch.randn(2, C, T, H, W, generator=g), emb, mask, torch.arange(2),
                      torch.tensor([1, 0]), prompts)  # fmt: skip
    ids, id_mask = text.tokenize(prompts)
    with torch.no_grad():
        assert torch.allclose(text_forward(text, ids, id_mask), emb, atol=1e-5)  # the inference maths
    before = {k: v.clone() for k, v in text.model.state_dict().items()}
    models = {"bidirectional": _dit(False, 0), "streaming": _dit(True, 1)}
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, grad_clip=1.0, log_every=1, text_drop=0.0)
    row = train_flow_text(models, text, data, cfg, tmp_path, log=None)
    assert row["step"] == 2 and all(torch.isfinite(torch.tensor(row[f"loss_{n}"])) for n in models)
    changed = [k for k, v in text.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "embed_tokens.weight" in changed and any("layers.1" in k for k in changed)
    for n in models:
        assert (tmp_path / n / "weights_ema.safetensors").exists()
    trained = TextEncoder(PRESETS["tiny"].text, tmp_path / "text_encoder.safetensors")
    new, _ = trained.encode(prompts)
    assert not torch.allclose(new, emb, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(new, text_forward(text, ids, id_mask), atol=1e-5)  # the raw weights were saved


def test_train_indices_mix():
    from engine.data.procedural import sample_spec
    from engine.train.recipe import train_indices

    idx = train_indices(100, 200, 0.85)
    assert len(idx) == 200 and idx[0] == 100 and idx == sorted(set(idx))
    recolor = sum(sample_spec("train", i).edit == "recolor" for i in idx)
    assert recolor >= 0.84 * 200


def test_write_report_keeps_the_hand_written_text(tmp_path):
    from engine.train.cli import REPORT_BEGIN, REPORT_END, write_report

    path = tmp_path / "REPORT.md"
    write_report(path, "table 1")
    assert path.read_text() == f"{REPORT_BEGIN}\ntable 1\n{REPORT_END}\n"
    path.write_text("# head\n\n" + path.read_text() + "\n## Reading\nmine\n")
    write_report(path, "table 2")
    assert path.read_text() == f"# head\n\n{REPORT_BEGIN}\ntable 2\n{REPORT_END}\n\n## Reading\nmine\n"
