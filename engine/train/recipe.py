"""The recipe that trains the shipped tiny editor (engine/assets/tiny/) in one GPU run of minutes.

Phases (each bounded by a time budget, so the whole run fits a fixed slot):
    0. render the procedural train split (`engine.data.procedural`) in worker processes, 49-frame clips
    1. VAE: the tiny LTX-2 VAE as an autoencoder on random 25-frame windows of sources and targets
    2. encode every pair with the trained VAE; text with the shipped tiny Gemma-2 (frozen, random-init)
    3. bidirectional DiT by V2V flow matching: the teacher (and the critic's init)
    4. streaming (AR) DiT by teacher-forced chunk-wise flow matching: the generator's init
    5. streaming stage, twice from the same init: DMD + 0.5 x CRR, and DMD alone (the ablation)

Outputs in `out_dir`: vae.safetensors, dit_bidirectional.safetensors, dit_streaming_fm.safetensors,
dit_streaming_crr.safetensors, dit_streaming_nocrr.safetensors, train_log.jsonl, summary.json. Run folders
(resumable checkpoints) go to `work_dir`.

Non-goals: hyper-parameter search; the 2B models (same code, other presets and budgets).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from engine.config import PRESETS
from engine.data.manifest import procedural_examples
from engine.data.procedural import render_pair
from engine.model.hybrid_dit import SanaStreamingDiT
from engine.text import TextEncoder
from engine.train.trainer import TrainConfig, encode_examples, train_flow, train_streaming, train_vae, training_init
from engine.vae import VideoVAE
from engine.weights import load_state_dict_file

TEXT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "text"

BUDGETS = {"vae": 100.0, "bidirectional": 50.0, "streaming_fm": 130.0, "crr": 60.0, "nocrr": 60.0}
"""Seconds per phase on one H100 (rendering and encoding come on top, ~1 min)."""


def _render(spec):
    return render_pair(spec)


def run_tiny_recipe(
    out_dir: str | Path,
    work_dir: str | Path,
    *,
    num_train: int = 1600,
    device: str = "cuda",
    budgets: dict[str, float] | None = None,
    steps_scale: float = 1.0,
    workers: int = 14,
    vae_init: str | None = None,
    teacher_init: str | None = None,
) -> dict:
    """Train everything; `budgets` overrides seconds per phase, `steps_scale` scales step counts (smoke tests)."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    budgets = {**BUDGETS, **(budgets or {})}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    preset = PRESETS["tiny"]
    log_path = out_dir / "train_log.jsonl"
    summary: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "phases": {}}
    t_all = time.perf_counter()

    def log(row: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def steps(n: int) -> int:
        return max(1, int(n * steps_scale))

    # 0. data
    t = time.perf_counter()
    examples = procedural_examples("train", num_train)
    with get_context("fork").Pool(workers) as pool:
        pairs = pool.map(_render, [e.spec for e in examples], chunksize=8)
    clips = torch.from_numpy(np.stack([c for p in pairs for c in p]))  # (2N, 49, H, W, 3) uint8
    del pairs
    summary["phases"]["render"] = {"seconds": round(time.perf_counter() - t, 1), "clips": clips.shape[0]}
    log({"phase": "render", **summary["phases"]["render"]})

    # 1. VAE
    vae = VideoVAE(preset.vae, vae_init, device=dev, dtype=torch.float32, seed=0)
    win = 25

    def sample_clips(batch: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(clips.shape[0], (batch,), generator=g)
        start = torch.randint(clips.shape[1] - win + 1, (batch,), generator=g)
        x = torch.stack([clips[i, s : s + win] for i, s in zip(idx.tolist(), start.tolist(), strict=True)])
        return x.to(dev, non_blocking=True).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    vcfg = TrainConfig(
        steps=steps(6000), batch_size=16, lr=2e-3, warmup=100, time_budget_s=budgets["vae"], log_every=100
    )
    stats = torch.stack([clips[i] for i in range(0, clips.shape[0], max(1, clips.shape[0] // 64))])
    stats = stats.to(dev).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    row = train_vae(vae, sample_clips, vcfg, work_dir / "vae", log=log, stats_clips=stats)
    shutil.copy(work_dir / "vae" / "vae.safetensors", out_dir / "vae.safetensors")
    summary["phases"]["vae"] = row
    stats = None

    # 2. latents
    t = time.perf_counter()
    vae = VideoVAE(preset.vae, str(out_dir / "vae.safetensors"), device=dev, dtype=torch.float32)
    text = TextEncoder(preset.text, str(TEXT_WEIGHTS), device=dev)
    data = encode_examples(examples, vae, text, preset.height, preset.width, 49, batch=64, frames=clips)
    clips = None
    data.save(work_dir / "latents.pt")
    summary["phases"]["encode"] = {"seconds": round(time.perf_counter() - t, 1), "latent_std": data.source.std().item()}
    log({"phase": "encode", **summary["phases"]["encode"]})

    # 3. bidirectional teacher
    bidi_cfg = dataclasses.replace(preset.dit, streaming=False)
    teacher = training_init(SanaStreamingDiT(bidi_cfg), seed=1)
    if teacher_init:  # warm start (e.g. a previous run's teacher)
        teacher.load_state_dict(load_state_dict_file(teacher_init))
    teacher = teacher.to(dev)
    fcfg = TrainConfig(steps=steps(20000), batch_size=128, lr=1e-3, warmup=200, grad_clip=1.0, log_every=100,
                       save_every=10**9, time_budget_s=budgets["bidirectional"])  # fmt: skip
    summary["phases"]["bidirectional"] = train_flow(teacher, data, fcfg, work_dir / "bidirectional", log=log)
    shutil.copy(work_dir / "bidirectional" / "weights.safetensors", out_dir / "dit_bidirectional.safetensors")

    # 4. streaming generator, flow matching
    gen = training_init(SanaStreamingDiT(preset.dit), seed=2).to(dev)
    gcfg = dataclasses.replace(fcfg, time_budget_s=budgets["streaming_fm"])
    summary["phases"]["streaming_fm"] = train_flow(gen, data, gcfg, work_dir / "streaming_fm", log=log)
    shutil.copy(work_dir / "streaming_fm" / "weights.safetensors", out_dir / "dit_streaming_fm.safetensors")

    # 5. streaming stage with and without CRR, from the same init
    for name, weight in (("crr", 0.5), ("nocrr", 0.0)):
        g = SanaStreamingDiT(preset.dit).to(dev)
        g.load_state_dict(gen.state_dict())
        critic = SanaStreamingDiT(bidi_cfg).to(dev)
        critic.load_state_dict(teacher.state_dict())
        scfg = TrainConfig(steps=steps(4000), batch_size=32, lr=5e-5, critic_lr=1e-4, warmup=10, grad_clip=1.0,
                           reverse_reg_weight=weight, guidance=0.0, critic_ratio=2, log_every=40, save_every=10**9,
                           time_budget_s=budgets[name])  # fmt: skip
        summary["phases"][name] = train_streaming(g, teacher, critic, data, scfg, work_dir / name, log=log)
        shutil.copy(work_dir / name / "weights.safetensors", out_dir / f"dit_streaming_{name}.safetensors")
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.train.recipe", description=run_tiny_recipe.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/sana_tiny_runs")
    p.add_argument("--num-train", type=int, default=1600)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every phase's seconds")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--vae-init", default=None, help="continue from this VAE (.safetensors)")
    p.add_argument("--teacher-init", default=None, help="warm-start the bidirectional teacher from these weights")
    a = p.parse_args(argv)
    budgets = {k: v * a.budget_scale for k, v in BUDGETS.items()}
    run_tiny_recipe(a.out, a.work, num_train=a.num_train, device=a.device, budgets=budgets,
                    steps_scale=a.steps_scale, workers=a.workers, vae_init=a.vae_init,
                    teacher_init=a.teacher_init)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
